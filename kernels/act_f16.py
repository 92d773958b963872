"""Activations to half precision for the prefill products of long chunks: each row scaled by a power of
two s (one float32 per row) so that its largest value lies in [2^13, 2^14), then rounded to float16.

Why: a prompt's products are large enough to be bound by the tensor cores, and the 8-bit path
(act_q8.py) then pays a rescale of the accumulator per 32 values; half-precision rows let the product
(matmul.py, matmul_f16_kernel) sum whole K tiles of 64-256 values per tl.dot and apply s once in its
epilogue (llama.cpp likewise feeds large batches to a float16 GEMM over dequantized weights). The
row scale keeps rows far beyond float16's range (65504; random-weight 8B files reach 1e6 in their
feed-forward rows) finite: s is exact (a power of two), so every value keeps float16's 11 significant
bits unless it is 2^24 below its row's largest (then it is below the row's rounding anyway).

As in act_q8.py, the step that makes a product's input is fused here: RMSNorm (the residual stream
through the norm weight) or SwiGLU (silu(gate) * up). One program per row, two passes over it (the
largest value first, then the scaled rows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .act_q8 import NORM, PLAIN, SWIGLU

TOP = 13  # the row's largest value is scaled into [2^TOP, 2^(TOP + 1)): far from float16's 65504 (2^16)


class ActF16(NamedTuple):
    """A batch of rows in half precision: h (T, K) float16 and s (T,) float32, the rows being s * h."""
    h: torch.Tensor
    s: torch.Tensor

    @property
    def shape(self):
        return self.h.shape


@triton.jit
def _value(X, U, NW, t, cols, m, stride_x, stride_u, rstd, MODE: tl.constexpr):
    x = tl.load(X + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    if MODE == 1:
        x = x * rstd * tl.load(NW + cols, mask=m, other=0.0).to(tl.float32)
    elif MODE == 2:
        u = tl.load(U + t * stride_u + cols, mask=m, other=0.0).to(tl.float32)
        x = x / (1.0 + tl.exp(-x)) * u
    return x


@triton.jit
def act_f16_kernel(
    XH, XS,  # outputs: rows (T, K) float16, scales (T,) float32
    X, U, NW,  # inputs as act_q8_kernel's: X (PLAIN, NORM: the rows; SWIGLU: gate), U (SWIGLU: up), NW (NORM)
    K, stride_x, stride_u, stride_h, eps,
    MODE: tl.constexpr, BLOCK: tl.constexpr, TOP_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    rstd = 1.0
    if MODE == 1:
        # the sum of squares in float64 as act_q8 (and the CPU core) take it: no underflow for tiny rows
        ss = tl.zeros([BLOCK], dtype=tl.float64)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = tl.load(X + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float64)
            ss += x * x
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn((tl.sum(ss, axis=0) / K + eps).to(tl.float32)))
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_value(X, U, NW, t, cols, cols < K, stride_x, stride_u, rstd, MODE)))
    top = tl.max(amax, axis=0)
    # the exponent of the largest value read from its bits (exact; a log2 may be approximate):
    # s = 2^(e - TOP) and 1/s are built as float32 bit patterns, within the normal range
    e = ((top.to(tl.int32, bitcast=True) >> 23) & 255) - 127 - TOP_E
    e = tl.minimum(tl.maximum(e, -126), 126)
    s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        v = _value(X, U, NW, t, cols, cols < K, stride_x, stride_u, rstd, MODE)
        tl.store(XH + t * stride_h + cols, (v * inv).to(tl.float16), mask=cols < K)
    tl.store(XS + t, s)


def act_f16(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
            up: torch.Tensor | None = None) -> ActF16:
    """The half-precision form of x (T, K); with `norm` (K,) of rms_norm(x) * norm, with `up` (T, K) of
    silu(x) * up. Rows may be strided (the halves of a fused gate/up product)."""
    T, K = x.shape
    assert x.stride(1) == 1 and (up is None or (up.shape == x.shape and up.stride(1) == 1)), "rows must be contiguous"
    assert norm is None or up is None, "one of norm and up"
    h = torch.empty(T, K, dtype=torch.float16, device=x.device)
    s = torch.empty(T, dtype=torch.float32, device=x.device)
    if T:
        mode = NORM if norm is not None else SWIGLU if up is not None else PLAIN
        act_f16_kernel[(T,)](h, s, x, up if up is not None else x, norm if norm is not None else x, K, x.stride(0),
                             up.stride(0) if up is not None else 0, K, eps, MODE=mode,
                             BLOCK=min(4096, triton.next_power_of_2(K)), TOP_E=TOP, num_warps=8)
    return ActF16(h, s)


def act_f16_ref(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                up: torch.Tensor | None = None) -> ActF16:
    """The same in torch, float32 (the row scale from frexp: exact)."""
    x = x.float()
    if norm is not None:
        x = x * torch.rsqrt((x.double().pow(2).mean(-1, keepdim=True) + eps).float()) * norm.float()
    elif up is not None:
        x = x / (1 + torch.exp(-x)) * up.float()
    _, e = torch.frexp(x.abs().amax(-1))  # top = m 2^e with m in [0.5, 1): exponent of top is e - 1
    e = (e - 1 - TOP).clamp(-126, 126)
    s = torch.ldexp(torch.ones_like(x[:, 0]), e)
    return ActF16((x * torch.ldexp(torch.ones_like(x[:, 0]), -e)[:, None]).half(), s)
