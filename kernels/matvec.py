"""Decode products: y = W x for a few activation rows, W read once per row block as its quantized bytes
and decoded in registers (no float copy of the weight exists anywhere).

Decode is bound by the weight bytes: each program owns BLOCK_N output rows and streams their bytes.
Quantized weights take 8-bit activations (act_q8.py) and sum codes in integers per run, as the CPU
core and llama.cpp's mmvq do (the same arithmetic, so the same greedy text as the CPU engine); the
common types (Q4_0, Q8_0, Q4_K, Q6_K) are repacked once (packed.py: codes in aligned words, scales
apart), read 16 bytes per load and take four products per dp4a; the others go through a byte-wise
kernel on the file's bytes that every type has. Float weights take float activations. The repacked
kernels can also make the next product's 8-bit input in their epilogue (matvec_glu: silu(gate) * up of
the gate/up product; matvec_norm: the RMSNorm of the residual row they write), so that a decode step
needs no act_q8 launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tile_table
from .act_q8 import NORM_NB, Act, act_q8, norm_q8_row, quantize_blocks, silu_mul
from .packed import Packed, dequantize_packed_ref, pack
from .pdl import pdl_launch, pdl_wait
from .quants import (BF16, BLOCKS, F16, F32, LAYOUT, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, codes_tile, dequant_tile,
                     dequantize_ref, row_bytes, weight_view)


@triton.jit
def matvec_kernel(
    Y, W, X, BIAS,  # pointers
    N, K,  # W is (N, K) logical
    stride_x, stride_y, stride_b,  # stride_b: 0 for a bias, a row's for a residual
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr,  # quants.LAYOUT
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,  # NB blocks of QK values per step
    PDL: tl.constexpr = 0,  # launched early (pdl.py)
):
    pdl_wait(PDL)
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


# ---------------------------------------------------------------------------------------------
# 8-bit activations (act_q8.py): integer dot products per run of codes, then the run's scales, as the
# CPU core's vec_dot functions and llama.cpp's mmvq compute them. The activation codes are a quarter
# of the float bytes, and on a GPU four code products are one dp4a instruction.


@triton.jit
def _dot4(a, b, c, GPU: tl.constexpr):
    """c + the sum of the four products of the signed bytes of the 32-bit words a and b: one dp4a
    on a GPU; the same sum from shifted bytes elsewhere (the interpreter has no inline assembly)."""
    if GPU:
        a, b = tl.broadcast(a, b)
        c = c + tl.zeros_like(a)  # c: a tensor or a constant
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:  # each operand's bytes at its own shape (one of them is often a broadcast row)
        s = c
        for i in tl.static_range(4):
            s += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return s


@triton.jit
def matvec_q8_kernel(
    Y, W, XQ, XD, XS, ADD,  # ADD: bias or residual
    N, K, stride_y, stride_b,
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Every quantized type, codes read byte by byte from the file's blocks (quants.codes_tile): tiles
    (rows, blocks, runs, values); per run the integer sum of codes times activation codes, then
    scale * d_x (and the min times d_x * sum)."""
    pdl_wait(PDL)
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


# ---------------------------------------------------------------------------------------------
# repacked weights (packed.py): each row's codes one aligned run of words, so that every (row, block)
# of codes is one 16-byte load (two for Q8_0 and the 32-byte chunks of Q4_K). The strides are
# arguments: Triton knows a stride divisible by 16 (every model's) and then issues the wide loads.
# Activation words: X32 (T, K/4) int32 of act_q8's codes, value 4i..4i+3 in word i.


# ---------------------------------------------------------------------------------------------
# the fused gate/up product (GLU): a program owns `half` = BLOCK_N / 2 consecutive gate rows (whole
# 8-bit blocks of the feed-forward's hidden row) and the same rows of up, N / 2 further down the
# stacked weight, and writes silu(gate) * up in act_q8's 8-bit form (the down product's input) from
# its registers: no float gate/up rows, no act_q8 launch between the two products.


