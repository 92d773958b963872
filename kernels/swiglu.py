"""SwiGLU: silu(gate) * up, elementwise (the feed-forward's gate of llama and qwen2)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(
    OUT, GATE, UP,  # pointers, contiguous
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(GATE + offs, mask=offs < n, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + offs, g / (1.0 + tl.exp(-g)) * u, mask=offs < n)


def swiglu(gate: torch.Tensor, up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate, up: same shape, float -> float32 of that shape."""
    assert gate.shape == up.shape, "gate and up must have one shape"
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.float32, device=gate.device)
    n = gate.numel()
    if n:
        swiglu_kernel[(triton.cdiv(n, block),)](out, gate, up, n, BLOCK=block)
    return out


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate.float()) * up.float()
