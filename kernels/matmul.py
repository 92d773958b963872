"""Prefill products: Y = X W^T on tensor cores (tl.dot) over weight tiles dequantized in registers.

Each program owns a BLOCK_M x BLOCK_N output tile; per BLOCK_K step it decodes the (BLOCK_N, BLOCK_K)
weight tile from the GGUF bytes, rounds both operands to half precision and accumulates in float32,
as llama.cpp's CUDA path does for batches (dequantize to f16, then a half GEMM). F32 weights keep
float32 operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quants import BF16, BLOCKS, F16, F32, LAYOUT, dequant_tile, dequantize_ref, row_bytes, weight_view


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


def matmul(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
           res: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X @ W.T (+ bias) (+ res) for prefill.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (M, K) float; bias: (N,) float32 or None;
    res: (M, N) float32 or None, added in the epilogue -> (M, N) float32. Block sizes are at least 16
    (tl.dot); block_k is raised to a whole block."""
    M, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    if res is not None:
        assert res.shape == (M, N) and res.dtype == torch.float32 and res.stride(1) == 1
        if bias is not None:  # one epilogue term: fold the bias into the residual
            res, bias = res + bias, None
    add, stride_b = (res, res.stride(0)) if res is not None else (bias, 0)
    QK, SUBS, RUN = LAYOUT[qtype]
    # the interpreter runs one program at a time in Python: few, large tiles there
    block_k = max(block_k or (64 if x.is_cuda else 256), QK)  # whole blocks per step
    # defaults: the best of a sweep on the H200; K-quant tiles of 256 values leave room for 64 x 64
    block_m = block_m or min(128 if QK == 32 else 64, max(16, triton.next_power_of_2(M)))  # short chunks: less padding
    block_n = block_n or (128 if qtype in (F16, BF16) or not x.is_cuda else 64)
    assert min(block_m, block_n, block_k) >= 16, "tl.dot needs tiles of at least 16"
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    matmul_kernel[grid](y, weight_view(w, qtype), x, add if add is not None else y, M, N, K, x.stride(0),
                        y.stride(0), stride_b, QTYPE=qtype, QK=QK, SUBS=SUBS, RUN=RUN, HAS_BIAS=add is not None,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def matmul_ref(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
               upcast: bool = True, res: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float32 (upcast) or with the kernel's half-precision operands."""
    wf = dequantize_ref(w, qtype, x.shape[1])
    if not upcast and qtype != F32:
        x, wf = x.half().float(), wf.half().float()
    y = x.float() @ wf.T
    y = y if bias is None else y + bias
    return y if res is None else y + res
