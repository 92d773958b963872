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

from .quants import BLOCKS, LAYOUT, dequant_tile, dequantize_ref, row_bytes, weight_view


@triton.jit
def matvec_kernel(
    Y, W, X, BIAS,  # pointers
    N, K,  # W is (N, K) logical
    stride_x, stride_y,
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
        y += tl.load(BIAS + rows, mask=rows < N, other=0.0)
    tl.store(Y + t * stride_y + rows, y, mask=rows < N)


def matvec(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for decode.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (T, K) float; bias: (N,) float32 or None
    -> (T, N) float32. One program per BLOCK_N rows and activation row, block_k values (at least one
    block) per step."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    QK, SUBS, RUN = LAYOUT[qtype]
    if block_k is None:  # the best of a sweep on the H200 (benchmarks/results/triton_sweep.md)
        block_k = 1024 if QK == 32 else 512
    # many small programs fill a GPU; the interpreter runs one program at a time in Python, so fewer
    block_n = block_n or (4 if x.is_cuda else min(256, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, block_n), T)
    matvec_kernel[grid](y, weight_view(w, qtype), x, bias if bias is not None else y, N, K, x.stride(0), y.stride(0),
                        QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=bias is not None, BLOCK_N=block_n,
                        NB=max(1, min(block_k, triton.next_power_of_2(K)) // QK))  # short rows: no padding
    return y


def matvec_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_ref(w, qtype, x.shape[1]).T
    return y if bias is None else y + bias
