"""Decode products: y = W x for a few activation rows, W read once per row block as its GGUF bytes and
decoded in registers (no float copy of the weight exists anywhere).

Decode is bound by the weight bytes: each program owns BLOCK_N output rows and streams their bytes.
Quantized weights take 8-bit activations (act_q8.py) and sum codes in integers per run, as the CPU
core and llama.cpp's mmvq do (the same arithmetic, so the same greedy text as the CPU engine); the
common types (Q4_0, Q8_0, Q4_K, Q6_K) read whole 32-bit words of codes and take four products per
dp4a, the others go through a byte-wise kernel every type has. Float weights take float activations.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .act_q8 import Act, act_q8
from .quants import (BF16, BLOCKS, F16, F32, LAYOUT, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, codes_tile, dequant_tile,
                     dequantize_ref, row_bytes, weight_view)


@triton.jit
def matvec_kernel(
    Y, W, X, BIAS,  # pointers
    N, K,  # W is (N, K) logical
    stride_x, stride_y, stride_b,  # stride_b: 0 for a bias, a row's for a residual
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr,  # quants.LAYOUT
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,  # NB blocks of QK values per step
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)  # activation row
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # tiles are (rows, blocks, runs, values): scales load per run, codes per value
    r4 = rows[:, None, None, None]
    blocks = tl.arange(0, NB)[None, :, None, None]
    sub = tl.arange(0, SUBS)[None, None, :, None]
    l = tl.arange(0, RUN)[None, None, None, :]
    acc = tl.zeros([BLOCK_N, NB, SUBS, RUN], dtype=tl.float32)  # reduced once at the end
    for b0 in range(0, tl.cdiv(K, QK), NB):
        cols = (b0 + blocks) * QK + sub * RUN + l
        x = tl.load(X + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += dequant_tile(W, r4, b0 + blocks, sub, l, N, K, QTYPE, QK, RUN) * x
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


# ---------------------------------------------------------------------------------------------
# helpers of the word kernels


@triton.jit
def _f16_bits(v):
    """The IEEE half in the low 16 bits of an int32, as float32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(w1, w2, w3, j):
    """6-bit scale and min of sub-block j (GGUF.md §7.2) from the scale words 1..3 of a K-quant block
    (w1..w3: (BN, NB, 1) int32, j: (1, 1, S)): j < 4: bytes j, j + 4; else the nibbles of byte j + 4
    and the top bits of bytes j - 4 (scale) and j (min)."""
    jj = j % 4
    s_j = tl.where(j < 4, w1 >> (8 * jj), w2 >> (8 * jj)) & 255       # byte j
    s_j4 = tl.where(j < 4, w2 >> (8 * jj), w3 >> (8 * jj)) & 255      # byte j + 4
    s_jm4 = (w1 >> (8 * jj)) & 255                                     # byte j - 4 (j >= 4)
    sc = tl.where(j < 4, s_j & 63, (s_j4 & 15) | ((s_jm4 >> 6) << 4))
    mn = tl.where(j < 4, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


# ---------------------------------------------------------------------------------------------
# 8-bit activations (act_q8.py): integer dot products per run of codes, then the run's scales, as the
# CPU core's vec_dot functions and llama.cpp's mmvq compute them. The activation codes are a quarter
# of the float bytes, and on a GPU four code products are one dp4a instruction.


@triton.jit
def _dot4(a, b, c, GPU: tl.constexpr):
    """c + the sum of the four products of the signed bytes of the 32-bit words a and b: one dp4a
    on a GPU; the same sum from shifted bytes elsewhere (the interpreter has no inline assembly)."""
    a, b = tl.broadcast(a, b)
    c = c + tl.zeros_like(a)  # c: a tensor or a constant
    if GPU:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        s = c
        for i in tl.static_range(4):
            s += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return s


@triton.jit
def _word(W32, off, mask):
    """The little-endian 32-bit word at the even byte offset `off` of a weight (blocks of 18, 34 and
    210 bytes leave every other block 2-byte aligned): one load when aligned, two halves otherwise."""
    i = off >> 2
    odd = (off & 2) != 0
    lo = tl.load(W32 + i, mask=mask, other=0)
    hi = tl.load(W32 + i + 1, mask=mask & odd, other=0)
    return tl.where(odd, ((lo >> 16) & 0xFFFF) | (hi << 16), lo)


@triton.jit
def matvec_q8_kernel(
    Y, W, XQ, XD, XS, ADD,  # ADD: bias or residual
    N, K, stride_y, stride_b,
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
):
    """Every quantized type, codes read byte by byte (quants.codes_tile): tiles (rows, blocks, runs,
    values); per run the integer sum of codes times activation codes, then scale * d_x (and the min
    times d_x * sum)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1).to(tl.int64)
    r4 = rows[:, None, None, None]
    blocks = tl.arange(0, NB)[None, :, None, None]
    sub = tl.arange(0, SUBS)[None, None, :, None]
    l = tl.arange(0, RUN)[None, None, None, :]
    nq = K // 32  # 8-bit blocks per row
    acc = tl.zeros([BLOCK_N, NB, SUBS, 1], dtype=tl.float32)
    for b0 in range(0, tl.cdiv(K, QK), NB):
        cols = (b0 + blocks) * QK + sub * RUN + l
        xq = tl.load(XQ + t * K + cols, mask=cols < K, other=0).to(tl.int32)
        q, scale, mn = codes_tile(W, r4, b0 + blocks, sub, l, N, K, QTYPE, QK, RUN)
        s = tl.sum(q * xq, axis=3, keep_dims=True).to(tl.float32)
        j = ((b0 + blocks) * QK + sub * RUN) // 32  # the 8-bit block of the run
        jm = j < nq
        dx = tl.load(XD + t * nq + j, mask=jm, other=0.0)
        acc += scale * dx * s
        if HAS_MIN:
            acc -= mn * tl.load(XS + t * nq + j, mask=jm, other=0.0)
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q8_q4_0_kernel(Y, W16, W32, X32, XD, XS, ADD, N, K, stride_y, stride_b,
                          HAS_ADD: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (18 bytes): d, qs[16]; qs word j (bytes 4j..4j+3): values 4j.. in the low nibbles, 16 + 4j.. high
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1).to(tl.int64)
    nblk = K // 32
    row_b = rows.to(tl.int64)[:, None, None] * (nblk * 18)  # (BN, 1, 1) first byte of each row
    b = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b  # (1, NB, 1)
        ok = (rows[:, None, None] < N) & (blk < nblk)
        off = row_b + blk * 18
        d = _f16_bits(tl.load(W16 + (off >> 1), mask=ok, other=0).to(tl.int32))  # (BN, NB, 1)
        w = _word(W32, off + 2 + 4 * j, ok)  # (BN, NB, 4)
        xm = blk < nblk
        xlo = tl.load(X32 + t * (K // 4) + blk * 8 + j, mask=xm, other=0)
        xhi = tl.load(X32 + t * (K // 4) + blk * 8 + 4 + j, mask=xm, other=0)
        s = _dot4(w & 0x0F0F0F0F, xlo, 0, GPU)
        s = _dot4((w >> 4) & 0x0F0F0F0F, xhi, s, GPU)
        s = tl.sum(s, axis=2).to(tl.float32)  # (BN, NB)
        dx = tl.load(XD + t * nblk + blk, mask=xm, other=0.0)
        sx = tl.load(XS + t * nblk + blk, mask=xm, other=0.0)
        acc += tl.sum(d, axis=2) * (tl.sum(dx, axis=2) * s - 8 * tl.sum(sx, axis=2))  # the codes are q + 8
    y = tl.sum(acc, axis=1)
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q8_q8_0_kernel(Y, W16, W32, X32, XD, XS, ADD, N, K, stride_y, stride_b,
                          HAS_ADD: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (34 bytes): d, qs[32] int8: word j holds values 4j..4j+3
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1).to(tl.int64)
    nblk = K // 32
    row_b = rows.to(tl.int64)[:, None, None] * (nblk * 34)
    b = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        ok = (rows[:, None, None] < N) & (blk < nblk)
        off = row_b + blk * 34
        d = _f16_bits(tl.load(W16 + (off >> 1), mask=ok, other=0).to(tl.int32))
        w = _word(W32, off + 2 + 4 * j, ok)  # (BN, NB, 8)
        xm = blk < nblk
        x = tl.load(X32 + t * (K // 4) + blk * 8 + j, mask=xm, other=0)
        s = tl.sum(_dot4(w, x, 0, GPU), axis=2).to(tl.float32)
        dx = tl.load(XD + t * nblk + blk, mask=xm, other=0.0)
        acc += tl.sum(d * dx, axis=2) * s
    y = tl.sum(acc, axis=1)
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q8_q4_k_kernel(Y, W16, W32, X32, XD, XS, ADD, N, K, stride_y, stride_b,
                          HAS_ADD: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (144 bytes, 36 words): d | dmin << 16, scales[12] (words 1..3), qs (words 4..35): word
    # 4 + 8c + w holds values 64c + 4w.. (low nibbles, run 2c) and 64c + 32 + 4w.. (high, run 2c + 1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1).to(tl.int64)
    nblk = K // 256
    nq = K // 32
    row_w = rows.to(tl.int64)[:, None, None] * (nblk * 36)  # rows of whole words
    b = tl.arange(0, NB)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    w = tl.arange(0, 8)[None, None, None, :]
    acc = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b  # (1, NB, 1)
        ok = (rows[:, None, None] < N) & (blk < nblk)  # (BN, NB, 1)
        base = row_w + blk * 36
        dd = tl.load(W32 + base, mask=ok, other=0)
        d, dmin = _f16_bits(dd), _f16_bits(dd >> 16)
        w1 = tl.load(W32 + base + 1, mask=ok, other=0)
        w2 = tl.load(W32 + base + 2, mask=ok, other=0)
        w3 = tl.load(W32 + base + 3, mask=ok, other=0)
        sc_lo, mn_lo = _k_scale_min(w1, w2, w3, 2 * c)  # (BN, NB, 4)
        sc_hi, mn_hi = _k_scale_min(w1, w2, w3, 2 * c + 1)
        q = tl.load(W32 + base[:, :, :, None] + 4 + 8 * c[:, :, :, None] + w, mask=ok[:, :, :, None], other=0)
        xm = (blk < nblk)[:, :, :, None]
        xw = X32 + t * (K // 4) + blk[:, :, :, None] * 64 + 16 * c[:, :, :, None] + w  # (1, NB, 4, 8)
        s_lo = tl.sum(_dot4(q & 0x0F0F0F0F, tl.load(xw, mask=xm, other=0), 0, GPU), axis=3).to(tl.float32)
        s_hi = tl.sum(_dot4((q >> 4) & 0x0F0F0F0F, tl.load(xw + 8, mask=xm, other=0), 0, GPU), axis=3).to(tl.float32)
        jq = blk * 8 + 2 * c  # the 8-bit block of run 2c, (1, NB, 4)
        jm = (blk < nblk) & (c < 4)
        dx_lo = tl.load(XD + t * nq + jq, mask=jm, other=0.0)
        dx_hi = tl.load(XD + t * nq + jq + 1, mask=jm, other=0.0)
        sx_lo = tl.load(XS + t * nq + jq, mask=jm, other=0.0)
        sx_hi = tl.load(XS + t * nq + jq + 1, mask=jm, other=0.0)
        acc += (d * sc_lo) * dx_lo * s_lo - (dmin * mn_lo) * sx_lo
        acc += (d * sc_hi) * dx_hi * s_hi - (dmin * mn_hi) * sx_hi
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q8_q6_k_kernel(Y, W16, W32, W8, X32, XD, XS, ADD, N, K, stride_y, stride_b,
                          HAS_ADD: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (210 bytes): ql[128], qh[64], scales[16] int8, d. Value 128h + 32r + l: low 4 bits from
    # ql[64h + 32(r % 2) + l] (low nibble for r < 2), high 2 bits from bits 2r of qh[32h + l], scale
    # sc[8h + 2r + l // 16]. Tiles (rows, blocks, h, g = l // 16, words of 4 values).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1).to(tl.int64)
    nblk = K // 256
    nq = K // 32
    row_b = rows.to(tl.int64)[:, None, None, None] * (nblk * 210)  # (BN, 1, 1, 1)
    b = tl.arange(0, NB)[None, :, None, None]
    h = tl.arange(0, 2)[None, None, :, None]
    g = tl.arange(0, 2)[None, None, None, :]
    w = tl.arange(0, 4)[None, None, None, None, :]
    acc = tl.zeros([BLOCK_N, NB, 2, 2], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b  # (1, NB, 1, 1)
        ok = (rows[:, None, None, None] < N) & (blk < nblk)  # (BN, NB, 1, 1)
        off = row_b + blk * 210
        ok5 = ok[:, :, :, :, None]
        lw = (off + 16 * g)[:, :, :, :, None] + 4 * w  # byte of the word of values l = 16g + 4w.. (+ 64h below)
        a_ = _word(W32, lw + 64 * h[:, :, :, :, None], ok5)       # ql[64h + l]: runs r = 0 (low), 2 (high)
        b_ = _word(W32, lw + 64 * h[:, :, :, :, None] + 32, ok5)  # ql[64h + 32 + l]: r = 1, 3
        hb = _word(W32, lw + 32 * h[:, :, :, :, None] + 128, ok5)  # qh[32h + l]
        d = _f16_bits(tl.load(W16 + ((off + 208) >> 1), mask=ok, other=0).to(tl.int32))  # (BN, NB, 1, 1)
        xm = blk < nblk
        for r in tl.static_range(4):
            if r == 0:
                q = (a_ & 0x0F0F0F0F) | ((hb << 4) & 0x30303030)
            elif r == 1:
                q = (b_ & 0x0F0F0F0F) | ((hb << 2) & 0x30303030)
            elif r == 2:
                q = ((a_ >> 4) & 0x0F0F0F0F) | (hb & 0x30303030)
            else:
                q = ((b_ >> 4) & 0x0F0F0F0F) | ((hb >> 2) & 0x30303030)
            xo = (blk * 64 + 32 * h + 8 * r + 4 * g)[:, :, :, :, None] + w  # (1, NB, 2, 2, 4)
            x = tl.load(X32 + t * (K // 4) + xo, mask=xm[:, :, :, :, None], other=0)
            s = tl.sum(_dot4(q, x, 0, GPU), axis=4)  # (BN, NB, 2, 2): (codes + 32) times x
            sx = tl.sum(_dot4(x * 0 + 0x01010101, x, 0, GPU), axis=4)  # (1, NB, 2, 2): the sum of x
            s = (s - 32 * sx).to(tl.float32)
            sc = tl.load(W8 + off + 192 + 8 * h + 2 * r + g, mask=ok, other=0).to(tl.float32)
            dx = tl.load(XD + t * nq + blk * 8 + 4 * h + r, mask=xm, other=0.0)
            acc += (d * sc) * dx * s
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


FLOAT_TYPES = (F32, F16, BF16)
# type -> (kernel, (block_n, blocks per step) on a GPU, under the interpreter)
WORDS = {Q4_0: (matvec_q8_q4_0_kernel, (8, 16), (64, 32)), Q8_0: (matvec_q8_q8_0_kernel, (8, 8), (64, 32)),
         Q4_K: (matvec_q8_q4_k_kernel, (4, 2), (64, 4)), Q6_K: (matvec_q8_q6_k_kernel, (4, 2), (64, 4))}
WORDS_ENV = "SEPEDGE_TRITON_MATVEC"  # "bytes": the byte-wise kernel for every type (benchmarks compare them)
TUNE_ENV = "SEPEDGE_TRITON_TUNE"    # "0": the fixed tiles of WORDS on the GPU too
# (block_n, blocks per step, warps) tried for model-sized weights on a GPU, per block length: rows
# and blocks per step set the bytes in flight; the best depends on the GPU (triton.autotune, once
# per weight shape and process)
TUNE_CONFIGS = {32: [(4, 16, 4), (8, 16, 4), (8, 32, 4), (16, 16, 8), (2, 32, 4), (16, 8, 4)],
                256: [(4, 2, 4), (8, 2, 4), (4, 4, 4), (8, 4, 8), (2, 4, 4), (16, 2, 8)]}
TUNE_MIN_SIZE = 1 << 22  # values of a weight worth tuning for
_tuned: dict = {}


def weight_words(w: torch.Tensor) -> torch.Tensor:
    """w's bytes with 4 readable bytes past the end, from a 4-byte-aligned start (the word kernels
    read a 2-byte-aligned word as two aligned halves): w itself where its storage allows (the
    backend allocates weights so), else a padded copy."""
    st = w.untyped_storage()
    if w.storage_offset() % 4 == 0 and st.nbytes() - w.storage_offset() >= w.numel() + 4:
        return w
    buf = torch.zeros(w.numel() + 8, dtype=torch.uint8, device=w.device)
    buf[:w.numel()] = w.reshape(-1)
    return buf[:w.numel()].view(w.shape)


def _views(w: torch.Tensor, n32: int):
    """int16, int32 and int8 tensors over w's storage (n32 words), for the kernels' loads."""
    st = w.untyped_storage()
    o = w.storage_offset()
    mk = lambda dt, n: torch.empty(0, dtype=dt, device=w.device).set_(st, o // dt.itemsize, (n,))  # noqa: E731
    return mk(torch.int16, 2 * n32), mk(torch.int32, n32), mk(torch.int8, 4 * n32)


def _autotuned(qtype: int):
    if qtype not in _tuned:
        configs = [triton.Config({"BLOCK_N": bn, "NB": nb}, num_warps=warps)
                   for bn, nb, warps in TUNE_CONFIGS[BLOCKS[qtype][0]]]
        _tuned[qtype] = triton.autotune(configs=configs, key=["N", "K", "HAS_ADD"])(WORDS[qtype][0])
    return _tuned[qtype]


def matvec_q8(w: torch.Tensor, qtype: int, x: Act, add: torch.Tensor | None = None, stride_b: int = 0,
              block_n: int | None = None, nb: int | None = None, words: bool | None = None) -> torch.Tensor:
    """y = x @ W.T (+ add) for a quantized W and 8-bit activations x (act_q8): (T, N) float32.
    add: a bias (stride_b 0) or a residual (stride_b its row stride). words: the word kernel of the
    type (the default where there is one, unless $SEPEDGE_TRITON_MATVEC is "bytes"), False: the
    byte-wise one; block_n, nb: tiles (rows, blocks per step) instead of the defaults/autotuning."""
    T, K = x.q.shape
    N = w.shape[0]
    y = torch.empty(T, N, dtype=torch.float32, device=w.device)
    if T == 0:
        return y
    has_add = add is not None
    a = add if has_add else y
    if words is None:
        words = qtype in WORDS and os.environ.get(WORDS_ENV, "") != "bytes"
    gpu = w.is_cuda
    if not words:
        QK, SUBS, RUN = LAYOUT[qtype]
        bn = block_n or (4 if gpu else min(256, triton.next_power_of_2(N)))
        nbk = nb or max(1, min(1024 if QK == 32 else 512, triton.next_power_of_2(K)) // QK)
        matvec_q8_kernel[(triton.cdiv(N, bn), T)](y, weight_view(w, qtype), x.q, x.d, x.s, a, N, K, y.stride(0),
                                                   stride_b, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN,
                                                   HAS_MIN=qtype in (Q4_1, Q4_K, Q5_K), HAS_ADD=has_add,
                                                   BLOCK_N=bn, NB=nbk)
        return y
    kernel, on_gpu, interp = WORDS[qtype]
    w = weight_words(w)
    w16, w32, w8 = _views(w, (w.numel() + 4) // 4)
    x32 = x.q.view(torch.int32)
    ws = (w16, w32, w8) if qtype == Q6_K else (w16, w32)
    args = (y, *ws, x32, x.d, x.s, a, N, K, y.stride(0), stride_b)
    n_blocks = K // BLOCKS[qtype][0]
    if (gpu and block_n is None and nb is None and N * K >= TUNE_MIN_SIZE and os.environ.get(TUNE_ENV) != "0"
            and n_blocks >= max(c[1] for c in TUNE_CONFIGS[BLOCKS[qtype][0]])):
        _autotuned(qtype)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), T)](*args, HAS_ADD=has_add, GPU=gpu)
        return y
    bn, nbk = block_n or (on_gpu if gpu else interp)[0], nb or (on_gpu if gpu else interp)[1]
    nbk = min(nbk, triton.next_power_of_2(n_blocks))
    kernel[(triton.cdiv(N, bn), T)](*args, HAS_ADD=has_add, GPU=gpu, BLOCK_N=bn, NB=nbk)
    return y


def matvec(w: torch.Tensor, qtype: int, x, bias: torch.Tensor | None = None, res: torch.Tensor | None = None,
           block_n: int | None = None, block_k: int | None = None, words: bool | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) (+ res) for decode.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (T, K) float rows or their act_q8 form
    (quantized weights take the 8-bit form: float rows are quantized here; float weights take the
    float rows: an Act must then carry them); bias: (N,) float32 or None; res: (T, N) float32 or None,
    a residual added in the epilogue (the block's `x + proj`, without a launch of its own) -> (T, N)
    float32. block_n, block_k: tiles instead of the defaults; words: see matvec_q8."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    if res is not None:
        assert res.shape == (T, N) and res.dtype == torch.float32 and res.stride(1) == 1
        if bias is not None:  # one epilogue term: fold the bias into the residual
            res, bias = res + bias, None
    add, stride_b = (res, res.stride(0)) if res is not None else (bias, 0)
    if qtype not in FLOAT_TYPES:
        xa = x if isinstance(x, Act) else act_q8(x)
        nb = None if block_k is None else max(1, block_k // BLOCKS[qtype][0])
        return matvec_q8(w, qtype, xa, add, stride_b, block_n, nb, words)
    if isinstance(x, Act):
        assert x.f is not None, "a float weight needs the float activations"
        x = x.f
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    QK, SUBS, RUN = LAYOUT[qtype]
    block_k = block_k or 1024  # the best of a sweep on the H200 (benchmarks/results/triton_sweep.md)
    # many small programs fill a GPU; the interpreter runs one program at a time in Python, so fewer
    block_n = block_n or (4 if x.is_cuda else min(256, triton.next_power_of_2(N)))
    if T:
        matvec_kernel[(triton.cdiv(N, block_n), T)](
            y, weight_view(w, qtype), x, add if add is not None else y, N, K, x.stride(0), y.stride(0), stride_b,
            QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=add is not None, BLOCK_N=block_n,
            NB=max(1, min(block_k, triton.next_power_of_2(K)) // QK))  # short rows: no padding
    return y


def matvec_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
               res: torch.Tensor | None = None) -> torch.Tensor:
    """Float activations (the float64 tests' reference is this, with x already through act_q8 where
    the weight is quantized)."""
    y = x.float() @ dequantize_ref(w, qtype, x.shape[1]).T
    y = y if bias is None else y + bias
    return y if res is None else y + res
