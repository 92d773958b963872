"""SwiGLU: silu(gate) * up, elementwise (the feed-forward's gate of llama and qwen2)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(
    OUT, GATE, UP,  # pointers; rows may be strided (the halves of a fused gate/up product)
    n, stride_g, stride_u, stride_o,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(GATE + t * stride_g + offs, mask=offs < n, other=0.0).to(tl.float32)
    u = tl.load(UP + t * stride_u + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + t * stride_o + offs, g / (1.0 + tl.exp(-g)) * u, mask=offs < n)


def swiglu(gate: torch.Tensor, up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate, up: same shape (..., n), float, contiguous last axis (rows may be strided when 2-D)
    -> float32 of that shape."""
    assert gate.shape == up.shape, "gate and up must have one shape"
    shape = gate.shape
    if gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        gate, up = gate.contiguous().reshape(1, -1), up.contiguous().reshape(1, -1)
    T, n = gate.shape
    out = torch.empty(T, n, dtype=torch.float32, device=gate.device)
    if out.numel():
        swiglu_kernel[(triton.cdiv(n, block), T)](out, gate, up, n, gate.stride(0), up.stride(0), out.stride(0),
                                                  BLOCK=block)
    return out.reshape(shape)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate.float()) * up.float()
