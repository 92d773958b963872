"""Prefill products: Y = X W^T on tensor cores (tl.dot) over weight tiles decoded in registers.

Each program owns a BLOCK_M x BLOCK_N output tile. Quantized weights take 8-bit activations
(act_q8.py): per 32 values an int8 tl.dot of the codes, then the block scales on a float32
accumulator (llama.cpp's mmq; the CPU core's arithmetic). The common types read their codes from the
repacked weight (packed.py) as whole vectors, several blocks of 32 per loop step; the others byte by
byte from the file's blocks. Long prefill chunks of the repacked types take half-precision rows
instead (act_f16.py) and a float16 tl.dot over weight tiles decoded in registers, 64-128 values per
step (matmul_f16_kernel: the tensor cores' own pace, no per-32 rescale); chunks of DQ_MIN_ROWS rows
or more decode each weight once to a plain float16 matrix first (dequant_f16_kernel, the same decoder)
and take the same kernel's plain-float16 variant (matmul_dq: no decoding in the GEMM's loop, where it
is repeated for every M tile). Float weights: F16/BF16
tiles with half operands and float32 sums, F32 with float32 operands.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .act_f16 import ActF16
from .act_q8 import Act, act_q8
from .packed import PACKED_TYPES, Packed, dequantize_packed_ref, pack
from .quants import (BF16, BLOCKS, F16, F32, LAYOUT, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, codes_tile, dequant_tile,
                     dequantize_ref, row_bytes, weight_view)


@triton.jit
def matmul_kernel(
    Y, W, X, BIAS,  # pointers
    M, N, K,  # X (M, K), W (N, K) logical, Y (M, N)
    stride_xm, stride_ym, stride_b,  # stride_b: 0 for a bias, a row's for a residual
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr,  # quants.LAYOUT
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K: whole blocks
):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)  # neighbouring programs share the activation tile and walk the weight
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    NB: tl.constexpr = BLOCK_K // QK
    blocks = tl.arange(0, NB)[None, :, None, None]
    sub = tl.arange(0, SUBS)[None, None, :, None]
    l = tl.arange(0, RUN)[None, None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # (rows, blocks, runs, values) decoded with one scale load per run, then flattened for tl.dot
        w = dequant_tile(W, offs_n[:, None, None, None], k0 // QK + blocks, sub, l, N, K, QTYPE, QK, RUN)
        w = tl.reshape(w, [BLOCK_N, BLOCK_K])
        if QTYPE == 0:  # F32 weights: float32 operands, full precision
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_m[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def matmul_q8_kernel(
    Y, W, XQ, XD, XS, ADD,  # pointers: XQ/XD/XS the 8-bit activations (act_q8.py)
    M, N, K,
    stride_ym, stride_b,
    QTYPE: tl.constexpr, QK: tl.constexpr, RUN: tl.constexpr, HAS_MIN: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Quantized weights times 8-bit activations, as llama.cpp's mmq: per 32 values an integer tl.dot
    of activation codes and weight codes (int8 tensor cores, exact int32 sums), then the run's weight
    scale times the activation block's scale (and the min times d_x * sum) on the float32
    accumulator: the CPU core's per-block arithmetic, and nothing is ever held in half precision."""
    pid_n = tl.program_id(0)  # neighbouring programs share the activation tile and walk the weight
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    l = tl.arange(0, 32)
    nq = K // 32
    mm = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, nq):
        xq = tl.load(XQ + offs_m[:, None].to(tl.int64) * K + c * 32 + l[None, :], mask=mm[:, None], other=0)
        dx = tl.load(XD + offs_m.to(tl.int64) * nq + c, mask=mm, other=0.0)[:, None]
        blk = c * 32 // QK + tl.zeros([1, 1], dtype=tl.int32)  # a tensor (the interpreter wants tensor masks)
        if RUN == 32:
            q, scale, mn = codes_tile(W, offs_n[:, None], blk, (c * 32 % QK) // 32, l[None, :], N, K, QTYPE, QK, RUN)
            s = tl.dot(xq, tl.trans(q.to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            acc += (tl.reshape(scale, [1, BLOCK_N]) * dx) * s
            if HAS_MIN:
                sx = tl.load(XS + offs_m.to(tl.int64) * nq + c, mask=mm, other=0.0)[:, None]
                acc -= tl.reshape(mn, [1, BLOCK_N]) * sx
        else:  # runs of 16 (Q6_K): two scales per 32 values, one integer product each
            sub = (c * 32 % QK) // 16 + l[None, :] // 16
            q, scale, mn = codes_tile(W, offs_n[:, None], blk, sub, l[None, :] % 16, N, K, QTYPE, QK, RUN)
            first = l[None, :] < 16
            sa = tl.dot(xq, tl.trans(tl.where(first, q, 0).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            sb = tl.dot(xq, tl.trans(tl.where(first, 0, q).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            scale_a = tl.reshape(tl.sum(tl.where(l[None, :] == 0, scale, 0.0), axis=1), [1, BLOCK_N])
            scale_b = tl.reshape(tl.sum(tl.where(l[None, :] == 16, scale, 0.0), axis=1), [1, BLOCK_N])
            acc += (scale_a * dx) * sa
            acc += (scale_b * dx) * sb
    if HAS_ADD:
        acc += tl.load(ADD + offs_m[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _f16_bits(v):
    """The IEEE half in the low 16 bits of an int32, as float32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _codes32(QS, QH, rows, rm, c, stride_qs, stride_qh, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes of the 8-bit block c (values 32c..32c+31) of a repacked weight's rows (BLOCK_N,) as an
    int8 (BLOCK_N, 32) tile read as whole 16/32-byte vectors (QS, QH: the code arrays as bytes), in
    the order its activation tile must take: Q4_0 keeps the file's order of a block's bytes, so its
    tile interleaves values i and i + 16 (see _acts32); the others are in value order. Q4_K: codes
    0..15 (its min applies per run); Q6_K: signed codes (runs of 16 share a scale)."""
    r = rows.to(tl.int64)[:, None]
    ok = rm[:, None]
    if QTYPE == 2:  # Q4_0: 16 bytes a block, value i low, i + 16 high
        b = tl.load(QS + r * stride_qs + c * 16 + tl.arange(0, 16)[None, :], mask=ok, other=0).to(tl.int32)
        lo, hi = (b & 15) - 8, (b >> 4) - 8
        return tl.reshape(tl.join(lo, hi), [BLOCK_N, 32]).to(tl.int8)
    elif QTYPE == 8:  # Q8_0: 32 int8 a block
        return tl.load(QS + r * stride_qs + c * 32 + tl.arange(0, 32)[None, :], mask=ok, other=0).to(tl.int8)
    elif QTYPE == 12:  # Q4_K: run j = c % 8 of block c // 8: bytes 32 (j // 2) + i, low nibble for even j
        j = c % 8
        b = tl.load(QS + r * stride_qs + (c // 8) * 128 + 32 * (j // 2) + tl.arange(0, 32)[None, :], mask=ok,
                    other=0).to(tl.int32)
        return ((b >> (4 * (j % 2))) & 15).to(tl.int8)
    else:  # Q6_K: values 32jj + l of block c // 8, jj = c % 8 = 4h + r: ql[64h + 32(r % 2) + l], qh[32h + l]
        tl.static_assert(QTYPE == 14, "repacked types only")
        jj = c % 8
        h = jj // 4
        rr = jj % 4
        lo = tl.load(QS + r * stride_qs + (c // 8) * 128 + 64 * h + 32 * (rr % 2) + tl.arange(0, 32)[None, :],
                     mask=ok, other=0).to(tl.int32)
        hb = tl.load(QH + r * stride_qh + (c // 8) * 64 + 32 * h + tl.arange(0, 32)[None, :], mask=ok,
                     other=0).to(tl.int32)
        q = ((lo >> (4 * (rr // 2))) & 15) | (((hb >> (2 * rr)) & 3) << 4)
        return (q - 32).to(tl.int8)


@triton.jit
def _acts32(XQ, offs_m, mm, c, K, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The activation codes of 8-bit block c (BLOCK_M, 32) int8, in the order of _codes32's tile."""
    base = XQ + offs_m.to(tl.int64)[:, None] * K + c * 32
    if QTYPE == 2:
        lo = tl.load(base + tl.arange(0, 16)[None, :], mask=mm[:, None], other=0)
        hi = tl.load(base + 16 + tl.arange(0, 16)[None, :], mask=mm[:, None], other=0)
        return tl.reshape(tl.join(lo, hi), [BLOCK_M, 32])
    else:
        return tl.load(base + tl.arange(0, 32)[None, :], mask=mm[:, None], other=0)


@triton.jit
def matmul_packed_kernel(
    Y, QS, QH, SC, D, XQ, XD, XS, ADD,  # QS, QH: code arrays as bytes; SC, D as packed.py keeps them
    M, N, K,
    stride_qs, stride_qh, stride_sc, stride_d, stride_ym, stride_b,
    M_KEY,  # unused: a power of two of M, the autotuning key
    QTYPE: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KSUB: tl.constexpr,  # KSUB 8-bit blocks per loop step
):
    """Repacked weights (packed.py) times 8-bit activations, as matmul_q8_kernel (llama.cpp's mmq: an
    int8 tl.dot per 32 values, the scales on a float32 accumulator) with the codes read as whole
    vectors and KSUB blocks of 32 per step (their loads issued together)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    nm = offs_n < N
    rn = offs_n.to(tl.int64)
    nq = K // 32
    l = tl.arange(0, 32)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, nq, KSUB):
        for u in tl.static_range(KSUB):
            c = c0 + u
            cm = (c + tl.zeros([1], dtype=tl.int32)) < nq  # a tensor (the interpreter wants tensor masks)
            w = _codes32(QS, QH, offs_n, nm & cm, c, stride_qs, stride_qh, QTYPE, BLOCK_N)
            xq = _acts32(XQ, offs_m, mm & cm, c, K, QTYPE, BLOCK_M)
            dx = tl.load(XD + offs_m.to(tl.int64) * nq + c, mask=mm & cm, other=0.0)[:, None]
            if QTYPE == 14:  # Q6_K: runs of 16, two scales per 32 values: one integer product each
                first = l < 16
                sa = tl.dot(xq, tl.trans(tl.where(first, w, 0).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
                sb = tl.dot(xq, tl.trans(tl.where(first, 0, w).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
                sidx = (c // 8) * 16 + 2 * (c % 8)  # sc[8h + 2r + g] with 4h + r = c % 8
                d = tl.load(D + rn * stride_d + c // 8, mask=nm & cm, other=0.0).to(tl.float32)
                sc_a = tl.load(SC + rn * stride_sc + sidx, mask=nm & cm, other=0).to(tl.float32)
                sc_b = tl.load(SC + rn * stride_sc + sidx + 1, mask=nm & cm, other=0).to(tl.float32)
                acc += ((d * sc_a)[None, :] * dx) * sa
                acc += ((d * sc_b)[None, :] * dx) * sb
            else:
                s = tl.dot(xq, tl.trans(w), out_dtype=tl.int32).to(tl.float32)
                if QTYPE == 12:  # Q4_K: d * scale, dmin * min of run c % 8
                    dd = tl.load(D + rn * stride_d + c // 8, mask=nm & cm, other=0)
                    sm = tl.load(SC + rn * stride_sc + c // 2, mask=nm & cm, other=0)
                    sh = 16 * (c % 2)
                    scale = _f16_bits(dd) * ((sm >> sh) & 255).to(tl.float32)
                    mn = _f16_bits(dd >> 16) * ((sm >> (sh + 8)) & 255).to(tl.float32)
                    sx = tl.load(XS + offs_m.to(tl.int64) * nq + c, mask=mm & cm, other=0.0)[:, None]
                    acc += (scale[None, :] * dx) * s - mn[None, :] * sx
                else:
                    d = tl.load(D + rn * stride_d + c, mask=nm & cm, other=0.0).to(tl.float32)
                    acc += (d[None, :] * dx) * s
    if HAS_ADD:
        acc += tl.load(ADD + offs_m[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                       mask=mm[:, None] & nm[None, :], other=0.0)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc, mask=mm[:, None] & nm[None, :])



@triton.jit
def _q6_codes(lo, hb, rr, GPU: tl.constexpr):
    """u = q + 32 in each byte of a Q6_K word: 4 low bits from ql's nibble (the high one for runs rr = 2, 3),
    2 high from qh's bits 2rr, 2rr + 1: on a GPU qh's bits placed by one rotation (shf.l.wrap by 4 - 2rr:
    bits 8k + 2rr, 8k + 2rr + 1 to 8k + 4, 8k + 5; what wraps around lands where the masks clear it), then
    one select and one mask; shifts and masks elsewhere (the sign-filled top of an arithmetic shift is
    masked off)."""
    if GPU:
        lo, hb = tl.broadcast(lo, hb)
        s = (4 * (rr // 2)) + tl.zeros_like(lo)
        rot = ((4 - 2 * rr) & 31) + tl.zeros_like(lo)
        u = tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; shr.b32 a, $1, $3; shf.l.wrap.b32 b, $2, $2, $4; "
            "lop3.b32 a, a, b, 0x0F0F0F0F, 0xE4; and.b32 $0, a, 0x3F3F3F3F; }",
            "=r,r,r,r,r", [lo, hb, s, rot], dtype=tl.int32, is_pure=True, pack=1)
    else:
        u = ((lo >> (4 * (rr // 2))) & 0x0F0F0F0F) | (((hb >> (2 * rr)) & 0x03030303) << 4)
    return u


@triton.jit
def _join4(w0, w1, w2, w3):
    """(..., 4) of four tiles in byte order: w_b of the code in byte b of a word."""
    return tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [..., j, k] = byte 2j + k


@triton.jit
def _dequant_f16_words(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d,
                       QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPU: tl.constexpr):
    """_dequant_f16's decoder 3 of Q4_K and Q6_K tiles (SEPEDGE_TRITON_F16_DECODE, the default): the code
    arrays read as int32 words (QS, QH: packed.py's int32 arrays; strides in words), the float16 values of
    decoder 1: the codes of four values are formed in one word with shifts and masks (SWAR), then each
    code is extracted to an int32 and converted to float32 (exact; on sm_90 a 32-bit source converts with
    I2FP, where decoder 1's 8/16-bit sources took I2F: 1.08x pp512 on an H200).
    Q6_K folds the code's offset into one fma of ds = d * sc (exact: 11 + 7 significant bits):
    u * ds - 32 * ds, u = q + 32, where u * ds (6 + 18 bits at most), 32 * ds and the result q * ds
    (5 + 18 bits) are exact in float32, so the fma's one rounding leaves q * ds exact, as decoder 1's
    product was: the same value, then the same rounding to float16 (a zero code gives +0 where decoder 1
    gave -0 for a negative scale, which no sum can see). Q4_K keeps decoder 1's expression
    q * (d * sc) - dmin * m on the same exact float32 q, so its product and difference (one fma when
    Triton's FP fusion is on, as for decoder 1) round as before."""
    r = offs_n.to(tl.int64)[:, None, None, None]
    ok = nm[:, None, None, None]
    # BLOCK_K divides the 256-value block (the launchers' tiles) and K is whole blocks: a tile never
    # crosses K (no K mask), and each index below is a scalar of k0 (once a step) plus a tensor that does
    # not change in the loop (computed once), where c // 8, c % 8 of a per-value c cost integer work a value
    sb = k0 // 256
    if QTYPE == 12:  # Q4_K: chunk c's 8 words, value 64c + 4i + b in the low nibble of byte b of word i
        NC: tl.constexpr = BLOCK_K // 64
        c = k0 // 64 + tl.arange(0, NC)[None, :, None, None]
        hi = tl.arange(0, 2)[None, None, :, None]
        i = tl.arange(0, 8)[None, None, None, :]
        b = tl.load(QS + r * stride_qs + c * 8 + i, mask=ok, other=0)  # (rows, chunks, 1, words)
        t = b >> (4 * hi)  # the run's nibbles at the bottom of each byte (above them: garbage, masked)
        sc = tl.load(SC + r * stride_sc + c * 4 + 2 * hi, mask=ok, other=0).to(tl.float32)
        mn = tl.load(SC + r * stride_sc + c * 4 + 2 * hi + 1, mask=ok, other=0).to(tl.float32)
        dd = tl.load(D + r * stride_d + sb + tl.zeros([1, NC, 1, 1], dtype=tl.int32), mask=ok, other=0)
        dsc = _f16_bits(dd) * sc
        dmn = _f16_bits(dd >> 16) * mn
        # each nibble extracted to an int32 and converted (I2FP, a 32-bit source)
        w0 = ((t & 15).to(tl.float32) * dsc - dmn).to(tl.float16)
        w1 = (((t >> 8) & 15).to(tl.float32) * dsc - dmn).to(tl.float16)
        w2 = (((t >> 16) & 15).to(tl.float32) * dsc - dmn).to(tl.float16)
        w3 = (((t >> 24) & 15).to(tl.float32) * dsc - dmn).to(tl.float16)
    else:  # Q6_K: run jj = 4h + rr of block sb, 16-value group g: ql words 32sb + 16h + 8(rr % 2) + 4g + i,
        # qh words 16sb + 8h + 4g + i (value 16g + 4i + b of the run in byte b)
        tl.static_assert(QTYPE == 14, "Q4_K and Q6_K only")
        NB: tl.constexpr = BLOCK_K // 32
        n = tl.arange(0, NB)[None, :, None, None]
        g = tl.arange(0, 2)[None, None, :, None]
        i = tl.arange(0, 4)[None, None, None, :]
        # jj = j0 + n with j0 = (k0 % 256) // 32 a multiple of NB: h = j0 // 4 + n // 4 and rr = j0 % 4 + n % 4
        # (one of each pair is 0 for every NB dividing 8), and so are the parts of rr % 2 and rr // 2
        j0 = (k0 % 256) // 32
        hs = j0 // 4
        rs = j0 % 4
        hh = hs + n // 4
        rr = rs + n % 4
        lo = tl.load(QS + r * stride_qs + sb * 32 + 16 * hh + 8 * (rs % 2 + n % 2) + 4 * g + i, mask=ok, other=0)
        hb = tl.load(QH + r * stride_qh + sb * 16 + 8 * hh + 4 * g + i, mask=ok, other=0)
        u = _q6_codes(lo, hb, rr, GPU)  # q + 32 in each byte
        sc = tl.load(SC + r * stride_sc + sb * 16 + 2 * (j0 + n) + g, mask=ok, other=0).to(tl.float32)
        d = tl.load(D + r * stride_d + sb + tl.zeros([1, NB, 1, 1], dtype=tl.int32), mask=ok, other=0.0)
        ds = d.to(tl.float32) * sc  # exact: 11 + 7 significant bits
        k = ds * 32.0  # exact (see above): u * ds - 32 * ds in one fma is q * ds again
        w0 = tl.fma((u & 63).to(tl.float32), ds, -k).to(tl.float16)
        w1 = tl.fma(((u >> 8) & 63).to(tl.float32), ds, -k).to(tl.float16)
        w2 = tl.fma(((u >> 16) & 63).to(tl.float32), ds, -k).to(tl.float16)
        w3 = tl.fma(((u >> 24) & 63).to(tl.float32), ds, -k).to(tl.float16)
    return tl.reshape(_join4(w0, w1, w2, w3), [BLOCK_N, BLOCK_K])


@triton.jit
def _dequant_f16(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d,
                 QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DECODE: tl.constexpr = 1,
                 GPU: tl.constexpr = False):
    """Values k0..k0 + BLOCK_K - 1 of a repacked weight's rows offs_n as a float16 (BLOCK_N, BLOCK_K)
    tile (QTYPE F16: of a plain float16 (N, K) matrix in QS, loaded as it is), scales (and Q4_K's mins)
    applied: each code vector is loaded once as whole 16/32-byte runs
    and its nibbles picked by a broadcast shift (a (rows, blocks, halves, bytes) tile flattened in value
    order). Q4_0 and Q8_0 multiply in float16 (code x scale: one rounding, as in float32); Q4_K and
    Q6_K form d * sc * q - dmin * m in float32 and round once."""
    if DECODE == 3 and (QTYPE == 12 or QTYPE == 14):
        w = _dequant_f16_words(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d, QTYPE,
                               BLOCK_N, BLOCK_K, GPU)
    else:
        w = _dequant_f16_bytes(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d, QTYPE,
                               BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _dequant_f16_bytes(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d,
                       QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_dequant_f16's decoder 1 (SEPEDGE_TRITON_F16_DECODE; every type but Q4_K / Q6_K always): the code
    arrays read as bytes."""
    r = offs_n.to(tl.int64)[:, None, None, None]
    ok = nm[:, None, None, None]
    if QTYPE == 1:  # F16: QS is a plain (N, K) float16 matrix (dequantize_f16's output), the tile as it is
        kk = k0 + tl.arange(0, BLOCK_K)[None, :]
        w = tl.load(QS + offs_n.to(tl.int64)[:, None] * stride_qs + kk, mask=nm[:, None] & (kk < K), other=0.0)
    elif QTYPE == 2:  # Q4_0: block b's 16 bytes, value 32b + i low, 32b + 16 + i high
        NB: tl.constexpr = BLOCK_K // 32
        blk = k0 // 32 + tl.arange(0, NB)[None, :, None, None]
        hi = tl.arange(0, 2)[None, None, :, None]
        i = tl.arange(0, 16)[None, None, None, :]
        ok = ok & (blk < K // 32)
        b = tl.load(QS + r * stride_qs + blk * 16 + i, mask=ok, other=0).to(tl.int32)
        q = ((b >> (4 * hi)) & 15) - 8
        d = tl.load(D + r * stride_d + blk, mask=ok, other=0.0)
        w = q.to(tl.float16) * d
    elif QTYPE == 8:  # Q8_0: 32 int8 a block
        NB: tl.constexpr = BLOCK_K // 32
        blk = k0 // 32 + tl.arange(0, NB)[None, :, None, None]
        i = tl.arange(0, 32)[None, None, None, :]
        ok = ok & (blk < K // 32)
        b = tl.load(QS + r * stride_qs + blk * 32 + i, mask=ok, other=0).to(tl.int8)
        d = tl.load(D + r * stride_d + blk, mask=ok, other=0.0)
        w = b.to(tl.float16) * d
    elif QTYPE == 12:  # Q4_K: chunk c's 32 bytes, value 64c + i low (run 2c), 64c + 32 + i high (run 2c + 1)
        NC: tl.constexpr = BLOCK_K // 64
        c = k0 // 64 + tl.arange(0, NC)[None, :, None, None]
        hi = tl.arange(0, 2)[None, None, :, None]
        i = tl.arange(0, 32)[None, None, None, :]
        ok = ok & (c < K // 64)
        b = tl.load(QS + r * stride_qs + c * 32 + i, mask=ok, other=0).to(tl.int32)
        q = (b >> (4 * hi)) & 15
        sc = tl.load(SC + r * stride_sc + c * 4 + 2 * hi, mask=ok, other=0).to(tl.float32)  # bytes of packed.py
        mn = tl.load(SC + r * stride_sc + c * 4 + 2 * hi + 1, mask=ok, other=0).to(tl.float32)
        dd = tl.load(D + r * stride_d + c // 4, mask=ok, other=0)
        w = (q.to(tl.float32) * (_f16_bits(dd) * sc) - _f16_bits(dd >> 16) * mn).to(tl.float16)
    else:  # Q6_K: 32-value run jj = 4h + rr of block sb: ql[64h + 32(rr % 2) + l], qh[32h + l]; scale per 16
        tl.static_assert(QTYPE == 14, "repacked types only")
        NB: tl.constexpr = BLOCK_K // 32
        c = k0 // 32 + tl.arange(0, NB)[None, :, None, None]
        g = tl.arange(0, 2)[None, None, :, None]
        i = tl.arange(0, 16)[None, None, None, :]
        ok = ok & (c < K // 32)
        sb = c // 8
        jj = c % 8
        hh = jj // 4
        rr = jj % 4
        lo = tl.load(QS + r * stride_qs + sb * 128 + 64 * hh + 32 * (rr % 2) + 16 * g + i, mask=ok,
                     other=0).to(tl.int32)
        hb = tl.load(QH + r * stride_qh + sb * 64 + 32 * hh + 16 * g + i, mask=ok, other=0).to(tl.int32)
        q = (((lo >> (4 * (rr // 2))) & 15) | (((hb >> (2 * rr)) & 3) << 4)) - 32
        sc = tl.load(SC + r * stride_sc + sb * 16 + 2 * jj + g, mask=ok, other=0).to(tl.float32)
        d = tl.load(D + r * stride_d + sb, mask=ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) * (d * sc)).to(tl.float16)
    return tl.reshape(w, [BLOCK_N, BLOCK_K])


@triton.jit
def dequant_f16_kernel(
    OUT, QS, QH, SC, D,  # OUT: (N, K) float16; QS, QH, SC, D as matmul_f16_kernel takes them
    N, K, stride_qs, stride_qh, stride_sc, stride_d, stride_o,
    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DECODE: tl.constexpr = 1,
    GPU: tl.constexpr = False,
):
    """A repacked weight written out as a plain float16 (N, K) matrix, one (BLOCK_N, BLOCK_K) tile per
    program, by the prefill product's own decoder (_dequant_f16): the plain matrix holds exactly the
    values that product multiplies. Long prompt chunks decode each weight once per chunk here, then
    multiply with matmul_f16_kernel's plain-float16 variant (llama.cpp and the CUDA backend likewise
    dequantize to float16 before a GEMM of large batches)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    k0 = pid_k * BLOCK_K
    w = _dequant_f16(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d, QTYPE,
                     BLOCK_N, BLOCK_K, DECODE, GPU)
    kk = k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(OUT + offs_n.to(tl.int64)[:, None] * stride_o + kk, w, mask=nm[:, None] & (kk < K))


@triton.jit
def matmul_f16_kernel(
    Y, QS, QH, SC, D, XH, XS, ADD,  # QS, QH: code arrays as bytes; SC (Q4_K: as bytes), D as packed.py keeps them
    M, N, K,
    stride_qs, stride_qh, stride_sc, stride_d, stride_xh, stride_ym, stride_b,
    M_KEY,  # unused: a power of two of M, the autotuning key
    QTYPE: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DECODE: tl.constexpr = 1,
    GPU: tl.constexpr = False,
):
    """Repacked weights times half-precision rows (act_f16.py: rows s * h): per K tile the weight tile
    decoded to float16 in registers (scales folded in) and one float16 tl.dot of BLOCK_K values into a
    float32 accumulator, the row scales s applied once in the epilogue. The weight tile is the dot's
    first operand, so it goes from registers to the tensor cores (sm_90: wgmma with A in registers)
    while the activation tile streams through shared memory, software-pipelined over num_stages. The
    tile is (N, M): programs with neighbouring ids share a weight tile (each weight byte leaves
    memory about once)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    nm = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequant_f16(QS, QH, SC, D, offs_n, nm, k0, K, stride_qs, stride_qh, stride_sc, stride_d, QTYPE,
                         BLOCK_N, BLOCK_K, DECODE, GPU)
        x = tl.load(XH + offs_m[None, :].to(tl.int64) * stride_xh + (k0 + kk)[:, None],
                    mask=mm[None, :] & ((k0 + kk)[:, None] < K), other=0.0)
        acc = tl.dot(w, x, acc)
    acc = acc * tl.load(XS + offs_m, mask=mm, other=0.0)[None, :]
    om = offs_m[None, :].to(tl.int64)
    on = offs_n[:, None]
    if HAS_ADD:
        acc += tl.load(ADD + om * stride_b + on, mask=mm[None, :] & nm[:, None], other=0.0)
    tl.store(Y + om * stride_ym + on, acc, mask=mm[None, :] & nm[:, None])


FLOAT_TYPES = (F32, F16, BF16)
# (block_m, block_n, KSUB, warps) tried on a GPU for the repacked types (triton.autotune, once per
# shape and power of two of M, per process). Compiled for sm_90 (ptxas report): 128 x 128 tiles and
# KSUB 2 spill (255 registers and a stack) for the K-quants; the code and activation loads are
# software-pipelined (cp.async) by Triton anyway
TUNE_CONFIGS = [(64, 64, 1, 4), (128, 64, 1, 8), (64, 128, 1, 8)]
_tuned: dict = {}


def _autotuned():
    if "k" not in _tuned:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "KSUB": ks}, num_warps=w)
                   for bm, bn, ks, w in TUNE_CONFIGS]
        key = ["N", "K", "M_KEY", "QTYPE", "HAS_ADD"]
        _tuned["k"] = triton.autotune(configs=configs, key=key)(matmul_packed_kernel)
    return _tuned["k"]


def matmul_packed(p: Packed, xa: Act, add, stride_b: int, block_m: int | None = None,
                  block_n: int | None = None, ksub: int | None = None) -> torch.Tensor:
    """Y = X W^T (+ add) for a repacked weight and 8-bit activations: (M, N) float32."""
    M, K = xa.q.shape
    N = p.shape[0]
    dev = p.qs.device
    y = torch.empty(M, N, dtype=torch.float32, device=dev)
    if M == 0:
        return y
    qs = p.qs.view(torch.uint8)
    qh = p.qh.view(torch.uint8) if p.qh is not None else qs
    sc = p.sc if p.sc is not None else p.d
    args = (y, qs, qh, sc, p.d, xa.q, xa.d, xa.s, add if add is not None else y, M, N, K,
            qs.stride(0), qh.stride(0), sc.stride(0), p.d.stride(0), y.stride(0), stride_b)
    if dev.type == "cuda" and block_m is None and block_n is None and ksub is None:
        m_key = min(triton.next_power_of_2(M), 1024)
        _autotuned()[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](
            *args, m_key, QTYPE=p.qtype, HAS_ADD=add is not None)
        return y
    # the interpreter runs one program at a time in Python: few, large tiles there
    bm = block_m or min(64, max(16, triton.next_power_of_2(M)))
    bn = block_n or (64 if dev.type == "cuda" else min(256, max(16, triton.next_power_of_2(N))))
    ks = ksub or (1 if dev.type == "cuda" else 8)
    assert min(bm, bn) >= 16, "tl.dot needs tiles of at least 16"
    matmul_packed_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](*args, 0, QTYPE=p.qtype, HAS_ADD=add is not None,
                                                                   BLOCK_M=bm, BLOCK_N=bn, KSUB=ks)
    return y


# (block_n, block_m, block_k, warps, stages) tried on a GPU for the float16 kernel (triton.autotune, once per
# shape, type and power of two of M, per process): 128-256 x 128 output tiles, K tiles of 64-128, 3-4 stages
F16_TUNE_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                    (256, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
# types whose long prefill chunks take the float16 kernel (measured faster than the 8-bit one on the
# H200 at 512 rows: benchmarks/triton_prefill_sweep.py, triton_kernels.md), and from how many rows
F16_TYPES = (Q4_0, Q8_0, Q4_K, Q6_K)
F16_MIN_ROWS = 64


# (block_n, block_m, block_k, warps, stages) tried for the plain float16 weight of matmul_dq: both operands
# through shared memory (pipelined wgmma). Compiled for sm_90 (ptxas, 16-divisible strides as the JIT
# specializes them): 128 x 128 tiles with 8 warps take 185-194 registers and no spill; 256 x 128 and
# 128 x 256 spill (~460 bytes: the epilogue's pointers and residual)
DQ_TUNE_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4),
                   (64, 128, 64, 4, 4), (128, 128, 64, 8, 5)]
# chunks of this many rows or more into the F16_TYPES decode each weight once per product to float16
# (matmul_dq, a scratch of at most DQ_SCRATCH_BYTES) and multiply plain float16: the decoding leaves the
# GEMM's inner loop, where it is repeated for every M tile (SEPEDGE_TRITON_PREFILL=f16 keeps that route)
DQ_MIN_ROWS = 256
# the weight types whose long chunks take matmul_dq by default (the backend's SEPEDGE_TRITON_PREFILL=auto):
# measured on an H200 (8B, 512-token prompts), decoding once paid for Q4_K_M's K-quants (11.6K against
# 10.2K t/s in registers) and lost for Q4_0 (9.0K against 15.4K), whose in-register decoding is cheap
DQ_AUTO_TYPES = (Q4_K, Q6_K)
DQ_SCRATCH_BYTES = 256 << 20  # Llama-3-8B's fused gate/up (28672 x 4096, 235 MB) in one slice


# SEPEDGE_TRITON_F16_DECODE, read at every launch of matmul_f16 / dequantize_f16: the in-register decoder
# of Q4_K and Q6_K tiles. 1: the code arrays read as bytes, a code formed and converted (8/16-bit int ->
# float) per value (_dequant_f16_bytes: every other type's decoder too, and the A/B's baseline); 3, the
# default: read as int32 words, four codes formed per word (SWAR), each made a float by a 32-bit int ->
# float conversion (_dequant_f16_words): the same float16 values. Instructions of the K loop per value
# (sm_90 SASS, benchmarks/triton_ptxas.py --sass, first tile): Q6_K 18.4 / 11.6, Q4_K 11.6 / 9.3. Measured
# on an H200 (triton_kernels.md, session 11; 8B Q4_K_M pp512, f16 route, 3 interleaved runs,
# benchmarks/triton_profile.py --env SEPEDGE_TRITON_F16_DECODE --modes 1,2,3): 1 10,441 t/s, 2 11,261
# (1.079x), 3 11,305 (1.083x). Decoder 2 (the same words made floats through the float16 magic number
# 1024: Q6_K 10.3, Q4_K 8.9 instructions a value, but more inline PTX) was within the noise of 3 and is
# deleted; the words decoder keeps the number 3 so that the logs and settings of those measurements still
# mean what they meant (2 is now an error, as any other value).
F16_DECODE_ENV = "SEPEDGE_TRITON_F16_DECODE"


def f16_decode() -> int:
    """The decoder of Q4_K / Q6_K tiles the float16 launches take now (SEPEDGE_TRITON_F16_DECODE): 1 or 3."""
    v = os.environ.get(F16_DECODE_ENV, "3") or "3"
    if v not in ("1", "3"):
        raise ValueError(f"{F16_DECODE_ENV} must be 1 or 3, got {v!r}")
    return int(v)


# the tiles tried for decoder 3 (the int32 words): F16_TUNE_CONFIGS' first four (its 256 x 128 and 128 x 256
# tiles spill 428-720 bytes with every decoder) and two added for the words decoders' fewer registers while
# decoders 2 and 3 were both kept: K tiles of 256 (154-201 KB of shared memory: fewer steps, so less of each
# step's fixed work a value) and 128 x 128 x 128 with 4 stages (Q4_K's 163 KB of shared memory; Q6_K's 233 KB
# is over the H200's 227 KB, a tile the tuner skips). Decoder 3's registers there (sm_90, triton_ptxas.py
# --f16-decode 3): K tiles of 256 255, spilling 16 bytes (Q4_K) and 184 (Q6_K); 128 x 128 x 128 with 4
# stages 189 (Q4_K) and 231 (Q6_K), no spill; the first four 189-255, Q6_K's 128 x 64 x 128 spilling 8 bytes
F16_WORD_TUNE_CONFIGS = F16_TUNE_CONFIGS[:4] + [(128, 128, 256, 8, 2), (128, 128, 128, 8, 4)]


def _autotuned_f16(plain: bool, words: bool = False):
    """matmul_f16_kernel autotuned over DQ_TUNE_CONFIGS (plain: a float16 weight), F16_WORD_TUNE_CONFIGS
    (words: decoder 3) or F16_TUNE_CONFIGS."""
    name = "dq" if plain else ("f16w" if words else "f16")
    if name not in _tuned:
        table = DQ_TUNE_CONFIGS if plain else (F16_WORD_TUNE_CONFIGS if words else F16_TUNE_CONFIGS)
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bn, bm, bk, w, st in table]
        key = ["N", "K", "M_KEY", "QTYPE", "HAS_ADD", "DECODE"]
        _tuned[name] = triton.autotune(configs=configs, key=key)(matmul_f16_kernel)
    return _tuned[name]


def _f16_operand(p, decode: int = 1) -> tuple:
    """(QTYPE, QS, QH, SC, D, DECODE) of matmul_f16_kernel / dequant_f16_kernel for a repacked weight, or
    for a plain float16 (N, K) matrix (QTYPE F16: QS is the matrix; the other pointers unused). decode
    3 (Q4_K, Q6_K): the code arrays as packed.py's int32 words; otherwise as bytes, and DECODE 1."""
    if decode not in (1, 3):
        raise ValueError(f"the float16 tile decoder is 1 (bytes) or 3 (int32 words), got {decode!r}")
    if isinstance(p, torch.Tensor):
        assert p.dtype == torch.float16 and p.dim() == 2 and p.stride(1) == 1, "a plain weight is (N, K) float16"
        return F16, p, p, p, p, 1
    words = decode == 3 and p.qtype in (Q4_K, Q6_K)
    qs = p.qs if words else p.qs.view(torch.uint8)
    qh = (p.qh if words else p.qh.view(torch.uint8)) if p.qh is not None else qs
    sc = p.sc if p.sc is not None else p.d
    if p.qtype == Q4_K:
        sc = sc.view(torch.uint8)  # its scale and min bytes, one load each
    return p.qtype, qs, qh, sc, p.d, decode if words else 1


def matmul_f16(p, xh: ActF16, add, stride_b: int, block_n: int | None = None, block_m: int | None = None,
               block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               out: torch.Tensor | None = None, decode: int | None = None) -> torch.Tensor:
    """Y = X W^T (+ add) for a repacked weight (or a plain float16 (N, K) matrix) and half-precision
    rows: (M, N) float32, into out (an (M, N) float32 view with unit column stride) when given. decode:
    the Q4_K / Q6_K tile decoder (1 or 3; None: SEPEDGE_TRITON_F16_DECODE's)."""
    M, K = xh.h.shape
    N = p.shape[0]
    assert p.shape[1] == K, "the weight's K does not match the rows"
    qtype, qs, qh, sc, d, dec = _f16_operand(p, f16_decode() if decode is None else decode)
    dev = qs.device
    y = out if out is not None else torch.empty(M, N, dtype=torch.float32, device=dev)
    assert y.shape == (M, N) and y.stride(1) == 1
    if M == 0:
        return y
    assert xh.h.stride(1) == 1 and xh.h.dtype == torch.float16
    args = (y, qs, qh, sc, d, xh.h, xh.s, add if add is not None else y, M, N, K,
            qs.stride(0), qh.stride(0), sc.stride(0), d.stride(0), xh.h.stride(0), y.stride(0), stride_b)
    if dev.type == "cuda" and block_n is None and block_m is None and block_k is None:
        m_key = min(triton.next_power_of_2(M), 1024)
        kern = _autotuned_f16(qtype == F16, dec == 3)
        kern[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
            *args, m_key, QTYPE=qtype, HAS_ADD=add is not None, DECODE=dec, GPU=True)
        return y
    # the interpreter runs one program at a time in Python: few, large tiles there
    bm = block_m or (128 if dev.type == "cuda" else min(64, max(16, triton.next_power_of_2(M))))
    bn = block_n or (128 if dev.type == "cuda" else min(256, max(16, triton.next_power_of_2(N))))
    bk = block_k or (64 if dev.type == "cuda" else 256)
    bk = max(bk, {Q4_K: 64, F16: 16}.get(qtype, 32))
    if qtype in (Q4_K, Q6_K):
        bk = min(bk, 256)  # a divisor of the 256-value block
    assert min(bm, bn, bk) >= 16, "tl.dot needs tiles of at least 16"
    extra = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    matmul_f16_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, 0, QTYPE=qtype, HAS_ADD=add is not None,
                                                               BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, DECODE=dec,
                                                               GPU=dev.type == "cuda", **extra)
    return y


def dequantize_f16(p: Packed, out: torch.Tensor | None = None, block_n: int | None = None,
                   block_k: int | None = None, decode: int | None = None) -> torch.Tensor:
    """A repacked weight as a plain float16 (N, K) matrix (dequant_f16_kernel), written into the first
    N * K values of out (a contiguous float16 buffer) when given; decode as matmul_f16's."""
    N, K = p.shape
    qtype, qs, qh, sc, d, dec = _f16_operand(p, f16_decode() if decode is None else decode)
    assert qtype in F16_TYPES, "only the repacked types"
    if out is None:
        out = torch.empty(N * K, dtype=torch.float16, device=qs.device)
    assert out.dtype == torch.float16 and out.is_contiguous() and out.numel() >= N * K, "the buffer is too small"
    wf = out.reshape(-1)[:N * K].view(N, K)
    if N == 0:
        return wf
    cuda = qs.device.type == "cuda"
    # 32 rows x 256 values a program on a GPU (a memory-bound copy: 8 K of float16 written per program)
    bn = block_n or (32 if cuda else min(256, max(16, triton.next_power_of_2(N))))
    bk = block_k or 256
    bk = max(bk, 64 if qtype == Q4_K else 32)
    if qtype in (Q4_K, Q6_K):
        bk = min(bk, 256)  # a divisor of the 256-value block, as the product's decoder takes it
    dequant_f16_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        wf, qs, qh, sc, d, N, K, qs.stride(0), qh.stride(0), sc.stride(0), d.stride(0), wf.stride(0), QTYPE=qtype,
        BLOCK_N=bn, BLOCK_K=bk, DECODE=dec, GPU=cuda, num_warps=4)
    return wf


def dequantize_f16_ref(p: Packed) -> torch.Tensor:
    """The torch reference of dequantize_f16: the float32 values of the repacked weight, rounded to float16."""
    return dequantize_packed_ref(p).half()


def _rows(p: Packed, n0: int, n1: int) -> Packed:
    """Rows n0..n1 - 1 of a repacked weight (views of its arrays)."""
    return Packed(p.qtype, p.K, p.qs[n0:n1], p.d[n0:n1], None if p.sc is None else p.sc[n0:n1],
                  None if p.qh is None else p.qh[n0:n1])


def dq_scratch_values(ps) -> int:
    """The float16 values of a scratch buffer that serves every weight of ps (repacked weights) in
    matmul_dq: the largest weight, capped at DQ_SCRATCH_BYTES (larger weights go through in row slices)."""
    largest = max((p.shape[0] * p.shape[1] for p in ps), default=0)
    return min(largest, DQ_SCRATCH_BYTES // 2)


def matmul_dq(p: Packed, xh: ActF16, add, stride_b: int, scratch: torch.Tensor | None = None,
              **blocks) -> torch.Tensor:
    """Y = X W^T (+ add) for long chunks: the weight decoded once to float16 (dequantize_f16) into
    scratch, then the plain-float16 product (matmul_f16_kernel with QTYPE F16), in slices of as many
    rows as scratch holds. (M, N) float32."""
    N, K = p.shape
    M = xh.h.shape[0]
    dev = p.qs.device
    y = torch.empty(M, N, dtype=torch.float32, device=dev)
    if M == 0 or N == 0:
        return y
    if scratch is None:
        scratch = torch.empty(dq_scratch_values([p]), dtype=torch.float16, device=dev)
    rows = min(N, scratch.numel() // K)
    assert rows > 0, "the scratch buffer holds no row of the weight"
    if rows < N and rows >= 256:
        rows -= rows % 256  # slices of whole output tiles
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        wf = dequantize_f16(_rows(p, n0, n1), scratch)
        part = None if add is None else (add[n0:n1] if stride_b == 0 else add[:, n0:n1])
        matmul_f16(wf, xh, part, stride_b, out=y[:, n0:n1], **blocks)
    return y


def matmul(w, qtype: int, x, bias: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
           res: torch.Tensor | None = None, packed: bool | None = None,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X @ W.T (+ bias) (+ res) for prefill.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight, or its packed.Packed form; x: (M, K) float
    rows or their act_q8 form (quantized weights take the 8-bit form, made here from float rows; float
    weights the float rows), or their act_f16 form (repacked types: the float16 kernel); bias: (N,)
    float32 or None; res: (M, N) float32 or None, added in the epilogue -> (M, N) float32. Block
    sizes are at least 16 (tl.dot); block_k (float weights) is raised to a whole block, (repacked
    weights: 8-bit rows) is the values per loop step, (half-precision rows) the K tile. packed: the repacked
    weight's kernel (the default for the types packed.py repacks, file bytes repacked here; False:
    the byte-wise kernel on the file's bytes). scratch: with half-precision rows, decode the weight once
    to float16 into this contiguous float16 buffer and multiply plain float16 (matmul_dq)."""
    M, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert isinstance(w, Packed) or w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    dev = w.qs.device if isinstance(w, Packed) else w.device
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    if res is not None:
        assert res.shape == (M, N) and res.dtype == torch.float32 and res.stride(1) == 1
        if bias is not None:  # one epilogue term: fold the bias into the residual
            res, bias = res + bias, None
    add, stride_b = (res, res.stride(0)) if res is not None else (bias, 0)
    if packed is None:
        packed = isinstance(w, Packed) or qtype in PACKED_TYPES
    if isinstance(x, ActF16):  # half-precision rows: the float16 kernel of repacked weights
        assert qtype in PACKED_TYPES and packed is not False, "half-precision rows need a repacked type"
        p = w if isinstance(w, Packed) else pack(w, qtype, K)
        assert p.qtype == qtype and p.K == K, "the packed weight does not match the type and K"
        if scratch is not None:
            return matmul_dq(p, x, add, stride_b, scratch, block_n=block_n, block_m=block_m, block_k=block_k)
        return matmul_f16(p, x, add, stride_b, block_n, block_m, block_k)
    if packed:
        xa = x if isinstance(x, Act) else act_q8(x)
        p = w if isinstance(w, Packed) else pack(w, qtype, K)
        assert p.qtype == qtype and p.K == K, "the packed weight does not match the type and K"
        return matmul_packed(p, xa, add, stride_b, block_m, block_n, None if block_k is None else max(1, block_k // 32))
    assert not isinstance(w, Packed), "the byte-wise kernels read the file's bytes"
    y = torch.empty(M, N, dtype=torch.float32, device=dev)
    if M == 0:
        return y
    QK, SUBS, RUN = LAYOUT[qtype]
    if qtype not in FLOAT_TYPES:
        xa = x if isinstance(x, Act) else act_q8(x)
        # the interpreter runs one program at a time in Python: few, large tiles there
        block_m = block_m or min(64, max(16, triton.next_power_of_2(M)))  # short chunks: less padding
        block_n = block_n or (64 if w.is_cuda else min(256, max(16, triton.next_power_of_2(N))))
        assert min(block_m, block_n) >= 16, "tl.dot needs tiles of at least 16"
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
        matmul_q8_kernel[grid](y, weight_view(w, qtype), xa.q, xa.d, xa.s, add if add is not None else y, M, N, K,
                               y.stride(0), stride_b, QTYPE=qtype, QK=QK, RUN=RUN,
                               HAS_MIN=qtype in (Q4_1, Q4_K, Q5_K), HAS_ADD=add is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n)
        return y
    if isinstance(x, Act):
        assert x.f is not None, "a float weight needs the float activations"
        x = x.f
    x = x.contiguous()
    block_k = max(block_k or (64 if x.is_cuda else 256), QK)  # whole blocks per step
    block_m = block_m or min(128, max(16, triton.next_power_of_2(M)))
    block_n = block_n or 128
    assert min(block_m, block_n, block_k) >= 16, "tl.dot needs tiles of at least 16"
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    matmul_kernel[grid](y, weight_view(w, qtype), x, add if add is not None else y, M, N, K, x.stride(0),
                        y.stride(0), stride_b, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=add is not None,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def matmul_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
               upcast: bool = True, res: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float32 (upcast) or with the kernel's half-precision operands; w: file bytes or
    Packed."""
    wf = dequantize_packed_ref(w) if isinstance(w, Packed) else dequantize_ref(w, qtype, x.shape[1])
    if not upcast and qtype != F32:
        x, wf = x.half().float(), wf.half().float()
    y = x.float() @ wf.T
    y = y if bias is None else y + bias
    return y if res is None else y + res
