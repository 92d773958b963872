"""The output head: logits = rms_norm(x) W_out^T, the final norm fused into a vocabulary-wide product.

Every program recomputes the row's inverse RMS (n_embd values, cheap next to its BLOCK_N vocabulary
rows of weight bytes) instead of a separate launch and a round trip of the normalized row; the weight
is dequantized in registers like the decode products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, pdl_wait
from .quants import BLOCKS, LAYOUT, dequant_tile, dequantize_ref, row_bytes, weight_view


@triton.jit
def head_kernel(
    LOGITS, W, X, NORM,  # pointers
    N, K,  # W is (n_vocab, n_embd) logical
    stride_x, stride_y,
    eps,
    QTYPE: tl.constexpr, QK: tl.constexpr, SUBS: tl.constexpr, RUN: tl.constexpr,  # quants.LAYOUT
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr,
    PDL: tl.constexpr = 0,  # launched early (pdl.py)
):
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r4 = rows[:, None, None, None]
    blocks = tl.arange(0, NB)[None, :, None, None]
    sub = tl.arange(0, SUBS)[None, None, :, None]
    l = tl.arange(0, RUN)[None, None, None, :]
    acc = tl.zeros([BLOCK_N, NB, SUBS, RUN], dtype=tl.float32)
    for b0 in range(0, tl.cdiv(K, QK), NB):
        cols = (b0 + blocks) * QK + sub * RUN + l
        x = tl.load(X + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        x = x * tl.load(NORM + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += dequant_tile(W, r4, b0 + blocks, sub, l, N, K, QTYPE, QK, RUN) * x
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    tl.store(LOGITS + t * stride_y + rows, y * rstd, mask=rows < N)


def head(w: torch.Tensor, qtype: int, x: torch.Tensor, norm: torch.Tensor, eps: float,
         block_n: int | None = None, block_k: int = 512) -> torch.Tensor:
    """Logits of the rows of x.

    w: (n_vocab, row_bytes) uint8 GGUF bytes (output.weight, or token_embd.weight when tied);
    x: (T, n_embd) float residual stream; norm: (n_embd,) float (output_norm.weight) -> (T, n_vocab) float32."""
    T, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0 and w.shape[1] == row_bytes(qtype, K), "weight bytes do not match n_embd"
    assert norm.shape == (K,), "norm weight must have n_embd entries"
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if T:
        QK, SUBS, RUN = LAYOUT[qtype]
        block_n = block_n or (8 if x.is_cuda else min(512, triton.next_power_of_2(N)))  # interpreter: see matvec
        head_kernel[(triton.cdiv(N, block_n), T)](y, weight_view(w, qtype), x, norm.contiguous(), N, K, x.stride(0),
                                                  y.stride(0), eps, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN,
                                                  BLOCK_N=block_n, BLOCK_K=block_k,
                                                  NB=max(1, min(block_k, triton.next_power_of_2(K)) // QK),
                                                  **pdl_launch(x.device))
    return y


def head_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    return h @ dequantize_ref(w, qtype, x.shape[1]).T