@triton.jit
def _rows(N, BLOCK_N: tl.constexpr, GLU: tl.constexpr):
    """The weight rows of this program: BLOCK_N consecutive ones, or (GLU) gate rows and their up rows."""
    i = tl.arange(0, BLOCK_N)
    if GLU:
        half: tl.constexpr = BLOCK_N // 2
        g = tl.program_id(0) * half + i % half
        return tl.where(i < half, g, g + N // 2)  # gate indices past N / 2 read up rows, never stored
    else:
        return tl.program_id(0) * BLOCK_N + i


@triton.jit
def _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD: tl.constexpr,
              GLU: tl.constexpr, NORM: tl.constexpr, STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr):
    """y (BLOCK_N,) of `rows` (+ the bias or residual) to Y (STORE_Y); with GLU the 8-bit blocks of
    silu(gate) * up to HQ (T, N / 2) int8, HD, HS (T, N / 64) float32; with NORM the 8-bit blocks of
    rms_norm(y row) * NW to HQ (T, N), HD, HS (T, N / 32), made by the last program of the row."""
    if HAS_ADD:
        y += tl.load(ADD + t * stride_b + rows, mask=rows < N, other=0.0)
    if STORE_Y:
        tl.store(Y + t * stride_y + rows, y, mask=rows < N)
    if NORM:
        # the next RMSNorm needs the whole row: every program takes a ticket once its rows are stored
        # (the barrier: all its threads' stores before the one thread's release), and the last one
        # normalizes and quantizes the row (a launch of act_q8 less, the same single program's work),
        # then puts the counter back to 0 for the next launch (a CUDA graph replays the same buffer)
        tl.debug_barrier()
        ticket = tl.atomic_add(CNT + t, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            norm_q8_row(Y + t * stride_y, NW, HQ + t * N, HD + t * (N // 32), HS + t * (N // 32), Y, N, eps,
                        False, GPU, NORM_NB)
            tl.atomic_xchg(CNT + t, 0, sem="relaxed", scope="gpu")
    if GLU:
        half: tl.constexpr = BLOCK_N // 2
        n_ff = N // 2
        y2 = tl.reshape(y, (2, half))  # row 0: gate, row 1: up (the order of _rows)
        which = tl.arange(0, 2)[:, None]
        g = tl.sum(tl.where(which == 0, y2, 0.0), axis=0)  # a sum with zeros: the value itself
        u = tl.sum(tl.where(which == 1, y2, 0.0), axis=0)
        q, d, s = quantize_blocks(tl.reshape(silu_mul(g, u), (half // 32, 32)), GPU)
        gi = tl.program_id(0) * half + tl.arange(0, half)
        tl.store(HQ + t * n_ff + gi, tl.reshape(q, (half,)).to(tl.int8), mask=gi < n_ff)
        j = tl.program_id(0) * (half // 32) + tl.arange(0, half // 32)
        tl.store(HD + t * (n_ff // 32) + j, d, mask=j < n_ff // 32)
        tl.store(HS + t * (n_ff // 32) + j, s, mask=j < n_ff // 32)


@triton.jit
def matvec_q4_0_kernel(Y, QS, D, X32, XD, XS, ADD, N, nblk, stride_qs, stride_d, stride_x, stride_y, stride_b,
                       HQ, HD, HS, CNT, NW, eps, HAS_ADD: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr,
                       STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                       PDL: tl.constexpr = 0):
    # block b: code words 4b..4b+3; word j: values 4j.. in the low nibbles, 16 + 4j.. in the high ones
    rows = _rows(N, BLOCK_N, GLU)
    t = tl.program_id(1).to(tl.int64)
    r3 = rows.to(tl.int64)[:, None, None]
    rm = (rows < N)[:, None, None]
    b = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    pdl_wait(PDL)  # launched early: wait for the kernel before (pdl.py)
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b  # (1, NB, 1)
        xm = blk < nblk
        ok = rm & xm
        w = tl.load(QS + r3 * stride_qs + blk * 4 + j, mask=ok, other=0)  # (BN, NB, 4): 16 bytes each
        d = tl.load(D + r3 * stride_d + blk, mask=ok, other=0.0).to(tl.float32)  # (BN, NB, 1)
        xlo = tl.load(X32 + t * stride_x + blk * 8 + j, mask=xm, other=0)
        xhi = tl.load(X32 + t * stride_x + blk * 8 + 4 + j, mask=xm, other=0)
        s = _dot4(w & 0x0F0F0F0F, xlo, 0, GPU)
        s = _dot4((w >> 4) & 0x0F0F0F0F, xhi, s, GPU)
        s = tl.sum(s, axis=2).to(tl.float32)  # (BN, NB)
        dx = tl.load(XD + t * nblk + blk, mask=xm, other=0.0)
        sx = tl.load(XS + t * nblk + blk, mask=xm, other=0.0)
        acc += tl.sum(d, axis=2) * (tl.sum(dx, axis=2) * s - 8 * tl.sum(sx, axis=2))  # the codes are q + 8
    y = tl.sum(acc, axis=1)
    _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD, GLU, NORM, STORE_Y, GPU,
              BLOCK_N)


@triton.jit
def matvec_q8_0_kernel(Y, QS, D, X32, XD, XS, ADD, N, nblk, stride_qs, stride_d, stride_x, stride_y, stride_b,
                       HQ, HD, HS, CNT, NW, eps, HAS_ADD: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr,
                       STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                       PDL: tl.constexpr = 0):
    # block b: code words 8b..8b+7, word j: values 4j..4j+3
    rows = _rows(N, BLOCK_N, GLU)
    t = tl.program_id(1).to(tl.int64)
    r3 = rows.to(tl.int64)[:, None, None]
    rm = (rows < N)[:, None, None]
    b = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    pdl_wait(PDL)  # launched early: wait for the kernel before (pdl.py)
    acc = tl.zeros([BLOCK_N, NB], dtype=tl.float32)
    for b0 in range(0, nblk, NB):
        blk = b0 + b
        xm = blk < nblk
        ok = rm & xm
        w = tl.load(QS + r3 * stride_qs + blk * 8 + j, mask=ok, other=0)  # (BN, NB, 8)
        d = tl.load(D + r3 * stride_d + blk, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X32 + t * stride_x + blk * 8 + j, mask=xm, other=0)
        s = tl.sum(_dot4(w, x, 0, GPU), axis=2).to(tl.float32)
        dx = tl.load(XD + t * nblk + blk, mask=xm, other=0.0)
        acc += tl.sum(d * dx, axis=2) * s
    y = tl.sum(acc, axis=1)
    _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD, GLU, NORM, STORE_Y, GPU,
              BLOCK_N)


@triton.jit
def _q4k_load(QS, SC, D, X32, XD, XS, r3, rm, blk, c, w, t, nblk, nq, stride_qs, stride_sc, stride_d, stride_x):
    """What one step of matvec_q4_k_kernel reads for the blocks blk (1, NB, 1): the code words (BN, NB, 4, 8),
    the scale/min words (BN, NB, 4), d | dmin (BN, NB, 1), the activation words of the low and high runs
    (1, NB, 4, 8) and their scales and sums (1, NB, 4); blocks past nblk read as zeros."""
    xm = blk < nblk
    ok = rm & xm  # (BN, NB, 1)
    q = tl.load(QS + (r3 * stride_qs + blk * 32 + 8 * c)[:, :, :, None] + w, mask=ok[:, :, :, None], other=0)
    sm = tl.load(SC + r3 * stride_sc + blk * 4 + c, mask=ok, other=0)  # (BN, NB, 4)
    dd = tl.load(D + r3 * stride_d + blk, mask=ok, other=0)  # (BN, NB, 1)
    xw = X32 + t * stride_x + (blk * 64 + 16 * c)[:, :, :, None] + w  # (1, NB, 4, 8)
    xm4 = xm[:, :, :, None]
    xl = tl.load(xw, mask=xm4, other=0)
    xh = tl.load(xw + 8, mask=xm4, other=0)
    jq = blk * 8 + 2 * c  # the 8-bit block of run 2c, (1, NB, 4)
    jm = xm & (c < 4)
    dx_lo = tl.load(XD + t * nq + jq, mask=jm, other=0.0)
    dx_hi = tl.load(XD + t * nq + jq + 1, mask=jm, other=0.0)
    sx_lo = tl.load(XS + t * nq + jq, mask=jm, other=0.0)
    sx_hi = tl.load(XS + t * nq + jq + 1, mask=jm, other=0.0)
    return q, sm, dd, xl, xh, dx_lo, dx_hi, sx_lo, sx_hi


@triton.jit
def _q4k_sum(q, sm, dd, xl, xh, dx_lo, dx_hi, sx_lo, sx_hi, GPU: tl.constexpr):
    """The products of one step's loads (_q4k_load): two (BN, NB, 4) float32, per chunk its low and its high
    run's (d sc) dx S - (dmin m) sx (added to the sums one after the other, as before the split)."""
    d, dmin = _f16_bits(dd), _f16_bits(dd >> 16)
    s_lo = tl.sum(_dot4(q & 0x0F0F0F0F, xl, 0, GPU), axis=3).to(tl.float32)
    s_hi = tl.sum(_dot4((q >> 4) & 0x0F0F0F0F, xh, 0, GPU), axis=3).to(tl.float32)
    sc_lo, mn_lo = (sm & 255).to(tl.float32), ((sm >> 8) & 255).to(tl.float32)
    sc_hi, mn_hi = ((sm >> 16) & 255).to(tl.float32), ((sm >> 24) & 255).to(tl.float32)
    return (d * sc_lo) * dx_lo * s_lo - (dmin * mn_lo) * sx_lo, (d * sc_hi) * dx_hi * s_hi - (dmin * mn_hi) * sx_hi


@triton.jit
def matvec_q4_k_kernel(Y, QS, D, SC, X32, XD, XS, ADD, N, nblk, stride_qs, stride_d, stride_sc, stride_x, stride_y,
                       stride_b, HQ, HD, HS, CNT, NW, eps, HAS_ADD: tl.constexpr, GLU: tl.constexpr,
                       NORM: tl.constexpr, STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr,
                       NB: tl.constexpr, PF: tl.constexpr = 0,
                       PDL: tl.constexpr = 0):
    # block b: code words 32b + 8c + w (chunk c, word w: values 64c + 4w.. low (run 2c), 64c + 32 + 4w..
    # high (run 2c + 1)); SC word 4b + c: scale, min of run 2c, scale, min of run 2c + 1; D word b: d | dmin << 16.
    # PF 1: the next step's loads are issued before this step's sums (held in registers), so a program
    # always has a step's bytes in flight instead of none while it sums; the same sums in the same order
    rows = _rows(N, BLOCK_N, GLU)
    t = tl.program_id(1).to(tl.int64)
    nq = nblk * 8
    r3 = rows.to(tl.int64)[:, None, None]
    rm = (rows < N)[:, None, None]
    b = tl.arange(0, NB)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    w = tl.arange(0, 8)[None, None, None, :]
    pdl_wait(PDL)  # launched early: wait for the kernel before (pdl.py)
    acc = tl.zeros([BLOCK_N, NB, 4], dtype=tl.float32)
    if PF:
        q, sm, dd, xl, xh, dxl, dxh, sxl, sxh = _q4k_load(QS, SC, D, X32, XD, XS, r3, rm, b, c, w, t, nblk, nq,
                                                          stride_qs, stride_sc, stride_d, stride_x)
        for b0 in range(0, nblk, NB):
            q2, sm2, dd2, xl2, xh2, dxl2, dxh2, sxl2, sxh2 = _q4k_load(QS, SC, D, X32, XD, XS, r3, rm, b0 + NB + b, c,
                                                                       w, t, nblk, nq, stride_qs, stride_sc,
                                                                       stride_d, stride_x)
            lo, hi = _q4k_sum(q, sm, dd, xl, xh, dxl, dxh, sxl, sxh, GPU)
            acc += lo
            acc += hi
            q, sm, dd, xl, xh, dxl, dxh, sxl, sxh = q2, sm2, dd2, xl2, xh2, dxl2, dxh2, sxl2, sxh2
    else:
        for b0 in range(0, nblk, NB):
            q, sm, dd, xl, xh, dxl, dxh, sxl, sxh = _q4k_load(QS, SC, D, X32, XD, XS, r3, rm, b0 + b, c, w, t, nblk,
                                                              nq, stride_qs, stride_sc, stride_d, stride_x)
            lo, hi = _q4k_sum(q, sm, dd, xl, xh, dxl, dxh, sxl, sxh, GPU)
            acc += lo
            acc += hi
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD, GLU, NORM, STORE_Y, GPU,
              BLOCK_N)


@triton.jit
def _q4k_v2_rows(QS, SC, D, r4, ok, blk, c, v, stride_qs, stride_sc, stride_d, x0, x1, x8, x12, dx_lo, dx_hi, sx_lo,
                 sx_hi, GPU: tl.constexpr):
    """One step of matvec_q4_k_v2_kernel for the rows r4 (R, 1, 1, 1): (R, NB, 4, 1) float32, the
    products of blocks blk (chunks c, words v) with the activation words x0, x1 (run 2c, words 0..3,
    4..7) and x8, x12 (run 2c + 1) and their scales dx, sx (1, NB, 4, 1)."""
    q = tl.load(QS + r4 * stride_qs + blk * 32 + 8 * c + v, mask=ok, other=0)  # (R, NB, 4, 4): words 0..3
    s_lo = tl.sum(_dot4(q & 0x0F0F0F0F, x0, 0, GPU), axis=3, keep_dims=True)
    s_hi = tl.sum(_dot4((q >> 4) & 0x0F0F0F0F, x8, 0, GPU), axis=3, keep_dims=True)
    q = tl.load(QS + r4 * stride_qs + blk * 32 + 8 * c + 4 + v, mask=ok, other=0)  # words 4..7
    s_lo += tl.sum(_dot4(q & 0x0F0F0F0F, x1, 0, GPU), axis=3, keep_dims=True)
    s_hi += tl.sum(_dot4((q >> 4) & 0x0F0F0F0F, x12, 0, GPU), axis=3, keep_dims=True)
    sm = tl.load(SC + r4 * stride_sc + blk * 4 + c, mask=ok, other=0)  # (R, NB, 4, 1)
    dd = tl.load(D + r4 * stride_d + blk, mask=ok, other=0)  # (R, NB, 1, 1)
    d, dmin = _f16_bits(dd), _f16_bits(dd >> 16)
    sc_lo, mn_lo = (sm & 255).to(tl.float32), ((sm >> 8) & 255).to(tl.float32)
    sc_hi, mn_hi = ((sm >> 16) & 255).to(tl.float32), ((sm >> 24) & 255).to(tl.float32)
    return ((d * sc_lo) * dx_lo * s_lo.to(tl.float32) - (dmin * mn_lo) * sx_lo
            + ((d * sc_hi) * dx_hi * s_hi.to(tl.float32) - (dmin * mn_hi) * sx_hi))


@triton.jit
def matvec_q4_k_v2_kernel(Y, QS, D, SC, X32, XD, XS, ADD, N, nblk, stride_qs, stride_d, stride_sc, stride_x,
                          stride_y, stride_b, HQ, HD, HS, CNT, NW, eps, HAS_ADD: tl.constexpr, GLU: tl.constexpr,
                          NORM: tl.constexpr, STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr,
                          NB: tl.constexpr, STAGES: tl.constexpr = 1, PAIR: tl.constexpr = 0,
                          PDL: tl.constexpr = 0):
    """Q4_K (SEPEDGE_TRITON_Q4K=1): the packed layout and arithmetic of matvec_q4_k_kernel, with every
    tensor of a step in one layout. There, the run sums reduced over a chunk's 8 words (two threads,
    4 words each) meet scale tiles that Triton lays out otherwise: the sm_90 PTX converts them through
    shared memory twice a step (4 barriers a step, and at its default tile the activation words come as
    single words). Here a chunk's words are two 16-byte halves summed each in its own thread (tiles
    (rows, blocks, chunks, 4 words)), the sums keep a word axis of size 1, and scales, mins, d words and
    activation scales are loaded at that shape: at tiles of block_n * NB * 4 = 32 * warps (a thread one
    (row, block, chunk)) the loop has no barrier and no shared memory (benchmarks/triton_ptxas.py
    --decode). STAGES > 1: Triton's software pipelining of the loop's loads (cp.async, the next steps'
    tiles in flight while one is summed). PAIR: rows 2i and 2i + 1 of the program in two tiles of the
    same layout over the same activation words (a thread two rows: the activation loads once for both,
    twice the weight bytes in flight a thread; tiles of block_n / 2 * NB * 4 = 32 * warps)."""
    rows = _rows(N, BLOCK_N, GLU)
    t = tl.program_id(1).to(tl.int64)
    nq = nblk * 8
    R: tl.constexpr = BLOCK_N // 2 if PAIR else BLOCK_N  # rows of one tile
    if PAIR:  # rows 2i and 2i + 1 of the program: two tiles of one layout over the same activation words
        ra, rb = tl.split(tl.reshape(rows, (R, 2)))
    else:
        ra, rb = rows, rows
    ra4, rb4 = ra.to(tl.int64)[:, None, None, None], rb.to(tl.int64)[:, None, None, None]
    rma, rmb = (ra < N)[:, None, None, None], (rb < N)[:, None, None, None]
    b = tl.arange(0, NB)[None, :, None, None]
    c = tl.arange(0, 4)[None, None, :, None]
    v = tl.arange(0, 4)[None, None, None, :]
    pdl_wait(PDL)  # launched early: wait for the kernel before (pdl.py)
    acc_a = tl.zeros([R, NB, 4, 1], dtype=tl.float32)
    acc_b = tl.zeros([R, NB, 4, 1], dtype=tl.float32)
    for b0 in tl.range(0, nblk, NB, num_stages=STAGES):
        blk = b0 + b  # (1, NB, 1, 1)
        xm = blk < nblk
        xw = X32 + t * stride_x + blk * 64 + 16 * c + v  # (1, NB, 4, 4): chunk c, words 0..3 of run 2c
        # words 4h..4h+3 of the chunk's runs 2c (+0) and 2c + 1 (+8), h = 0, 1
        x0, x1 = tl.load(xw, mask=xm, other=0), tl.load(xw + 4, mask=xm, other=0)
        x8, x12 = tl.load(xw + 8, mask=xm, other=0), tl.load(xw + 12, mask=xm, other=0)
        jq = t * nq + blk * 8 + 2 * c  # the 8-bit block of run 2c, (1, NB, 4, 1)
        dx_lo = tl.load(XD + jq, mask=xm, other=0.0)
        dx_hi = tl.load(XD + jq + 1, mask=xm, other=0.0)
        sx_lo = tl.load(XS + jq, mask=xm, other=0.0)
        sx_hi = tl.load(XS + jq + 1, mask=xm, other=0.0)
        acc_a += _q4k_v2_rows(QS, SC, D, ra4, rma & xm, blk, c, v, stride_qs, stride_sc, stride_d, x0, x1, x8, x12,
                              dx_lo, dx_hi, sx_lo, sx_hi, GPU)
        if PAIR:
            acc_b += _q4k_v2_rows(QS, SC, D, rb4, rmb & xm, blk, c, v, stride_qs, stride_sc, stride_d, x0, x1, x8,
                                  x12, dx_lo, dx_hi, sx_lo, sx_hi, GPU)
    y = tl.sum(tl.sum(tl.sum(acc_a, axis=3), axis=2), axis=1)
    if PAIR:
        y = tl.reshape(tl.join(y, tl.sum(tl.sum(tl.sum(acc_b, axis=3), axis=2), axis=1)), (BLOCK_N,))
    _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD, GLU, NORM, STORE_Y, GPU,
              BLOCK_N)


@triton.jit
def _q6k_load(QS, QH, SC, D, X32, XD, r4, rm, blk, h, g, w, t, nblk, nq, stride_qs, stride_qh, stride_sc, stride_d,
              stride_x):
    """What one step of matvec_q6_k_kernel reads for the blocks blk (1, NB, 1, 1): ql words a (runs 0, 2) and
    b (runs 1, 3) and qh words (BN, NB, 2, 2, 4), d (BN, NB, 1, 1); per run r its scales (BN, NB, 2, 2),
    activation words (1, NB, 2, 2, 4) and activation scales (1, NB, 2, 1); blocks past nblk read as zeros."""
    xm = blk < nblk
    ok = rm & xm  # (BN, NB, 1, 1)
    ok5 = ok[:, :, :, :, None]
    xm5 = xm[:, :, :, :, None]
    lw = (r4 * stride_qs + blk * 32 + 16 * h + 4 * g)[:, :, :, :, None] + w
    a_ = tl.load(QS + lw, mask=ok5, other=0)  # ql[64h + l]: runs r = 0 (low), 2 (high)
    b_ = tl.load(QS + lw + 8, mask=ok5, other=0)  # ql[64h + 32 + l]: r = 1, 3
    hb = tl.load(QH + (r4 * stride_qh + blk * 16 + 8 * h + 4 * g)[:, :, :, :, None] + w, mask=ok5, other=0)
    d = tl.load(D + r4 * stride_d + blk, mask=ok, other=0.0)  # (BN, NB, 1, 1) float16
    scp = SC + r4 * stride_sc + blk * 16 + 8 * h + g
    xp = X32 + t * stride_x + (blk * 64 + 32 * h + 4 * g)[:, :, :, :, None] + w
    dp = XD + t * nq + blk * 8 + 4 * h
    sc0 = tl.load(scp, mask=ok, other=0)
    sc1 = tl.load(scp + 2, mask=ok, other=0)
    sc2 = tl.load(scp + 4, mask=ok, other=0)
    sc3 = tl.load(scp + 6, mask=ok, other=0)
    x0 = tl.load(xp, mask=xm5, other=0)
    x1 = tl.load(xp + 8, mask=xm5, other=0)
    x2 = tl.load(xp + 16, mask=xm5, other=0)
    x3 = tl.load(xp + 24, mask=xm5, other=0)
    dx0 = tl.load(dp, mask=xm, other=0.0)
    dx1 = tl.load(dp + 1, mask=xm, other=0.0)
    dx2 = tl.load(dp + 2, mask=xm, other=0.0)
    dx3 = tl.load(dp + 3, mask=xm, other=0.0)
    return a_, b_, hb, d, sc0, sc1, sc2, sc3, x0, x1, x2, x3, dx0, dx1, dx2, dx3


@triton.jit
def _q6k_codes(a_, b_, hb, R: tl.constexpr):
    """The words of run R's codes + 32 (four 6-bit codes a word) from a step's ql words a_, b_ and qh words hb."""
    if R == 0:
        return (a_ & 0x0F0F0F0F) | ((hb << 4) & 0x30303030)
    elif R == 1:
        return (b_ & 0x0F0F0F0F) | ((hb << 2) & 0x30303030)
    elif R == 2:
        return ((a_ >> 4) & 0x0F0F0F0F) | (hb & 0x30303030)
    else:
        return ((b_ >> 4) & 0x0F0F0F0F) | ((hb >> 2) & 0x30303030)


@triton.jit
def _q6k_run(acc, q, x, sc, dx, d, GPU: tl.constexpr):
    """acc + one run's products: (codes + 32) times x by dp4a, less 32 times the sum of x, times d sc dx."""
    s = tl.sum(_dot4(q, x, 0, GPU), axis=4)  # (BN, NB, 2, 2)
    sx = tl.sum(_dot4(x * 0 + 0x01010101, x, 0, GPU), axis=4)  # (1, NB, 2, 2): the sum of x
    s = (s - 32 * sx).to(tl.float32)
    return acc + (d * sc.to(tl.float32)) * dx * s


@triton.jit
def _q6k_acc(acc, a_, b_, hb, d, sc0, sc1, sc2, sc3, x0, x1, x2, x3, dx0, dx1, dx2, dx3, GPU: tl.constexpr):
    """acc + the four runs of one step's loads (_q6k_load), run 0 first."""
    d = d.to(tl.float32)
    acc = _q6k_run(acc, _q6k_codes(a_, b_, hb, 0), x0, sc0, dx0, d, GPU)
    acc = _q6k_run(acc, _q6k_codes(a_, b_, hb, 1), x1, sc1, dx1, d, GPU)
    acc = _q6k_run(acc, _q6k_codes(a_, b_, hb, 2), x2, sc2, dx2, d, GPU)
    return _q6k_run(acc, _q6k_codes(a_, b_, hb, 3), x3, sc3, dx3, d, GPU)


@triton.jit
def matvec_q6_k_kernel(Y, QS, QH, SC, D, X32, XD, XS, ADD, N, nblk, stride_qs, stride_qh, stride_sc, stride_d,
                       stride_x, stride_y, stride_b,
                       HQ, HD, HS, CNT, NW, eps, HAS_ADD: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr,
                       STORE_Y: tl.constexpr, GPU: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                       STAGES: tl.constexpr = 1, PF: tl.constexpr = 0, PDL: tl.constexpr = 0):
    # value 128h + 32r + l of a block: low 4 bits from ql[64h + 32(r % 2) + l] (low nibble for r < 2),
    # high 2 bits from bits 2r of qh[32h + l], scale sc[8h + 2r + l // 16]. Tiles (rows, blocks, h,
    # g = l // 16, words of 4 values): ql word 32b + 16h + 4g + w (+ 8 for r odd), qh word 16b + 8h + 4g + w.
    # PF 1: the next step's loads issued before this step's sums (matvec_q4_k_kernel's PF)
    rows = _rows(N, BLOCK_N, GLU)
    t = tl.program_id(1).to(tl.int64)
    nq = nblk * 8
    r4 = rows.to(tl.int64)[:, None, None, None]
    rm = (rows < N)[:, None, None, None]
    b = tl.arange(0, NB)[None, :, None, None]
    h = tl.arange(0, 2)[None, None, :, None]
    g = tl.arange(0, 2)[None, None, None, :]
    w = tl.arange(0, 4)[None, None, None, None, :]
    pdl_wait(PDL)  # launched early: wait for the kernel before (pdl.py)
    acc = tl.zeros([BLOCK_N, NB, 2, 2], dtype=tl.float32)
    if PF:
        a_, b_, hb, d, s0, s1, s2, s3, x0, x1, x2, x3, e0, e1, e2, e3 = _q6k_load(
            QS, QH, SC, D, X32, XD, r4, rm, b, h, g, w, t, nblk, nq, stride_qs, stride_qh, stride_sc, stride_d,
            stride_x)
        for b0 in range(0, nblk, NB):
            a2, b2, hb2, d2, t0, t1, t2, t3, y0, y1, y2, y3, f0, f1, f2, f3 = _q6k_load(
                QS, QH, SC, D, X32, XD, r4, rm, b0 + NB + b, h, g, w, t, nblk, nq, stride_qs, stride_qh, stride_sc,
                stride_d, stride_x)
            acc = _q6k_acc(acc, a_, b_, hb, d, s0, s1, s2, s3, x0, x1, x2, x3, e0, e1, e2, e3, GPU)
            a_, b_, hb, d, s0, s1, s2, s3 = a2, b2, hb2, d2, t0, t1, t2, t3
            x0, x1, x2, x3, e0, e1, e2, e3 = y0, y1, y2, y3, f0, f1, f2, f3
    else:
        for b0 in tl.range(0, nblk, NB, num_stages=STAGES):  # STAGES > 1: SEPEDGE_TRITON_Q4K=2's tiles
            blk = b0 + b  # (1, NB, 1, 1)
            xm = blk < nblk
            ok = rm & xm  # (BN, NB, 1, 1)
            ok5 = ok[:, :, :, :, None]
            lw = (r4 * stride_qs + blk * 32 + 16 * h + 4 * g)[:, :, :, :, None] + w
            a_ = tl.load(QS + lw, mask=ok5, other=0)  # ql[64h + l]: runs r = 0 (low), 2 (high)
            b_ = tl.load(QS + lw + 8, mask=ok5, other=0)  # ql[64h + 32 + l]: r = 1, 3
            hb = tl.load(QH + (r4 * stride_qh + blk * 16 + 8 * h + 4 * g)[:, :, :, :, None] + w, mask=ok5, other=0)
            d = tl.load(D + r4 * stride_d + blk, mask=ok, other=0.0).to(tl.float32)  # (BN, NB, 1, 1)
            for r in tl.static_range(4):  # each run's activations, scales as it is summed (PF 0's loads)
                q = _q6k_codes(a_, b_, hb, r)
                xo = (blk * 64 + 32 * h + 8 * r + 4 * g)[:, :, :, :, None] + w  # (1, NB, 2, 2, 4)
                x = tl.load(X32 + t * stride_x + xo, mask=xm[:, :, :, :, None], other=0)
                sc = tl.load(SC + r4 * stride_sc + blk * 16 + 8 * h + 2 * r + g, mask=ok, other=0)
                dx = tl.load(XD + t * nq + blk * 8 + 4 * h + r, mask=xm, other=0.0)
                acc = _q6k_run(acc, q, x, sc, dx, d, GPU)
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    _epilogue(Y, ADD, HQ, HD, HS, CNT, NW, eps, y, rows, t, N, stride_y, stride_b, HAS_ADD, GLU, NORM, STORE_Y, GPU,
              BLOCK_N)


FLOAT_TYPES = (F32, F16, BF16)
# type -> (kernel, (block_n, blocks per step) on a GPU, under the interpreter)
# (the interpreter runs one program at a time in Python, at a cost per program: as few as it can).
# A tile needs 4 words of codes a thread for 16-byte loads (sm_90 SASS: LDG.E.128 only then)
PACKED = {Q4_0: (matvec_q4_0_kernel, (8, 16), (512, 32)), Q8_0: (matvec_q8_0_kernel, (8, 8), (512, 32)),
          Q4_K: (matvec_q4_k_kernel, (4, 4), (512, 8)), Q6_K: (matvec_q6_k_kernel, (4, 8), (512, 8))}
TUNE_ENV = "SEPEDGE_TRITON_TUNE"    # "0": the fixed tiles of PACKED on the GPU too
TUNE_DEVICES = ("cuda",)  # where launches autotune (or take kernels/tile_table.py's tile); tests add "cpu"
# (block_n, blocks per step, warps) tried for model-sized weights on a GPU, per block length: rows
# and blocks per step set the bytes in flight; the best depends on the GPU and the shape
# (triton.autotune, once per weight shape and process, where tile_table.py has no measured tile).
# Words of codes per (row, block): Q4_0 4, Q8_0 8, Q4_K 32, Q6_K 16 (+ 8 of qh), so every tile gives
# each thread at least 4
TUNE_CONFIGS = {32: [(4, 32, 4), (8, 16, 4), (8, 32, 4), (16, 16, 8), (2, 64, 4), (16, 8, 4), (4, 16, 2),
                     (32, 8, 8)],
                256: [(4, 4, 2), (8, 2, 2), (2, 8, 2), (4, 8, 4), (8, 4, 4), (16, 2, 4), (8, 8, 8), (16, 4, 8),
                      # more rows a program: the activation words, scales and sums of a block of 256 (288
                      # bytes, the same for every row) are half of 4 rows' weight bytes (4 x 144), an eighth of
                      # 32 rows' (triton_kernels.md: Q4_K 1.69 TB/s against Q4_0's 2.39 in the 8B profiles)
                      (32, 1, 4), (32, 2, 8)]}
TUNE_MIN_SIZE = 1 << 22  # values of a weight worth tuning for
# the fused gate/up product (matvec_glu): tiles of 2 x 32k rows. A program's rows are whole 8-bit
# blocks of 32 gate rows and their up rows, so there are 8x fewer programs than at the product's
# best plain tiles (8 rows): the tiles here are as wide per program (blocks per step, warps) as the
# plain ones are in total over the programs an SM holds, to keep the same bytes in flight
GLU_TUNE_CONFIGS = {32: [(64, 8, 8), (64, 4, 4), (64, 16, 8), (128, 4, 8), (64, 2, 4), (128, 8, 8)],
                    256: [(64, 1, 4), (64, 2, 8), (64, 1, 8), (128, 1, 8), (64, 2, 4)]}
GLU_TILES = {Q4_0: (64, 8, 8), Q8_0: (64, 4, 8), Q4_K: (64, 1, 4), Q6_K: (64, 1, 4)}  # GPU, untuned
# SEPEDGE_TRITON_Q4K, read at every launch (a decode graph keeps the kernels it was captured with):
# 0 (the default until measured on a GPU): matvec_q4_k_kernel and Q6_K's TUNE_CONFIGS; 1: Q4_K through
# matvec_q4_k_v2_kernel; 2: that and Q6_K's tiles of Q6K_STAGED_TUNE_CONFIGS. The v2 tiles give every
# thread exactly one (row, block, chunk) of each row tile a step, rows of a tile * NB * 4 = 32 * warps
# (rows of a tile: block_n, or block_n / 2 with pair): the one shape where Triton lays the scale tiles out
# as the code tiles (other shapes put shared-memory conversions back into the loop: the sm_90 PTX,
# triton_ptxas.py --decode); stages 3: the loads of the next two steps in flight (cp.async) while one is summed.
# Q6_K's staged table: its configs whose loop has no conversion (the same report), unpipelined and
# with 3 stages (the small ffn_down and attn_v products of a Q4_K_M file are latency-bound)
Q4K_ENV = "SEPEDGE_TRITON_Q4K"
Q4K_V2_TILE = (8, 4, 4, 1, 0)  # GPU, untuned (the interpreter: PACKED's)
# (block_n, blocks per step, warps, stages, pair): pair 1 gives a thread two rows (2i, 2i + 1) over the same
# activation words: per step 4 weight vectors (64 bytes) and 16 loads in all, against 2 (32 bytes) and 12
Q4K_V2_TUNE_CONFIGS = [(8, 4, 4, 1, 0), (16, 2, 4, 1, 0), (32, 1, 4, 1, 0), (16, 4, 8, 1, 0), (8, 4, 4, 3, 0),
                       (16, 2, 4, 3, 0), (16, 4, 4, 1, 1), (32, 2, 4, 1, 1), (64, 1, 4, 1, 1), (32, 4, 8, 1, 1),
                       (16, 4, 4, 3, 1), (32, 2, 4, 3, 1)]
Q4K_V2_GLU_TILE = (64, 1, 8, 1, 0)
Q4K_V2_GLU_TUNE_CONFIGS = [(64, 1, 8, 1, 0), (64, 1, 8, 3, 0), (64, 2, 16, 1, 0), (128, 1, 16, 1, 0),
                           (128, 1, 8, 1, 1), (128, 2, 16, 1, 1)]
Q6K_STAGED_TUNE_CONFIGS = [(8, 2, 2, 1), (16, 2, 4, 1), (32, 1, 4, 1), (32, 2, 8, 1), (8, 2, 2, 3), (16, 2, 4, 3),
                           (32, 1, 4, 3), (32, 2, 8, 3)]


def q4k_variant() -> int:
    """The K-quant decode products the launches take now (SEPEDGE_TRITON_Q4K): 0, 1 or 2 (see above)."""
    v = os.environ.get(Q4K_ENV, "0") or "0"
    if v not in ("0", "1", "2"):
        raise ValueError(f"{Q4K_ENV} must be 0, 1 or 2, got {v!r}")
    return int(v)


TILE_PARAMS = ("BLOCK_N", "NB", "num_warps", "STAGES", "PAIR")  # the fields of a tuple of the tables above


def tune_alt(qtype: int, glu: bool) -> bool:
    """Whether a launch takes SEPEDGE_TRITON_Q4K's kernel or tiles (the autotuners' alt key): Q4_K's v2
    kernel (variant >= 1), Q6_K's staged tiles (variant 2, its GLU tiles staying TUNE's)."""
    variant = q4k_variant() if qtype in (Q4_K, Q6_K) else 0
    return qtype == Q4_K and variant >= 1 or qtype == Q6_K and variant == 2 and not glu


def takes_prefetch(qtype: int, alt: bool) -> bool:
    """Whether the launch can take PF: matvec_q4_k_kernel's and matvec_q6_k_kernel's unpipelined loops (not
    the v2 kernel, nor Q6_K's staged tiles, whose loop prefetches through its pipeline instead)."""
    return qtype in (Q4_K, Q6_K) and not alt


def tune_configs(qtype: int, glu: bool, alt: bool) -> list[tuple]:
    """The candidate tiles of an autotuned launch, as tuples of TILE_PARAMS (3, 4 or 5 of them)."""
    if alt:
        if qtype == Q4_K:
            return Q4K_V2_GLU_TUNE_CONFIGS if glu else Q4K_V2_TUNE_CONFIGS
        return Q6K_STAGED_TUNE_CONFIGS
    return (GLU_TUNE_CONFIGS if glu else TUNE_CONFIGS)[BLOCKS[qtype][0]]


_tuned: dict = {}


def _autotuned(qtype: int, glu: bool, alt: bool = False):
    """The autotuned kernel of a type; alt: SEPEDGE_TRITON_Q4K's (Q4_K: the v2 kernel; Q6_K: staged tiles)."""
    if (qtype, glu, alt) not in _tuned:
        key = ["N", "nblk", "HAS_ADD", "GLU", "NORM"]
        configs = []
        for t in tune_configs(qtype, glu, alt):
            meta = dict(zip(TILE_PARAMS, t))
            configs.append(triton.Config(meta, num_warps=meta.pop("num_warps")))
        kernel = matvec_q4_k_v2_kernel if alt and qtype == Q4_K else PACKED[qtype][0]
        _tuned[qtype, glu, alt] = triton.autotune(configs=configs, key=key)(kernel)
    return _tuned[qtype, glu, alt]


def _packed_launch(w, qtype: int, x: Act, y, add, stride_b: int, block_n, nb, glu: bool = False, h: Act | None = None,
                   store_y: bool = True, norm=None, eps: float = 0.0, tickets=None, stages: int | None = None,
                   pair: int | None = None, prefetch: int | None = None) -> None:
    """The repacked type's kernel: y = x @ W.T (+ add); with glu also h = the 8-bit form of
    silu(gate) * up (y's two halves), y then written only where store_y; with norm (N,) also h = the
    8-bit form of rms_norm(y) * norm (tickets: (T,) int32 zeros, left zero). stages: the pipeline
    stages of the Q4_K (SEPEDGE_TRITON_Q4K >= 1) and Q6_K kernels, pair: two rows a thread in the Q4_K v2
    kernel (0 or 1), prefetch: the Q4_K (variant 0) and Q6_K kernels' PF (0 or 1), instead of the
    defaults/autotuning."""
    T, K = x.q.shape
    N = w.shape[0]
    dev = y.device
    p = w if isinstance(w, Packed) else pack(w, qtype, K)
    assert p.qtype == qtype and p.K == K, "the packed weight does not match the type and K"
    kernel, on_gpu, interp = PACKED[qtype]
    alt = tune_alt(qtype, glu)
    v2 = alt and qtype == Q4_K
    if v2:
        kernel = matvec_q4_k_v2_kernel
    assert x.q.is_contiguous()
    x32 = x.q.view(torch.int32)
    nblk = K // BLOCKS[qtype][0]
    if qtype in (Q4_0, Q8_0):
        arrays = (p.qs, p.d)
    elif qtype == Q4_K:
        arrays = (p.qs, p.d, p.sc)
    else:
        arrays = (p.qs, p.qh, p.sc, p.d)
    has_add = add is not None
    hq, hd, hs = (h.q, h.d, h.s) if h is not None else (y, y, y)
    use_norm = norm is not None
    if use_norm:
        assert not glu and N % 32 == 0 and tickets is not None and tickets.shape[0] >= T
    args = (y, *arrays, x32, x.d, x.s, add if has_add else y, N, nblk, *(t.stride(0) for t in arrays), x32.stride(0),
            y.stride(0), stride_b, hq, hd, hs, tickets if use_norm else y, norm if use_norm else y, eps)
    flags = dict(HAS_ADD=has_add, GLU=glu, NORM=use_norm, STORE_Y=store_y or not glu, GPU=dev.type == "cuda",
                 **pdl_launch(dev))
    gpu = dev.type == "cuda"
    if (dev.type in TUNE_DEVICES and block_n is None and nb is None and stages is None and pair is None
            and prefetch is None and N * K >= TUNE_MIN_SIZE and os.environ.get(TUNE_ENV) != "0"
            and nblk >= max(c[1] for c in tune_configs(qtype, glu, alt))):
        per = 2 if glu else 1  # GLU: a program's BLOCK_N rows are BLOCK_N / 2 of the gate's N / 2
        grid = lambda meta: (triton.cdiv(N // per, meta["BLOCK_N"] // per), T)  # noqa: E731
        tile = tile_table.lookup(dev, qtype, alt, N, nblk, has_add, glu, use_norm)  # measured once per GPU
        if tile is not None:
            kernel[grid(tile)](*args, **flags, **tile)
        else:
            _autotuned(qtype, glu, alt)[grid](*args, **flags)
        return
    warps = 4
    if v2 or qtype == Q6_K:
        flags["STAGES"] = stages or 1
    if v2:
        flags["PAIR"] = pair or 0
    elif qtype in (Q4_K, Q6_K):
        if prefetch and flags.get("STAGES", 1) > 1:
            raise ValueError("PF and pipeline stages both fetch ahead: take one")
        flags["PF"] = prefetch or 0
    if glu:
        n_ff = N // 2
        if gpu:
            bn, nbk, warps = GLU_TILES[qtype]
            if v2:
                bn, nbk, warps, st, pr = Q4K_V2_GLU_TILE
                flags["STAGES"], flags["PAIR"] = stages or st, pair if pair is not None else pr
        else:  # the interpreter: as few programs as it can
            bn, nbk = 2 * max(32, min(256, triton.next_power_of_2(n_ff))), interp[1]
        bn = block_n or bn
        nbk = nb or nbk
        assert bn % 64 == 0, "a GLU program owns whole 8-bit blocks of gate and up rows"
        grid = triton.cdiv(n_ff, bn // 2)
    else:
        if v2 and gpu:
            on_gpu, warps, flags["STAGES"] = Q4K_V2_TILE[:2], Q4K_V2_TILE[2], stages or Q4K_V2_TILE[3]
            flags["PAIR"] = pair if pair is not None else Q4K_V2_TILE[4]
        bn, nbk = block_n or (on_gpu if gpu else interp)[0], nb or (on_gpu if gpu else interp)[1]
        bn = min(bn, max(1, triton.next_power_of_2(N)))
        grid = triton.cdiv(N, bn)
    nbk = min(nbk, triton.next_power_of_2(nblk))
    kernel[(grid, T)](*args, **flags, BLOCK_N=bn, NB=nbk, num_warps=warps)


def matvec_q8(w, qtype: int, x: Act, add: torch.Tensor | None = None, stride_b: int = 0,
              block_n: int | None = None, nb: int | None = None, packed: bool | None = None,
              stages: int | None = None, pair: int | None = None, prefetch: int | None = None) -> torch.Tensor:
    """y = x @ W.T (+ add) for a quantized W and 8-bit activations x (act_q8): (T, N) float32.
    w: GGUF bytes (N, row_bytes) uint8, or a packed.Packed. add: a bias (stride_b 0) or a residual
    (stride_b its row stride). packed: the kernel of the repacked type (the default where there is
    one; file bytes are repacked here, for tests and benchmarks: the backend repacks once at load),
    False: the byte-wise one on the file's bytes;
    block_n, nb: tiles (rows, blocks per step) instead of the defaults/autotuning; stages, pair, prefetch:
    see _packed_launch."""
    T, K = x.q.shape
    N = w.shape[0]
    dev = w.qs.device if isinstance(w, Packed) else w.device
    y = torch.empty(T, N, dtype=torch.float32, device=dev)
    if T == 0:
        return y
    has_add = add is not None
    a = add if has_add else y
    if packed is None:
        packed = isinstance(w, Packed) or qtype in PACKED
    gpu = dev.type == "cuda"
    if not packed:
        assert not isinstance(w, Packed), "the byte-wise kernel reads the file's bytes"
        QK, SUBS, RUN = LAYOUT[qtype]
        bn = block_n or (4 if gpu else min(512, triton.next_power_of_2(N)))
        nbk = nb or max(1, min(1024 if QK == 32 else 512, triton.next_power_of_2(K)) // QK)
        matvec_q8_kernel[(triton.cdiv(N, bn), T)](y, weight_view(w, qtype), x.q, x.d, x.s, a, N, K, y.stride(0),
                                                   stride_b, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN,
                                                   HAS_MIN=qtype in (Q4_1, Q4_K, Q5_K), HAS_ADD=has_add,
                                                   BLOCK_N=bn, NB=nbk, **pdl_launch(dev))
        return y
    _packed_launch(w, qtype, x, y, add, stride_b, block_n, nb, stages=stages, pair=pair, prefetch=prefetch)
    return y


def matvec_glu(w, qtype: int, x: Act, bias: torch.Tensor | None = None, keep_gate_up: bool = False,
               block_n: int | None = None, nb: int | None = None, pair: int | None = None,
               prefetch: int | None = None) -> tuple[Act, torch.Tensor | None]:
    """The fused gate/up product of decode: w the stacked (2 n_ff, K) weight [gate; up] of a type in
    PACKED (packed.Packed, or file bytes repacked here), x its 8-bit input (T, K); bias (2 n_ff,) or
    None. Returns the 8-bit form (act_q8) of silu(gate) * up (T, n_ff), made in the product's epilogue
    with act_q8's arithmetic, and (keep_gate_up) the float [gate | up] rows (T, 2 n_ff), else None.
    block_n (a multiple of 64: gate and up rows), nb, pair, prefetch (_packed_launch): tiles instead of the
    defaults/autotuning."""
    T, K = x.q.shape
    N = w.shape[0]
    assert qtype in PACKED and N % 64 == 0, "the fused gate/up product takes a repacked type, n_ff whole blocks"
    dev = w.qs.device if isinstance(w, Packed) else w.device
    n_ff = N // 2
    h = Act(torch.empty(T, n_ff, dtype=torch.int8, device=dev),
            torch.empty(T, n_ff // 32, dtype=torch.float32, device=dev),
            torch.empty(T, n_ff // 32, dtype=torch.float32, device=dev))
    y = torch.empty(T, N, dtype=torch.float32, device=dev) if keep_gate_up else h.d
    if T:
        if bias is not None:
            assert bias.shape == (N,) and bias.dtype == torch.float32
        _packed_launch(w, qtype, x, y, bias, 0, block_n, nb, glu=True, h=h, store_y=keep_gate_up, pair=pair,
                       prefetch=prefetch)
    return h, (y if keep_gate_up else None)


def matvec_norm(w, qtype: int, x: Act, res: torch.Tensor, norm: torch.Tensor, eps: float, tickets: torch.Tensor,
                block_n: int | None = None, nb: int | None = None, pair: int | None = None,
                prefetch: int | None = None) -> tuple[torch.Tensor, Act]:
    """A product that writes the residual stream, and the next RMSNorm's 8-bit output from its last
    program (decode: no act_q8 launch between it and the products that read the normalized row):
    y = x @ W.T + res (T, N) float32 and the 8-bit form (act_q8) of rms_norm(y) * norm (N,).
    w: a type in PACKED (packed.Packed, or file bytes repacked here); tickets: (T,) int32 zeros on the
    device (each row's count of finished programs, put back to zero by the last); block_n, nb, pair,
    prefetch (_packed_launch): tiles instead of the defaults/autotuning."""
    T, K = x.q.shape
    N = w.shape[0]
    assert qtype in PACKED and N % 32 == 0, "the norm epilogue takes a repacked type, rows of whole blocks"
    assert res.shape == (T, N) and res.dtype == torch.float32 and res.stride(1) == 1 and norm.shape == (N,)
    dev = res.device
    y = torch.empty(T, N, dtype=torch.float32, device=dev)
    h = Act(torch.empty(T, N, dtype=torch.int8, device=dev), torch.empty(T, N // 32, dtype=torch.float32, device=dev),
            torch.empty(T, N // 32, dtype=torch.float32, device=dev))
    if T:
        _packed_launch(w, qtype, x, y, res, res.stride(0), block_n, nb, h=h, norm=norm, eps=eps, tickets=tickets,
                       pair=pair, prefetch=prefetch)
    return y, h


def matvec(w, qtype: int, x, bias: torch.Tensor | None = None, res: torch.Tensor | None = None,
           block_n: int | None = None, block_k: int | None = None, packed: bool | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) (+ res) for decode.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight, or its packed.Packed form; x: (T, K) float
    rows or their act_q8 form
    (quantized weights take the 8-bit form: float rows are quantized here; float weights take the
    float rows: an Act must then carry them); bias: (N,) float32 or None; res: (T, N) float32 or None,
    a residual added in the epilogue (the block's `x + proj`, without a launch of its own) -> (T, N)
    float32. block_n, block_k: tiles instead of the defaults; packed: see matvec_q8."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert isinstance(w, Packed) or w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
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
        return matvec_q8(w, qtype, xa, add, stride_b, block_n, nb, packed)
    if isinstance(x, Act):
        assert x.f is not None, "a float weight needs the float activations"
        x = x.f
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    QK, SUBS, RUN = LAYOUT[qtype]
    block_k = block_k or 1024  # the best of a sweep on the H200 (benchmarks/results/triton_sweep.md)
    # many small programs fill a GPU; the interpreter runs one program at a time in Python, so fewer
    block_n = block_n or (4 if x.is_cuda else min(512, triton.next_power_of_2(N)))
    if T:
        matvec_kernel[(triton.cdiv(N, block_n), T)](
            y, weight_view(w, qtype), x, add if add is not None else y, N, K, x.stride(0), y.stride(0), stride_b,
            QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=add is not None, BLOCK_N=block_n,
            NB=max(1, min(block_k, triton.next_power_of_2(K)) // QK), **pdl_launch(x.device))  # short rows: no padding
    return y


def matvec_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
               res: torch.Tensor | None = None) -> torch.Tensor:
    """Float activations (the float64 tests' reference is this, with x already through act_q8 where
    the weight is quantized). w: file bytes or Packed."""
    wf = dequantize_packed_ref(w) if isinstance(w, Packed) else dequantize_ref(w, qtype, x.shape[1])
    y = x.float() @ wf.T
    y = y if bias is None else y + bias
    return y if res is None else y + res
