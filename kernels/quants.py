"""Tensor types on the device: the GGUF block layouts (GGUF.md §7, native/src/se-common.h) decoded in
registers, a row-gather/dequantize kernel (the token embedding lookup) and a torch reference.

Weights stay on the device as their raw GGUF bytes (a uint8 tensor of shape (rows, row_bytes)); every
kernel that reads a weight calls `dequant_tile`, which decodes a tile of rows x blocks x runs x values
straight from those bytes: scales are read once per run of values that share them, codes once per value,
so one helper serves the matrix-vector products, the tiled products and the gathers alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, pdl_wait

# ggml type ids (the GGUF spec's tensor types; gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 8, 12, 13, 14, 30
# type id -> (values per block, bytes per block)
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q8_0: (32, 34),
          Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}
# type id -> (QK, SUBS, RUN): how dequant_tile splits a block into runs of values sharing a scale
# (float types: pseudo-blocks of 32)
LAYOUT = {F32: (32, 1, 32), F16: (32, 1, 32), BF16: (32, 1, 32), Q4_0: (32, 1, 32), Q4_1: (32, 1, 32),
          Q5_0: (32, 1, 32), Q8_0: (32, 1, 32), Q4_K: (256, 8, 32), Q5_K: (256, 8, 32), Q6_K: (256, 16, 16)}
NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0",
         Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


def row_bytes(qtype: int, n_cols: int) -> int:
    block, size = BLOCKS[qtype]
    return n_cols // block * size


def weight_view(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """The tensor a kernel receives for weight bytes `w` (rows, row_bytes): float types are read as
    float32 or as 16-bit words (no bfloat16 pointers, so the interpreter runs them too), the rest as bytes."""
    assert w.dtype == torch.uint8 and w.dim() == 2 and w.is_contiguous(), "weights are contiguous uint8 rows"
    if qtype == F32:
        return w.view(torch.float32)
    if qtype in (F16, BF16):
        return w.view(torch.int16)
    return w


@triton.jit
def _half(W, off, mask):
    """The IEEE half at byte offset `off` (little-endian), as float32."""
    lo = tl.load(W + off, mask=mask, other=0).to(tl.int32)
    hi = tl.load(W + off + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(W, off, mask):
    return tl.load(W + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def dequant_tile(W, rows, blocks, sub, l, N, K, QTYPE: tl.constexpr, QK: tl.constexpr, RUN: tl.constexpr):
    """Values of W at rows `rows`, columns blocks * QK + sub * RUN + l, as float32 (0 outside (N, K)).

    The indices broadcast against each other; (QK, SUBS, RUN) = LAYOUT[QTYPE] splits a block into SUBS
    runs of RUN values that share a scale, so with rows (BN, 1, 1, 1), blocks (1, NB, 1, 1), sub
    (1, 1, SUBS, 1) and l (1, 1, 1, RUN) every scale is read once per run and every code once per
    value. W points at the weight as `weight_view` passes it; K is the logical row length."""
    cols = blocks * QK + sub * RUN + l
    mask_s = (rows < N) & (blocks * QK < K)  # the block exists: its scales may be read
    mask = mask_s & (cols < K)
    if QTYPE == 0:  # F32
        return tl.load(W + rows.to(tl.int64) * K + cols, mask=mask, other=0.0)
    elif QTYPE == 1:  # F16 as 16-bit words
        h = tl.load(W + rows.to(tl.int64) * K + cols, mask=mask, other=0)
        return h.to(tl.float16, bitcast=True).to(tl.float32)
    elif QTYPE == 30:  # BF16: the high half of a float32
        h = tl.load(W + rows.to(tl.int64) * K + cols, mask=mask, other=0).to(tl.int32)
        return ((h & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    elif QTYPE == 2:  # Q4_0: d, qs[16]; value j in the low nibble of qs[j % 16] (j < 16), else the high one
        blk = rows.to(tl.int64) * (K // 32 * 18) + blocks * 18
        q = _byte(W, blk + 2 + l % 16, mask)
        q = tl.where(l < 16, q & 15, q >> 4)
        return (q - 8).to(tl.float32) * _half(W, blk, mask_s)
    elif QTYPE == 3:  # Q4_1: d, m, qs[16]; value = d * q + m
        blk = rows.to(tl.int64) * (K // 32 * 20) + blocks * 20
        q = _byte(W, blk + 4 + l % 16, mask)
        q = tl.where(l < 16, q & 15, q >> 4)
        return q.to(tl.float32) * _half(W, blk, mask_s) + _half(W, blk + 2, mask_s)
    elif QTYPE == 6:  # Q5_0: d, qh (bit j = 5th bit of value j, little-endian u32), qs[16]
        blk = rows.to(tl.int64) * (K // 32 * 22) + blocks * 22
        q = _byte(W, blk + 6 + l % 16, mask)
        q = tl.where(l < 16, q & 15, q >> 4)
        h = (_byte(W, blk + 2 + l // 8, mask) >> (l % 8)) & 1
        return ((q | (h << 4)) - 16).to(tl.float32) * _half(W, blk, mask_s)
    elif QTYPE == 8:  # Q8_0: d, qs[32] int8
        blk = rows.to(tl.int64) * (K // 32 * 34) + blocks * 34
        q = _byte(W, blk + 2 + l, mask)
        q = tl.where(q >= 128, q - 256, q)
        return q.to(tl.float32) * _half(W, blk, mask_s)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: codes, scales and mins decoded in codes_tile
        q, scale, mn = codes_tile(W, rows, blocks, sub, l, N, K, QTYPE, QK, RUN)
        return scale * q.to(tl.float32) - mn
    else:  # Q6_K: ql[128], qh[64], scales[16] int8, d; runs of 16; halves of 128 values, quarters of 32
        tl.static_assert(QTYPE == 14, "unsupported tensor type")
        blk = rows.to(tl.int64) * (K // 256 * 210) + blocks * 210
        half = sub // 8
        quarter = (sub % 8) // 2
        l32 = (sub % 2) * 16 + l  # position within the quarter
        q = _byte(W, blk + 64 * half + 32 * (quarter % 2) + l32, mask)
        q = tl.where(quarter < 2, q & 15, q >> 4)
        q = q | (((_byte(W, blk + 128 + 32 * half + l32, mask) >> (2 * quarter)) & 3) << 4)
        sc = _byte(W, blk + 192 + sub, mask_s)
        scale = _half(W, blk + 208, mask_s) * tl.where(sc >= 128, sc - 256, sc).to(tl.float32)
        return scale * (q - 32).to(tl.float32)


@triton.jit
def codes_tile(W, rows, blocks, sub, l, N, K, QTYPE: tl.constexpr, QK: tl.constexpr, RUN: tl.constexpr):
    """The integer codes of W at rows `rows`, columns blocks * QK + sub * RUN + l, and the scale and
    min of their run, so that value = scale * q - mn: the operands of the 8-bit-activation products
    (act_q8.py), which sum q times the activation codes in integers and apply scale and min once per
    run, as the CPU core's vec_dot functions (and llama.cpp's mmvq/mmq) do. Indices broadcast as in
    `dequant_tile`; codes outside (N, K) are whatever the masked loads give (their activation codes
    or scales are 0). Signed codes where the type has an offset (Q4_0, Q5_0, Q6_K), so only Q4_1 and
    the Q4_K/Q5_K mins need `mn` (0.0 for the others); quantized types only."""
    cols = blocks * QK + sub * RUN + l
    mask_s = (rows < N) & (blocks * QK < K)
    mask = mask_s & (cols < K)
    if QTYPE == 2:  # Q4_0
        blk = rows.to(tl.int64) * (K // 32 * 18) + blocks * 18
        q = _byte(W, blk + 2 + l % 16, mask)
        return tl.where(l < 16, q & 15, q >> 4) - 8, _half(W, blk, mask_s), 0.0
    elif QTYPE == 3:  # Q4_1: value = d * q + m
        blk = rows.to(tl.int64) * (K // 32 * 20) + blocks * 20
        q = _byte(W, blk + 4 + l % 16, mask)
        return tl.where(l < 16, q & 15, q >> 4), _half(W, blk, mask_s), -_half(W, blk + 2, mask_s)
    elif QTYPE == 6:  # Q5_0
        blk = rows.to(tl.int64) * (K // 32 * 22) + blocks * 22
        q = _byte(W, blk + 6 + l % 16, mask)
        q = tl.where(l < 16, q & 15, q >> 4)
        h = (_byte(W, blk + 2 + l // 8, mask) >> (l % 8)) & 1
        return (q | (h << 4)) - 16, _half(W, blk, mask_s), 0.0
    elif QTYPE == 8:  # Q8_0
        blk = rows.to(tl.int64) * (K // 32 * 34) + blocks * 34
        q = _byte(W, blk + 2 + l, mask)
        return tl.where(q >= 128, q - 256, q), _half(W, blk, mask_s), 0.0
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: d, dmin, scales[12], (Q5_K: qh[32]), qs[128]; runs of 32
        BS: tl.constexpr = 144 if QTYPE == 12 else 176
        QS: tl.constexpr = 16 if QTYPE == 12 else 48
        blk = rows.to(tl.int64) * (K // 256 * BS) + blocks * BS
        q = _byte(W, blk + QS + 32 * (sub // 2) + l, mask)  # 32 bytes per 64 values: low, then high nibbles
        q = tl.where(sub % 2 == 0, q & 15, q >> 4)
        if QTYPE == 13:  # fifth bit of value 64c + 32h + l: bit 2c + h (= sub) of qh[l]
            q = q | (((_byte(W, blk + 16 + l, mask) >> sub) & 1) << 4)
        # 6-bit scale and min of run `sub` (GGUF.md §7.2): sub < 4 from bytes sub, sub + 4;
        # sub >= 4 from the nibbles of byte sub + 4 and the top bits of bytes sub - 4 (scale), sub (min)
        s1 = _byte(W, blk + 4 + sub, mask_s)
        s2 = _byte(W, blk + 8 + sub, mask_s)
        s3 = _byte(W, blk + 4 + tl.where(sub >= 4, sub - 4, sub), mask_s)
        sc = tl.where(sub < 4, s1 & 63, (s2 & 15) | ((s3 >> 6) << 4))
        mn = tl.where(sub < 4, s2 & 63, (s2 >> 4) | ((s1 >> 6) << 4))
        return q, _half(W, blk, mask_s) * sc.to(tl.float32), _half(W, blk + 2, mask_s) * mn.to(tl.float32)
    else:  # Q6_K (see dequant_tile)
        tl.static_assert(QTYPE == 14, "codes_tile: quantized types only")
        blk = rows.to(tl.int64) * (K // 256 * 210) + blocks * 210
        half = sub // 8
        quarter = (sub % 8) // 2
        l32 = (sub % 2) * 16 + l
        q = _byte(W, blk + 64 * half + 32 * (quarter % 2) + l32, mask)
        q = tl.where(quarter < 2, q & 15, q >> 4)
        q = q | (((_byte(W, blk + 128 + 32 * half + l32, mask) >> (2 * quarter)) & 3) << 4)
        sc = _byte(W, blk + 192 + sub, mask_s)
        return q - 32, _half(W, blk + 208, mask_s) * tl.where(sc >= 128, sc - 256, sc).to(tl.float32), 0.0


@triton.jit
def get_rows_kernel(
    OUT, W, IDS,  # pointers
    N, K,  # W is (N, K) logical
    stride_out,
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr, NB: tl.constexpr,
    PDL: tl.constexpr = 0,  # launched early (pdl.py)
):
    pdl_wait(PDL)
    i = tl.program_id(0)
    rows = tl.load(IDS + i + tl.zeros([1, 1, 1], dtype=tl.int32))
    blocks = tl.arange(0, NB)[:, None, None]
    sub = tl.arange(0, SUBS)[None, :, None]
    l = tl.arange(0, RUN)[None, None, :]
    for b0 in range(0, tl.cdiv(K, QK), NB):
        x = dequant_tile(W, rows, b0 + blocks, sub, l, N, K, QTYPE, QK, RUN)
        cols = (b0 + blocks) * QK + sub * RUN + l
        tl.store(OUT + i * stride_out + cols, x, mask=cols < K)


def get_rows(w: torch.Tensor, qtype: int, n_cols: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a weight, dequantized: the token embedding lookup.

    w: (N, row_bytes) uint8 GGUF bytes, ids: (T,) int -> (T, n_cols) float32."""
    assert n_cols % BLOCKS[qtype][0] == 0, "row length must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, n_cols), "row bytes do not match the type and length"
    ids = ids.to(device=w.device, dtype=torch.int32).contiguous()
    out = torch.empty(ids.shape[0], n_cols, dtype=torch.float32, device=w.device)
    if ids.numel():
        QK, SUBS, RUN = LAYOUT[qtype]
        nb = max(1, min(1024, triton.next_power_of_2(n_cols)) // QK)
        get_rows_kernel[(ids.shape[0],)](out, weight_view(w, qtype), ids, w.shape[0], n_cols, out.stride(0),
                                         QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, NB=nb, **pdl_launch(w.device))
    return out


def dequantize(w: torch.Tensor, qtype: int, n_cols: int) -> torch.Tensor:
    """The whole weight as float32 (N, n_cols)."""
    return get_rows(w, qtype, n_cols, torch.arange(w.shape[0], device=w.device))


# ---------------------------------------------------------------------------------------------
# torch reference


def _half_ref(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)).to(torch.int16).view(torch.float16).float()


