"""Prefill products: Y = X W^T on tensor cores (tl.dot) over weight tiles decoded in registers.

Each program owns a BLOCK_M x BLOCK_N output tile. Quantized weights take 8-bit activations
(act_q8.py): per 32 values an int8 tl.dot of the codes, then the block scales on a float32
accumulator (llama.cpp's mmq; the CPU core's arithmetic). Float weights: F16/BF16 tiles with half
operands and float32 sums, F32 with float32 operands.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .act_q8 import Act, act_q8
from .quants import (BF16, BLOCKS, F16, F32, LAYOUT, Q4_1, Q4_K, Q5_K, codes_tile, dequant_tile, dequantize_ref, row_bytes,
                     weight_view)


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


@triton.jit
def matmul_q8_kernel(
    Y, W, XQ, XD, XS, ADD,  # pointers: XQ/XD/XS the 8-bit activations (act_q8.py)
    M, N, K,
    stride_ym, stride_b,
    QTYPE: tl.constexpr, QK: tl.constexpr, RUN: tl.constexpr, HAS_MIN: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Quantized weights times 8-bit activations, as llama.cpp's mmq: per 32 values an integer tl.dot
    of activation codes and weight codes (int8 tensor cores, exact int32 sums), then the run's weight
    scale times the activation block's scale (and the min times d_x * sum) on the float32
    accumulator: the CPU core's per-block arithmetic, and nothing is ever held in half precision."""
    pid_n = tl.program_id(0)  # neighbouring programs share the activation tile and walk the weight
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    l = tl.arange(0, 32)
    nq = K // 32
    mm = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, nq):
        xq = tl.load(XQ + offs_m[:, None].to(tl.int64) * K + c * 32 + l[None, :], mask=mm[:, None], other=0)
        dx = tl.load(XD + offs_m.to(tl.int64) * nq + c, mask=mm, other=0.0)[:, None]
        blk = c * 32 // QK + tl.zeros([1, 1], dtype=tl.int32)  # a tensor (the interpreter wants tensor masks)
        if RUN == 32:
            q, scale, mn = codes_tile(W, offs_n[:, None], blk, (c * 32 % QK) // 32, l[None, :], N, K, QTYPE, QK, RUN)
            s = tl.dot(xq, tl.trans(q.to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            acc += (tl.reshape(scale, [1, BLOCK_N]) * dx) * s
            if HAS_MIN:
                sx = tl.load(XS + offs_m.to(tl.int64) * nq + c, mask=mm, other=0.0)[:, None]
                acc -= tl.reshape(mn, [1, BLOCK_N]) * sx
        else:  # runs of 16 (Q6_K): two scales per 32 values, one integer product each
            sub = (c * 32 % QK) // 16 + l[None, :] // 16
            q, scale, mn = codes_tile(W, offs_n[:, None], blk, sub, l[None, :] % 16, N, K, QTYPE, QK, RUN)
            first = l[None, :] < 16
            sa = tl.dot(xq, tl.trans(tl.where(first, q, 0).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            sb = tl.dot(xq, tl.trans(tl.where(first, 0, q).to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            scale_a = tl.reshape(tl.sum(tl.where(l[None, :] == 0, scale, 0.0), axis=1), [1, BLOCK_N])
            scale_b = tl.reshape(tl.sum(tl.where(l[None, :] == 16, scale, 0.0), axis=1), [1, BLOCK_N])
            acc += (scale_a * dx) * sa
            acc += (scale_b * dx) * sb
    if HAS_ADD:
        acc += tl.load(ADD + offs_m[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


FLOAT_TYPES = (F32, F16, BF16)


def matmul(w: torch.Tensor, qtype: int, x, bias: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
           res: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X @ W.T (+ bias) (+ res) for prefill.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (M, K) float rows or their act_q8 form
    (quantized weights take the 8-bit form, made here from float rows; float weights the float rows);
    bias: (N,) float32 or None; res: (M, N) float32 or None, added in the epilogue -> (M, N) float32.
    Block sizes are at least 16 (tl.dot); block_k (float weights) is raised to a whole block."""
    M, K = x.shape
    N = w.shape[0]
    assert K % BLOCKS[qtype][0] == 0, "K must be a whole number of blocks"
    assert w.shape[1] == row_bytes(qtype, K), "weight row bytes do not match the type and K"
    y = torch.empty(M, N, dtype=torch.float32, device=w.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == torch.float32
    if res is not None:
        assert res.shape == (M, N) and res.dtype == torch.float32 and res.stride(1) == 1
        if bias is not None:  # one epilogue term: fold the bias into the residual
            res, bias = res + bias, None
    add, stride_b = (res, res.stride(0)) if res is not None else (bias, 0)
    if M == 0:
        return y
    QK, SUBS, RUN = LAYOUT[qtype]
    if qtype not in FLOAT_TYPES:
        xa = x if isinstance(x, Act) else act_q8(x)
        # tiles: the best of a sweep on the H200 (benchmarks/results/triton_sweep.md); the interpreter
        # runs one program at a time in Python: few, large tiles there
        block_m = block_m or min(64, max(16, triton.next_power_of_2(M)))  # short chunks: less padding
        block_n = block_n or (64 if w.is_cuda else 128)
        assert min(block_m, block_n) >= 16, "tl.dot needs tiles of at least 16"
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
        matmul_q8_kernel[grid](y, weight_view(w, qtype), xa.q, xa.d, xa.s, add if add is not None else y, M, N, K,
                               y.stride(0), stride_b, QTYPE=qtype, QK=QK, RUN=RUN,
                               HAS_MIN=qtype in (Q4_1, Q4_K, Q5_K), HAS_ADD=add is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n)
        return y
    if isinstance(x, Act):
        assert x.f is not None, "a float weight needs the float activations"
        x = x.f
    x = x.contiguous()
    block_k = max(block_k or (64 if x.is_cuda else 256), QK)  # whole blocks per step
    block_m = block_m or min(128, max(16, triton.next_power_of_2(M)))
    block_n = block_n or 128
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
