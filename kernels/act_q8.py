"""Activations to 8 bits: the rows that feed a quantized weight, in blocks of 32 values with a float32
scale d = max|x| / 127 and codes q = x / d rounded to nearest even, plus d * sum(q) (the term that
applies an offset or a min to the whole block with one multiply).

This is the CPU core's `quantize_q8` (native/src/se-quants.c) value for value, and the form in which
llama.cpp's integer paths (mmvq, mmq) take activations: the products then sum codes in integers and
apply the block scales once per block, so the Triton backend does the CPU engine's arithmetic (same
greedy text near ties) and no operand can overflow a half-precision range (a float32 scale per block).

As the CPU core does, the step that makes a product's input is fused here: the block's RMSNorm (the
residual stream through the norm weight) or SwiGLU (silu(gate) * up) runs in the same launch. In
decode the kernel before a product can make its input instead, with the same arithmetic
(quantize_blocks, norm_q8_row): the attention merge, the fused gate/up product (matvec_glu) and the
products into the residual stream (matvec_norm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, pdl_wait

PLAIN, NORM, SWIGLU = 0, 1, 2  # what the kernel computes before quantizing


class Act(NamedTuple):
    """An activation batch in 8 bits: q (T, K) int8, d (T, K / 32) float32 scales, s (T, K / 32)
    float32 = d * sum of the block's codes; f (T, K) float32 or None: the float rows (for float
    weights and for tests)."""
    q: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor
    f: torch.Tensor | None = None

    @property
    def shape(self):
        return self.q.shape


@triton.jit
def _round_even(v, GPU: tl.constexpr):
    """v rounded to the nearest integer, ties to even (the CPU's nearbyintf / cvtps): the PTX
    conversion on a GPU; elsewhere 1.5 * 2^23 added and taken away in float32, which rounds there
    by the IEEE rule (|v| <= 127 here)."""
    if GPU:
        # on 32-bit registers (PTX: bit-size operands fit any type of their size)
        r = tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [v.to(tl.int32, bitcast=True)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        return r.to(tl.float32, bitcast=True)
    else:
        return (v + 12582912.0) - 12582912.0


@triton.jit
def quantize_blocks(x, GPU: tl.constexpr):
    """x (NB, 32) float32, one 8-bit block a row -> codes (NB, 32) int32, scales d (NB,) and d * the
    sum of the codes (NB,). The one copy of the arithmetic: act_q8_kernel and the kernels that make
    their consumer's 8-bit blocks in their own epilogue (the attention merge, the fused gate/up
    product) call it, so every path gives the same codes for the same floats."""
    amax = tl.max(tl.abs(x), axis=1)  # (NB,)
    d = tl.math.div_rn(amax, 127.0)  # correctly rounded, as C's division (a plain '/' may be approximate)
    inv = tl.math.div_rn(1.0, tl.where(d != 0, d, 1.0))
    inv = tl.where(d != 0, inv, 0.0)
    q = _round_even(x * inv[:, None], GPU).to(tl.int32)
    return q, d, d * tl.sum(q, axis=1).to(tl.float32)


@triton.jit
def silu_mul(g, u):
    """SwiGLU as the CPU core writes it: g / (1 + e^-g) * u (a correctly rounded division)."""
    return tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u


@triton.jit
def _norm_q8_store(x, rstd, blk, cols, m, NW, XQ, XD, XS, Y, nblk, STORE_Y: tl.constexpr, GPU: tl.constexpr):
    """Blocks blk (NB,) of a row, x (NB, 32) float32 at cols: x * rstd * NW in 8 bits to XQ, XD, XS."""
    x = x * rstd * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
    if STORE_Y:
        tl.store(Y + cols, x, mask=m)
    q, d, s = quantize_blocks(x, GPU)
    tl.store(XQ + cols, q.to(tl.int8), mask=m)
    tl.store(XD + blk, d, mask=blk < nblk)
    tl.store(XS + blk, s, mask=blk < nblk)


@triton.jit
def _rstd(sq, K, eps):
    """1 / sqrt(mean + eps) of a row from its squares sq (float64 tile): the float64 sum, then correctly
    rounded float32."""
    mean = tl.sum(tl.sum(sq, axis=1), axis=0) / K + eps
    return tl.math.div_rn(1.0, tl.sqrt_rn(mean.to(tl.float32)))


@triton.jit
def norm_q8_row(X, NW, XQ, XD, XS, Y, K, eps, STORE_Y: tl.constexpr, GPU: tl.constexpr, NB: tl.constexpr):
    """rms_norm(x) * NW of the row X (K,) in 8 bits: codes XQ (K,), XD, XS (K / 32,), the float row to Y
    (STORE_Y); in runs of NB blocks (registers for NB * 32 values, whatever K). As the CPU core's
    rmsnorm: the sum of squares in float64 (exact products, an order-independent sum to ~2^-53), then
    correctly rounded float32 operations: the rows agree with the CPU's to the last bit far more often
    than float32 sums would, so fewer codes land on the other side of a rounding tie (a quantized
    embedding row through a norm weight of 1 gives exact ties). act_q8 and the products that make
    their consumer's input in their epilogue (matvec's NORM) both call this: the same codes.
    A row of at most NB blocks is loaded once (one round trip to memory instead of two: in decode
    this kernel is a link of the step's chain). Loads bypass L1 (.cg): in an epilogue the row was
    just written by other programs."""
    nblk = K // 32
    if nblk <= NB:
        blk = tl.arange(0, NB)
        cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
        m = (blk < nblk)[:, None]
        x = tl.load(X + cols, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        x64 = x.to(tl.float64)
        rstd = _rstd(x64 * x64, K, eps)
        _norm_q8_store(x, rstd, blk, cols, m, NW, XQ, XD, XS, Y, nblk, STORE_Y, GPU)
    else:
        ss = tl.zeros([NB, 32], dtype=tl.float64)
        for b0 in range(0, nblk, NB):
            blk = b0 + tl.arange(0, NB)
            cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
            x64 = tl.load(X + cols, mask=(blk < nblk)[:, None], other=0.0, cache_modifier=".cg").to(tl.float64)
            ss += x64 * x64
        rstd = _rstd(ss, K, eps)
        for b0 in range(0, nblk, NB):
            blk = b0 + tl.arange(0, NB)
            cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
            m = (blk < nblk)[:, None]
            x = tl.load(X + cols, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
            _norm_q8_store(x, rstd, blk, cols, m, NW, XQ, XD, XS, Y, nblk, STORE_Y, GPU)


@triton.jit
def act_q8_kernel(
    XQ, XD, XS, Y,  # outputs: codes (T, K) int8, scales and scaled sums (T, K / 32), float rows (STORE_Y)
    X, U, NW,  # inputs: X (PLAIN, NORM: the rows; SWIGLU: gate), U (SWIGLU: up), NW (NORM: its weight)
    K, stride_x, stride_u, stride_y, eps,
    MODE: tl.constexpr, STORE_Y: tl.constexpr, GPU: tl.constexpr,
    NB: tl.constexpr,  # blocks of 32 per program (NORM: per step of the one program of a row)
    PDL: tl.constexpr = 0,  # launched early (pdl.py): wait for the kernel before
):
    pdl_wait(PDL)
    t = tl.program_id(1).to(tl.int64)
    nblk = K // 32
    if MODE == 1:  # RMSNorm over the row: one program has it all
        norm_q8_row(X + t * stride_x, NW, XQ + t * K, XD + t * nblk, XS + t * nblk, Y + t * stride_y, K, eps,
                    STORE_Y, GPU, NB)
    else:
        blk = tl.program_id(0) * NB + tl.arange(0, NB)
        cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]  # (NB, 32)
        m = (blk < nblk)[:, None]
        x = tl.load(X + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        if MODE == 2:  # SwiGLU
            u = tl.load(U + t * stride_u + cols, mask=m, other=0.0).to(tl.float32)
            x = silu_mul(x, u)
        if STORE_Y:
            tl.store(Y + t * stride_y + cols, x, mask=m)
        q, d, s = quantize_blocks(x, GPU)
        tl.store(XQ + t * K + cols, q.to(tl.int8), mask=m)
        tl.store(XD + t * nblk + blk, d, mask=blk < nblk)
        tl.store(XS + t * nblk + blk, s, mask=blk < nblk)


# blocks of 32 per step of a row's RMSNorm in matvec's epilogue (1024 values: 8 a thread of 4 warps);
# a constexpr because compiled kernels may read only constexpr globals
NORM_NB = tl.constexpr(32)
# the act_q8 launch's: rows of up to 4096 values in one tile of 8 warps (16 a thread), loaded once
NORM_ROW_NB, NORM_ROW_WARPS = 128, 8


def act_q8(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, up: torch.Tensor | None = None,
           keep_float: bool = False, block: int = 1024) -> Act:
    """The 8-bit form of x (T, K) (K a multiple of 32); with `norm` (K,) of rms_norm(x) * norm, with `up`
    (T, K) of silu(x) * up. Rows may be strided (the halves of a fused gate/up product); keep_float:
    also return the float rows the codes were made from."""
    T, K = x.shape
    assert K % 32 == 0, "rows must be whole blocks of 32"
    assert x.stride(1) == 1 and (up is None or (up.shape == x.shape and up.stride(1) == 1)), "rows must be contiguous"
    assert norm is None or up is None, "one of norm and up"
    dev = x.device
    q = torch.empty(T, K, dtype=torch.int8, device=dev)
    d = torch.empty(T, K // 32, dtype=torch.float32, device=dev)
    s = torch.empty(T, K // 32, dtype=torch.float32, device=dev)
    y = torch.empty(T, K, dtype=torch.float32, device=dev) if keep_float else None
    if T:
        mode = NORM if norm is not None else SWIGLU if up is not None else PLAIN
        nb = max(1, min(NORM_ROW_NB if mode == NORM else block // 32, triton.next_power_of_2(K // 32)))
        warps = NORM_ROW_WARPS if mode == NORM and nb >= 64 else 4
        act_q8_kernel[(1 if mode == NORM else triton.cdiv(K // 32, nb), T)](
            q, d, s, y if y is not None else d, x, up if up is not None else x, norm if norm is not None else x, K,
            x.stride(0), up.stride(0) if up is not None else 0, K, eps, MODE=mode, STORE_Y=keep_float,
            GPU=dev.type == "cuda", NB=nb, num_warps=warps, **pdl_launch(dev))
    return Act(q, d, s, y)


def act_q8_ref(x: torch.Tensor) -> Act:
    """The CPU core's quantize_q8 in torch (float32 throughout, round half to even)."""
    x = x.float()
    b = x.reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1)
    # tensor divisors: torch divides by a scalar as a product with its reciprocal on CUDA, which
    # rounds differently from C's division
    d = amax / torch.full_like(amax, 127)
    inv = torch.where(d != 0, torch.ones_like(d) / torch.where(d != 0, d, torch.ones_like(d)), 0)
    q = torch.round(b * inv[..., None])  # torch.round: half to even
    return Act(q.to(torch.int8).reshape(x.shape), d, d * q.sum(-1), x)
