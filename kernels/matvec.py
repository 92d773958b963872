"""Decode products: y = W x for a few activation rows, W read once per row block as its GGUF bytes and
dequantized in registers (no float copy of the weight exists anywhere).

Decode is bound by the weight bytes: each program owns BLOCK_N output rows and streams their bytes
in BLOCK_K-wide tiles; activations are float (what the CPU core's exact `dot` path computes, no 8-bit
activation rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quants import BLOCKS, dequant_tile, dequantize_ref, row_bytes, weight_view


@triton.jit
def matvec_kernel(
    Y, W, X, BIAS,  # pointers
    N, K,  # W is (N, K) logical
    stride_x, stride_y,
    QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)  # activation row
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced once at the end
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += dequant_tile(W, rows[:, None], cols[None, :], N, K, QTYPE) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


def matvec(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           block_n: int = 16, block_k: int = 256) -> torch.Tensor:
    """y = x @ W.T (+ bias) for decode.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (T, K) float; bias: (N,) float32 or None
    -> (T, N) float32. One program per BLOCK_N rows and activation row."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    grid = (triton.cdiv(N, block_n), T)
    matvec_kernel[grid](y, weight_view(w, qtype), x, bias if bias is not None else y, N, K, x.stride(0), y.stride(0),
                        QTYPE=qtype, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def matvec_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_ref(w, qtype, x.shape[1]).T
    return y if bias is None else y + bias
