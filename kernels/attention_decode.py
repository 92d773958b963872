"""Decode attention over a list of live cells: one query token, the keys and values of the cells the
cache plan says are live (SepLLM keeps initial, separator and recent cells, in any physical order).

Split over cells (flash-decoding): each program takes one head and a contiguous run of the live list
and keeps an online softmax (running max m, sum l, unnormalized output); a second kernel merges the
runs of a head. The splits give long caches enough programs to fill the GPU with one query.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attention_split_kernel(
    O_PART, M_PART, L_PART, Q, K, V, CELLS,  # pointers
    n_live, cells_per_split, rep,  # rep: query heads per kv head (GQA)
    stride_qh, stride_kc, stride_kh, stride_vc, stride_vh,
    qk_scale,  # 1/sqrt(head_dim) * log2(e): the softmax in base 2
    D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    s = tl.program_id(1)
    n_split = tl.num_programs(1)
    kvh = h // rep
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + h * stride_qh + d, mask=d < D, other=0.0).to(tl.float32) * qk_scale
    start = s * cells_per_split
    end = tl.minimum(start + cells_per_split, n_live)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        cell = tl.load(CELLS + j, mask=j < end, other=0).to(tl.int64)
        kv_mask = (j[:, None] < end) & (d[None, :] < D)
        k = tl.load(K + cell[:, None] * stride_kc + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(j < end, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp2(scores - m_new)
        alpha = tl.exp2(m - m_new)
        v = tl.load(V + cell[:, None] * stride_vc + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    part = h * n_split + s
    tl.store(O_PART + part * BLOCK_D + d, acc)
    tl.store(M_PART + part, m)
    tl.store(L_PART + part, l)


@triton.jit
def attention_merge_kernel(
    OUT, O_PART, M_PART, L_PART,  # pointers
    n_split, D, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(M_PART + h * n_split + s, mask=s < n_split, other=float("-inf"))
    l = tl.load(L_PART + h * n_split + s, mask=s < n_split, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # padded splits: exp2(-inf) = 0
    o = tl.load(O_PART + (h * n_split + s[:, None]) * BLOCK_D + d[None, :], mask=s[:, None] < n_split, other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
    tl.store(OUT + h * stride_oh + d, out, mask=d < D)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cells: torch.Tensor,
                     cells_per_split: int = 256, block_n: int = 64) -> torch.Tensor:
    """Attention of one token's queries over the live cells.

    q: (n_head, head_dim) float (already rotated); k_cache, v_cache: (n_cells, n_head_kv, head_dim)
    float16/float32 with contiguous heads; cells: (n_live,) int, n_live >= 1 -> (n_head, head_dim) float32."""
    H, D = q.shape
    n_cells, H_kv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, "cache shapes must match the queries"
    assert H % H_kv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "heads must be contiguous"
    n_live = cells.shape[0]
    assert n_live >= 1, "attention needs at least one live cell"
    cells = cells.to(device=q.device, dtype=torch.int32).contiguous()
    q = q.contiguous()
    n_split = triton.cdiv(n_live, cells_per_split)  # every split has at least one cell
    BLOCK_D = triton.next_power_of_2(D)
    o_part = torch.empty(H, n_split, BLOCK_D, dtype=torch.float32, device=q.device)
    m_part = torch.empty(H, n_split, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    out = torch.empty(H, D, dtype=torch.float32, device=q.device)
    attention_split_kernel[(H, n_split)](
        o_part, m_part, l_part, q, k_cache, v_cache, cells, n_live, cells_per_split, H // H_kv,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        LOG2E / math.sqrt(D), D, BLOCK_N=block_n, BLOCK_D=BLOCK_D)
    attention_merge_kernel[(H,)](out, o_part, m_part, l_part, n_split, D, out.stride(0),
                                 BLOCK_S=triton.next_power_of_2(n_split), BLOCK_D=BLOCK_D)
    return out


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cells: torch.Tensor) -> torch.Tensor:
    """Softmax attention in q's dtype: q (n_head, d) over k/v_cache[cells]."""
    rep = q.shape[0] // k_cache.shape[1]
    k = k_cache[cells.long()].to(q.dtype).repeat_interleave(rep, dim=1)  # (n_live, n_head, d)
    v = v_cache[cells.long()].to(q.dtype).repeat_interleave(rep, dim=1)
    scores = torch.einsum("hd,shd->hs", q, k) / math.sqrt(q.shape[1])
    return torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), v)
