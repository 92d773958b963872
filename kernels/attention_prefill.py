"""Prefill attention, flash-attention style, over the live cells of the cache plus the chunk itself.

The chunk's keys and values are written to their cells first; `cells` lists the n_past live cells
every query of the chunk may read, then the chunk's own T cells in token order, so query t reads
entries j <= n_past + t of the list (causal inside the chunk). Programs own BLOCK_M queries of one
head and stream BLOCK_N keys at a time with an online softmax (Dao et al., FlashAttention-2). Both
products take float32 operands at full precision, half-precision caches included (their values
widened): the CPU core's attention does so, and queries or probabilities rounded to half precision
moved the logits by ~1e-3 of their range, enough to part the two engines' greedy text at near-ties.
Attention is a few percent of a prefill's work next to the weight products.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_decode import load_keys
from .rope import NEOX, NORM, rope_ref

LOG2E = 1.4426950408889634


@triton.jit
def attention_prefill_kernel(
    OUT, Q, K, V, CELLS, MASK, DELTAS, INV_FREQ,  # pointers
    T, n_past, rep,  # chunk length, live cells before the chunk, query heads per kv head
    stride_qt, stride_qh, stride_kc, stride_kh, stride_vc, stride_vh, stride_ot, stride_oh, stride_mask,
    qk_scale, D,
    HAS_MASK: tl.constexpr, HAS_DELTA: tl.constexpr, NEOX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,  # the dots' input_precision: "tf32x3" (tensor cores, float32 accuracy) or "ieee"
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // rep
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + t[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32) * qk_scale
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_keys = n_past + T
    if HAS_MASK:
        hi = n_keys
    else:
        hi = tl.minimum(n_past + (pid_m + 1) * BLOCK_M, n_keys)  # the last query of the block sees no further
    for j0 in range(0, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < n_keys
        cell = tl.load(CELLS + j, mask=ok, other=0).to(tl.int64)
        dlt = tl.load(DELTAS + j, mask=ok, other=0) if HAS_DELTA else 0
        k = load_keys(K, cell, kvh, stride_kc, stride_kh, d, D, ok, dlt, INV_FREQ, HAS_DELTA, NEOX)
        v = tl.load(V + cell[:, None] * stride_vc + kvh * stride_vh + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0)
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PREC)
        if HAS_MASK:
            visible = tl.load(MASK + t[:, None].to(tl.int64) * stride_mask + j[None, :],
                              mask=(t[:, None] < T) & ok[None, :], other=0) != 0
        else:
            visible = (j[None, :] <= n_past + t[:, None]) & ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that sees nothing yet: p = alpha = 0
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    tl.store(OUT + t[:, None] * stride_ot + h * stride_oh + d[None, :], acc / l[:, None],
             mask=(t[:, None] < T) & (d[None, :] < D))


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cells: torch.Tensor,
                      n_past: int, mask: torch.Tensor | None = None, deltas: torch.Tensor | None = None,
                      freqs: torch.Tensor | None = None, rope_mode: int = NORM,
                      block_m: int = 64, block_n: int = 64, precision: str | None = None) -> torch.Tensor:
    """Attention of a chunk of T tokens.

    q: (T, n_head, head_dim) float (rotated); k_cache, v_cache: (n_cells, n_head_kv, head_dim) float16
    or float32 holding the chunk's keys already; cells: (n_past + T,) int, the live cells then the
    chunk's cells -> (T, n_head, head_dim) float32. With mask ((T, len(cells)) bool or uint8), query t
    attends entry j where mask[t, j] instead (cells in any order, n_past = len(cells) - T);
    deltas (len(cells),) int rotate each key further (freqs: kernels.inv_freq; rope_mode NORM or NEOX).
    precision: the dots' input_precision, "tf32x3" by default on a GPU (three tf32 products on tensor
    cores: float32 accuracy), "ieee" (float32 fused multiply-adds) under the interpreter."""
    T, H, D = q.shape
    _, H_kv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, "cache shapes must match the queries"
    assert H % H_kv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.dtype in (torch.float16, torch.float32) and v_cache.dtype == k_cache.dtype
    assert cells.shape == (n_past + T,), "cells: the n_past live cells, then the chunk's T cells"
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "heads must be contiguous"
    assert min(block_m, block_n) >= 16, "tl.dot needs tiles of at least 16"
    cells = cells.to(device=q.device, dtype=torch.int32).contiguous()
    if mask is not None:
        assert mask.shape == (T, n_past + T), "mask: one row per query, one column per entry of cells"
        mask = mask.to(device=q.device, dtype=torch.uint8).contiguous()
    has_delta = deltas is not None
    if has_delta:
        assert freqs is not None and freqs.shape == (D // 2,), "deltas need the rotation frequencies"
        assert deltas.shape == cells.shape, "one delta per entry of cells"
        deltas = deltas.to(device=q.device, dtype=torch.int32).contiguous()
        freqs = freqs.to(device=q.device, dtype=torch.float32).contiguous()
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    if T:
        grid = (triton.cdiv(T, block_m), H)
        attention_prefill_kernel[grid](
            out, q, k_cache, v_cache, cells, mask if mask is not None else cells, deltas if has_delta else cells,
            freqs if has_delta else q, T, n_past, H // H_kv,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            out.stride(0), out.stride(1), n_past + T, LOG2E / math.sqrt(D), D,
            HAS_MASK=mask is not None, HAS_DELTA=has_delta, NEOX=rope_mode == NEOX,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
            PREC=precision or ("tf32x3" if q.is_cuda else "ieee"))
    return out


def attention_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cells: torch.Tensor,
                          n_past: int, mask: torch.Tensor | None = None, deltas: torch.Tensor | None = None,
                          freqs: torch.Tensor | None = None, rope_mode: int = NORM) -> torch.Tensor:
    """Masked softmax attention in q's dtype."""
    T, H, D = q.shape
    rep = H // k_cache.shape[1]
    k = k_cache[cells.long()].to(q.dtype)
    if deltas is not None:
        k = rope_ref(k, deltas, freqs, rope_mode)
    k = k.repeat_interleave(rep, dim=1)
    v = v_cache[cells.long()].to(q.dtype).repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    if mask is None:
        visible = torch.arange(len(cells))[None, :] <= n_past + torch.arange(T)[:, None]
    else:
        visible = mask.bool().cpu()
    scores = scores.masked_fill(~visible.to(q.device)[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)