def dequantize_ref(w: torch.Tensor, qtype: int, n_cols: int) -> torch.Tensor:
    """Weight bytes (N, row_bytes) -> float32 (N, n_cols), vectorized in torch."""
    n = w.shape[0]
    if qtype == F32:
        return w.view(torch.float32).clone()
    if qtype == F16:
        return w.view(torch.float16).float()
    if qtype == BF16:
        return w.view(torch.bfloat16).float()
    block, size = BLOCKS[qtype]
    b = w.reshape(n, n_cols // block, size).to(torch.int32)
    lo_hi = lambda qs: torch.cat((qs & 15, qs >> 4), -1)  # noqa: E731  low nibbles: values 0..15, high: 16..31
    if qtype == Q8_0:
        q = torch.where(b[..., 2:] >= 128, b[..., 2:] - 256, b[..., 2:])
        y = q * _half_ref(b[..., 0:2])[..., None]
    elif qtype == Q4_0:
        y = (lo_hi(b[..., 2:]) - 8) * _half_ref(b[..., 0:2])[..., None]
    elif qtype == Q4_1:
        y = lo_hi(b[..., 4:]) * _half_ref(b[..., 0:2])[..., None] + _half_ref(b[..., 2:4])[..., None]
    elif qtype == Q5_0:
        qh = b[..., 2] | b[..., 3] << 8 | b[..., 4] << 16 | b[..., 5] << 24
        bits = (qh[..., None] >> torch.arange(32, device=w.device)) & 1
        y = ((lo_hi(b[..., 6:]) | bits << 4) - 16) * _half_ref(b[..., 0:2])[..., None]
    elif qtype in (Q4_K, Q5_K):
        qs = b[..., -128:].reshape(n, -1, 4, 32)
        q = torch.stack((qs & 15, qs >> 4), 3).reshape(n, -1, 8, 32)  # chunk c -> sub-blocks 2c, 2c + 1
        if qtype == Q5_K:
            qh = b[..., 16:48]
            q = q | (((qh[..., None, :] >> torch.arange(8, device=w.device)[:, None]) & 1) << 4)
        s = b[..., 4:16]
        sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), -1)
        mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), -1)
        d, dmin = _half_ref(b[..., 0:2])[..., None, None], _half_ref(b[..., 2:4])[..., None, None]
        y = d * (sc[..., None] * q) - dmin * mn[..., None]
    elif qtype == Q6_K:
        ql, qh = b[..., 0:128].reshape(n, -1, 2, 2, 32), b[..., 128:192].reshape(n, -1, 2, 1, 32)
        low = torch.cat((ql & 15, ql >> 4), 3)  # (half, quarter, l): quarters 0, 1 low nibbles, 2, 3 high
        high = (qh >> (2 * torch.arange(4, device=w.device)[:, None])) & 3
        q = (low | high << 4) - 32
        sc = b[..., 192:208]
        sc = torch.where(sc >= 128, sc - 256, sc).reshape(n, -1, 2, 4, 2, 1)
        y = _half_ref(b[..., 208:210])[..., None, None, None, None] * sc * q.reshape(n, -1, 2, 4, 2, 16)
    else:
        raise ValueError(f"unsupported tensor type {qtype}")
    return y.reshape(n, n_cols).float()
