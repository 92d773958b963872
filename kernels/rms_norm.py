"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, one program per row (the rows are short: n_embd)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    Y, X, W,  # pointers
    N,  # row length
    stride_x, stride_y,
    eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(X + row * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, x * rstd * w, mask=cols < N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (T, N) float, weight: (N,) float -> (T, N) float32."""
    T, N = x.shape
    assert weight.shape == (N,), "weight must have the row length"
    assert x.stride(1) == 1, "rows must be contiguous"
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if T:
        rms_norm_kernel[(T,)](y, x, weight.contiguous(), N, x.stride(0), y.stride(0), eps,
                              BLOCK_N=triton.next_power_of_2(N))
    return y


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool = True) -> torch.Tensor:
    if upcast:
        x, weight = x.float(), weight.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
