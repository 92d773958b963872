"""Decode products: y = W x for a few activation rows, W read once per row block as its GGUF bytes and
dequantized in registers (no float copy of the weight exists anywhere).

Decode is bound by the weight bytes: each program owns BLOCK_N output rows and streams their bytes
in BLOCK_K-wide tiles; activations are float (what the CPU core's exact `dot` path computes, no 8-bit
activation rounding).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .quants import BLOCKS, LAYOUT, Q4_0, Q4_K, Q6_K, Q8_0, dequant_tile, dequantize_ref, row_bytes, weight_view


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
# Wide-word kernels for the types of the common files (Q4_0, Q8_0, Q4_K_M = Q4_K + Q6_K): every lane
# loads whole 16-bit (Q4_0, Q8_0, Q6_K: 18-, 34- and 210-byte blocks are only 2-byte aligned) or
# 32-bit words (Q4_K: 144-byte blocks) of codes and splits them into values with shifts and masks in
# registers; each block's scales are read once per block, not once per value. Tiles are
# (rows, blocks, words, bytes in a word), the activations (blocks, words, bytes), shared by the rows.


@triton.jit
def _small_int(bits, bias: tl.constexpr):
    """(bits - bias) as float32 for codes 0 <= bits < 2^23, without an int-to-float conversion (a
    quarter-rate instruction on NVIDIA GPUs, the bound of a naive 4-bit decode): 2^23 + bits has the
    exponent of 2^23 and `bits` as its mantissa, so OR-ing the exponent in and subtracting 2^23 + bias
    is exact."""
    return (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _f16_bits(v):
    """The IEEE half in the low 16 bits of an int32, as float32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def matvec_q4_0_kernel(Y, W16, X, BIAS, N, K, stride_x, stride_y, stride_b,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block: d (word 0), qs[16] (words 1..8); byte j of qs holds value j (low nibble) and j + 16 (high)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    nblk = K // 32
    row_w = rows.to(tl.int64)[:, None] * (nblk * 9)  # (BN, 1) first word of each row
    b = tl.arange(0, NB)
    w = tl.arange(0, 8)
    k = tl.arange(0, 2)
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        ok = (rows[:, None] < N) & (blk[None, :] < nblk)  # (BN, NB)
        base = row_w + blk[None, :] * 9
        d = _f16_bits(tl.load(W16 + base, mask=ok, other=0).to(tl.int32))
        q = tl.load(W16 + base[:, :, None] + 1 + w[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)
        sh = (8 * k)[None, None, None, :]
        lo = _small_int((q[:, :, :, None] >> sh) & 15, 8)  # (BN, NB, 8, 2): value 2w + k
        hi = _small_int((q[:, :, :, None] >> (sh + 4)) & 15, 8)  # value 16 + 2w + k
        xo = blk[:, None, None] * 32 + 2 * w[None, :, None] + k[None, None, :]  # (NB, 8, 2)
        xm = (blk < nblk)[:, None, None]
        xl = tl.load(X + t * stride_x + xo, mask=xm, other=0.0)
        xh = tl.load(X + t * stride_x + xo + 16, mask=xm, other=0.0)
        acc += tl.sum(tl.sum(lo * xl[None] + hi * xh[None], axis=3), axis=2) * d
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q8_0_kernel(Y, W16, X, BIAS, N, K, stride_x, stride_y, stride_b,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block: d (word 0), qs[32] int8 (words 1..16, two values each)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    nblk = K // 32
    row_w = rows.to(tl.int64)[:, None] * (nblk * 17)
    b = tl.arange(0, NB)
    w = tl.arange(0, 16)
    k = tl.arange(0, 2)
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        ok = (rows[:, None] < N) & (blk[None, :] < nblk)
        base = row_w + blk[None, :] * 17
        d = _f16_bits(tl.load(W16 + base, mask=ok, other=0).to(tl.int32))
        q = tl.load(W16 + base[:, :, None] + 1 + w[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)
        # byte k of the word, its sign bit flipped: the int8 code + 128
        v = _small_int(((q[:, :, :, None] >> (8 * k)[None, None, None, :]) & 255) ^ 128, 128)
        xo = blk[:, None, None] * 32 + 2 * w[None, :, None] + k[None, None, :]
        x = tl.load(X + t * stride_x + xo, mask=(blk < nblk)[:, None, None], other=0.0)
        acc += tl.sum(tl.sum(v * x[None], axis=3), axis=2) * d
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


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


@triton.jit
def matvec_q4_k_kernel(Y, W32, X, BIAS, N, K, stride_x, stride_y, stride_b,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (36 words): d | dmin << 16, scales[12] (words 1..3), qs[128] (words 4..35); qs byte
    # 32c + l holds value 64c + l (low nibble, sub-block 2c) and 64c + 32 + l (high, sub-block 2c + 1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    nblk = K // 256
    row_w = rows.to(tl.int64)[:, None] * (nblk * 36)
    b = tl.arange(0, NB)
    c = tl.arange(0, 4)
    w = tl.arange(0, 8)
    k = tl.arange(0, 4)
    acc = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        ok = (rows[:, None] < N) & (blk[None, :] < nblk)
        base = row_w + blk[None, :] * 36  # (BN, NB)
        ok3 = ok[:, :, None]
        b3 = base[:, :, None]
        dd = tl.load(W32 + b3, mask=ok3, other=0)
        d, dmin = _f16_bits(dd), _f16_bits(dd >> 16)  # (BN, NB, 1)
        w1 = tl.load(W32 + b3 + 1, mask=ok3, other=0)
        w2 = tl.load(W32 + b3 + 2, mask=ok3, other=0)
        w3 = tl.load(W32 + b3 + 3, mask=ok3, other=0)
        sc_lo, mn_lo = _k_scale_min(w1, w2, w3, 2 * c[None, None, :])      # (BN, NB, 4)
        sc_hi, mn_hi = _k_scale_min(w1, w2, w3, 2 * c[None, None, :] + 1)
        q = tl.load(W32 + b3[:, :, :, None] + 4 + 8 * c[None, None, :, None] + w[None, None, None, :],
                    mask=ok3[:, :, :, None], other=0)  # (BN, NB, 4, 8)
        sh = (8 * k)[None, None, None, None, :]
        lo = _small_int((q[:, :, :, :, None] >> sh) & 15, 0)  # (BN, NB, 4, 8, 4): value 64c + 4w + k
        hi = _small_int((q[:, :, :, :, None] >> (sh + 4)) & 15, 0)  # value 64c + 32 + 4w + k
        xo = blk[:, None, None, None] * 256 + 64 * c[None, :, None, None] + 4 * w[None, None, :, None] \
            + k[None, None, None, :]  # (NB, 4, 8, 4)
        xm = (blk < nblk)[:, None, None, None]
        xl = tl.load(X + t * stride_x + xo, mask=xm, other=0.0)
        xh = tl.load(X + t * stride_x + xo + 32, mask=xm, other=0.0)
        s_lo = tl.sum(tl.sum(lo * xl[None], axis=4), axis=3)  # (BN, NB, 4)
        s_hi = tl.sum(tl.sum(hi * xh[None], axis=4), axis=3)
        x_lo = tl.sum(tl.sum(xl, axis=3), axis=2)[None]  # (1, NB, 4): the mins multiply the sums of x
        x_hi = tl.sum(tl.sum(xh, axis=3), axis=2)[None]
        acc += d * (sc_lo * s_lo + sc_hi * s_hi) - dmin * (mn_lo * x_lo + mn_hi * x_hi)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


@triton.jit
def matvec_q6_k_kernel(Y, W16, W8, X, BIAS, N, K, stride_x, stride_y, stride_b,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    # block (105 words): ql[128] (words 0..63), qh[64] (64..95), scales[16] int8 (96..103), d (104).
    # Value 128h + 32r + l (half h, quarter r, l < 32): low 4 bits from ql[64h + 32(r % 2) + l]
    # (low nibble for r < 2), high 2 bits from bits 2r.. of qh[32h + l], scale sc[8h + l // 16 + 2r]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    nblk = K // 256
    row_w = rows.to(tl.int64)[:, None] * (nblk * 105)
    b = tl.arange(0, NB)
    h = tl.arange(0, 2)
    w = tl.arange(0, 8)
    k = tl.arange(0, 2)
    acc = tl.zeros([BLOCK_N, NB, 2], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        ok = (rows[:, None] < N) & (blk[None, :] < nblk)
        base = row_w + blk[None, :] * 105
        ok3 = ok[:, :, None]
        d = _f16_bits(tl.load(W16 + base + 104, mask=ok, other=0).to(tl.int32))[:, :, None]  # (BN, NB, 1)
        for g in tl.static_range(2):  # l // 16: which scale of a quarter
            wg = g * 8 + w  # word of the 16 that cover l = 2 * wg + k
            o4 = base[:, :, None, None] + 32 * h[None, None, :, None] + wg[None, None, None, :]  # (BN, NB, 2, 8)
            m4 = ok3[:, :, :, None]
            ql_a = tl.load(W16 + o4, mask=m4, other=0).to(tl.int32)         # ql[64h + l]
            ql_b = tl.load(W16 + o4 + 16, mask=m4, other=0).to(tl.int32)    # ql[64h + 32 + l]
            qh = tl.load(W16 + o4 + 64 - 16 * h[None, None, :, None], mask=m4, other=0).to(tl.int32)  # qh[32h + l]
            sh = (8 * k)[None, None, None, None, :]
            a = ql_a[:, :, :, :, None] >> sh  # (BN, NB, 2, 8, 2): byte k in the low 8 bits
            bb = ql_b[:, :, :, :, None] >> sh
            hb = qh[:, :, :, :, None] >> sh
            xo = blk[:, None, None, None] * 256 + 128 * h[None, :, None, None] + 2 * wg[None, None, :, None] \
                + k[None, None, None, :]  # (NB, 2, 8, 2)
            xm = (blk < nblk)[:, None, None, None]
            sb = base.to(tl.int64)[:, :, None] * 2 + 192 + 8 * h[None, None, :] + g  # byte of sc[8h + g]
            for r in tl.static_range(4):
                if r == 0:
                    q = (a & 15) | ((hb << 4) & 48)
                elif r == 1:
                    q = (bb & 15) | ((hb << 2) & 48)
                elif r == 2:
                    q = ((a >> 4) & 15) | (hb & 48)
                else:
                    q = ((bb >> 4) & 15) | ((hb >> 2) & 48)
                x = tl.load(X + t * stride_x + xo + 32 * r, mask=xm, other=0.0)
                s = tl.sum(tl.sum(_small_int(q, 32) * x[None], axis=4), axis=3)  # (BN, NB, 2)
                sc = tl.load(W8 + sb + 2 * r, mask=ok3, other=0).to(tl.float32)
                acc += d * sc * s
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + t * stride_b + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


# type -> (kernel, (block_n, blocks per step) on a GPU, under the interpreter)
WIDE = {Q4_0: (matvec_q4_0_kernel, (8, 16), (64, 32)), Q8_0: (matvec_q8_0_kernel, (8, 8), (64, 32)),
        Q4_K: (matvec_q4_k_kernel, (4, 2), (64, 4)), Q6_K: (matvec_q6_k_kernel, (4, 2), (64, 4))}
WIDE_ENV = "SEPEDGE_TRITON_MATVEC"  # "bytes": the byte-wise kernel for every type (benchmarks compare them)
WIDE_FAILED: dict = {}  # type -> why its wide-word kernel did not run here (then the byte-wise one does)
TUNE_ENV = "SEPEDGE_TRITON_TUNE"    # "0": the fixed tiles of WIDE on the GPU too
# (block_n, blocks per step, warps) tried for model-sized weights on a GPU, per block length: rows
# and blocks per step set the bytes in flight; the best depends on the GPU (triton.autotune, once
# per weight shape and process)
TUNE_CONFIGS = {32: [(4, 16, 4), (8, 16, 4), (8, 32, 4), (16, 16, 8)],
                256: [(4, 2, 4), (8, 2, 4), (4, 4, 4), (8, 4, 8)]}
TUNE_MIN_SIZE = 1 << 22  # values of a weight worth tuning for
_tuned: dict = {}


def _autotuned(qtype: int):
    if qtype not in _tuned:
        configs = [triton.Config({"BLOCK_N": bn, "NB": nb}, num_warps=warps)
                   for bn, nb, warps in TUNE_CONFIGS[BLOCKS[qtype][0]]]
        _tuned[qtype] = triton.autotune(configs=configs, key=["N", "K", "HAS_BIAS"])(WIDE[qtype][0])
    return _tuned[qtype]


def _matvec_wide(w, qtype, x, bias, stride_b, y, block_n, nb):
    T, K = x.shape
    N = w.shape[0]
    kernel, gpu, interp = WIDE[qtype]
    n_blocks = K // BLOCKS[qtype][0]
    tune = (x.is_cuda and block_n is None and nb is None and N * K >= TUNE_MIN_SIZE and os.environ.get(TUNE_ENV) != "0"
            and n_blocks >= max(c[1] for c in TUNE_CONFIGS[BLOCKS[qtype][0]]))
    b = bias if bias is not None else y
    if qtype == Q4_K:
        args = (y, w.view(torch.int32), x, b, N, K, x.stride(0), y.stride(0), stride_b)
    elif qtype == Q6_K:
        args = (y, w.view(torch.int16), w.view(torch.int8), x, b, N, K, x.stride(0), y.stride(0), stride_b)
    else:
        args = (y, w.view(torch.int16), x, b, N, K, x.stride(0), y.stride(0), stride_b)
    if tune:
        _autotuned(qtype)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), T)](*args, HAS_BIAS=bias is not None)
        return y
    block_n, nb = block_n or (gpu if x.is_cuda else interp)[0], nb or (gpu if x.is_cuda else interp)[1]
    nb = min(nb, triton.next_power_of_2(n_blocks))
    kernel[(triton.cdiv(N, block_n), T)](*args, HAS_BIAS=bias is not None, BLOCK_N=block_n, NB=nb)
    return y


def matvec(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           block_n: int | None = None, block_k: int | None = None, wide: bool | None = None,
           res: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) (+ res) for decode.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (T, K) float; bias: (N,) float32 or None;
    res: (T, N) float32 or None, a residual added in the epilogue (the block's `x + proj`, without a
    launch of its own) -> (T, N) float32. One program per BLOCK_N rows and activation row, block_k
    values (at least one block) per step. wide: the wide-word kernel (Q4_0, Q8_0, Q4_K, Q6_K; the
    default unless $SEPEDGE_TRITON_MATVEC is "bytes"), False: the byte-wise one every type has."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    if res is not None:
        assert res.shape == (T, N) and res.dtype == torch.float32 and res.stride(1) == 1
        if bias is not None:  # one epilogue term: fold the bias into the residual
            res, bias = res + bias, None
    add, stride_b = (res, res.stride(0)) if res is not None else (bias, 0)
    env_bytes = os.environ.get(WIDE_ENV, "") == "bytes"
    if qtype in WIDE and (wide is True or (wide is None and not env_bytes and qtype not in WIDE_FAILED)):
        xf = x.float() if x.dtype != torch.float32 else x
        nb = None if block_k is None else max(1, block_k // BLOCKS[qtype][0])
        if wide is True:
            return _matvec_wide(w, qtype, xf, add, stride_b, y, block_n, nb)
        try:  # the default: a wide kernel that does not compile here leaves the byte-wise one, said aloud
            return _matvec_wide(w, qtype, xf, add, stride_b, y, block_n, nb)
        except (triton.CompilationError, triton.runtime.errors.OutOfResources) as e:
            WIDE_FAILED[qtype] = f"{type(e).__name__}: {e}"  # benchmarks report it
            print(f"sepedge.kernels: the wide-word matvec of type {qtype} failed here, the byte-wise one runs: {e}",
                  file=sys.stderr)
    QK, SUBS, RUN = LAYOUT[qtype]
    if block_k is None:  # the best of a sweep on the H200 (benchmarks/results/triton_sweep.md)
        block_k = 1024 if QK == 32 else 512
    # many small programs fill a GPU; the interpreter runs one program at a time in Python, so fewer
    block_n = block_n or (4 if x.is_cuda else min(256, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, block_n), T)
    matvec_kernel[grid](y, weight_view(w, qtype), x, add if add is not None else y, N, K, x.stride(0), y.stride(0),
                        stride_b, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=add is not None, BLOCK_N=block_n,
                        NB=max(1, min(block_k, triton.next_power_of_2(K)) // QK))  # short rows: no padding
    return y


def matvec_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
               res: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_ref(w, qtype, x.shape[1]).T
    y = y if bias is None else y + bias
    return y if res is None else y + res
