"""Prefill products: Y = X W^T on tensor cores (tl.dot) over weight tiles dequantized in registers.

Each program owns a BLOCK_M x BLOCK_N output tile; per BLOCK_K step it decodes the (BLOCK_N, BLOCK_K)
weight tile from the GGUF bytes, rounds both operands to half precision and accumulates in float32,
as llama.cpp's CUDA path does for batches (dequantize to f16, then a half GEMM). F32 weights keep
float32 operands.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .matvec import _f16_bits, _k_scale_min, _small_int
from .quants import BF16, BLOCKS, F16, F32, LAYOUT, Q4_K, dequant_tile, dequantize_ref, row_bytes, weight_view


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
def matmul_q4_k_kernel(
    Y, W32, X, BIAS,  # pointers; W32: the Q4_K bytes as 32-bit words (36 a block)
    M, N, K,
    stride_xm, stride_ym, stride_b,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q4_K prefill from whole words: per block, the 32 code words of each row split into the low
    nibbles (values 64c + l) and the high ones (64c + 32 + l) as two (BLOCK_N, 128) tiles, each scaled
    by its runs' 6-bit scale and min (matvec's conversion-free decode); the activations are loaded in
    the same column order, so two tl.dot of depth 128 cover the block."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nblk = K // 256
    nmask = offs_n < N
    row_w = offs_n.to(tl.int64) * (nblk * 36)
    c = tl.arange(0, 4)
    w = tl.arange(0, 8)
    k = tl.arange(0, 4)
    i = tl.arange(0, 128)  # column of a half tile: c * 32 + 4w + k
    xcol = 64 * (i // 32) + i % 32
    xmask = offs_m[:, None] < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, nblk):
        base = row_w + b * 36  # (BN,)
        b3 = base[:, None, None]
        m3 = nmask[:, None, None]
        dd = tl.load(W32 + b3, mask=m3, other=0)
        d, dmin = _f16_bits(dd), _f16_bits(dd >> 16)  # (BN, 1, 1)
        w1 = tl.load(W32 + b3 + 1, mask=m3, other=0)
        w2 = tl.load(W32 + b3 + 2, mask=m3, other=0)
        w3 = tl.load(W32 + b3 + 3, mask=m3, other=0)
        sc_lo, mn_lo = _k_scale_min(w1, w2, w3, 2 * c[None, :, None])  # (BN, 4, 1)
        sc_hi, mn_hi = _k_scale_min(w1, w2, w3, 2 * c[None, :, None] + 1)
        q = tl.load(W32 + b3 + 4 + 8 * c[None, :, None] + w[None, None, :], mask=m3, other=0)  # (BN, 4, 8)
        sh = (8 * k)[None, None, None, :]
        lo = _small_int((q[:, :, :, None] >> sh) & 15, 0)  # (BN, 4, 8, 4)
        hi = _small_int((q[:, :, :, None] >> (sh + 4)) & 15, 0)
        wl = (d * sc_lo)[:, :, :, None] * lo - (dmin * mn_lo)[:, :, :, None]
        wh = (d * sc_hi)[:, :, :, None] * hi - (dmin * mn_hi)[:, :, :, None]
        wl = tl.reshape(wl, [BLOCK_N, 128]).to(tl.float16)
        wh = tl.reshape(wh, [BLOCK_N, 128]).to(tl.float16)
        xp = X + offs_m[:, None].to(tl.int64) * stride_xm + b * 256 + xcol[None, :]
        xl = tl.load(xp, mask=xmask, other=0.0).to(tl.float16)
        xh = tl.load(xp + 32, mask=xmask, other=0.0).to(tl.float16)
        acc += tl.dot(xl, tl.trans(wl))
        acc += tl.dot(xh, tl.trans(wh))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_m[:, None].to(tl.int64) * stride_b + offs_n[None, :],
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


WIDE_FAILED: dict = {}  # type -> why its wide-word kernel did not run here (then the generic one does)


def matmul(w: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
           res: torch.Tensor | None = None, wide: bool | None = None) -> torch.Tensor:
    """Y = X @ W.T (+ bias) (+ res) for prefill.

    w: (N, row_bytes) uint8 GGUF bytes of a (N, K) weight; x: (M, K) float; bias: (N,) float32 or None;
    res: (M, N) float32 or None, added in the epilogue -> (M, N) float32. Block sizes are at least 16
    (tl.dot); block_k is raised to a whole block. wide: Q4_K's whole-word kernel (the default unless
    $SEPEDGE_TRITON_MATVEC is "bytes"), False: the generic one."""
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
    if qtype == Q4_K and (wide is True or (wide is None and os.environ.get("SEPEDGE_TRITON_MATVEC", "") != "bytes"
                                             and qtype not in WIDE_FAILED)):
        bm = block_m or min(64, max(16, triton.next_power_of_2(M)))
        bn = block_n or 64
        grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
        args = (y, w.view(torch.int32), x, add if add is not None else y, M, N, K, x.stride(0), y.stride(0), stride_b)
        if wide is True:
            matmul_q4_k_kernel[grid](*args, HAS_BIAS=add is not None, BLOCK_M=bm, BLOCK_N=bn)
            return y
        try:  # the default: a kernel that does not compile here leaves the generic one, said aloud
            matmul_q4_k_kernel[grid](*args, HAS_BIAS=add is not None, BLOCK_M=bm, BLOCK_N=bn)
            return y
        except (triton.CompilationError, triton.runtime.errors.OutOfResources) as e:
            WIDE_FAILED[qtype] = f"{type(e).__name__}: {e}"
            print(f"sepedge.kernels: the whole-word Q4_K matmul failed here, the generic one runs: {e}", file=sys.stderr)
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
