"""Decode attention over a list of live cells: one query token, the keys and values of the cells the
cache plan says are live (SepLLM keeps initial, separator and recent cells, in any physical order).

Split over cells (flash-decoding): each program takes one kv head with all the query heads that read
it (GQA) and a contiguous run of the live list, and keeps an online softmax per query head (running
max m, sum l, unnormalized output); a second kernel merges the runs of a head. Keys and values are
gathered once per group, and the streaming modes' rotation of each key by its cell's delta is done
once per group too (rotating the queries instead would cost one rotation per query head and cell,
since every cell has its own delta). The splits give long caches enough programs to fill the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .act_q8 import Act, quantize_blocks
from .pdl import pdl_launch, pdl_wait
from .rope import NEOX, NORM, rope_ref

LOG2E = 1.4426950408889634


@triton.jit
def load_keys(K, cell, kvh, stride_kc, stride_kh, d, D, rows_ok, dlt, INV_FREQ,
              HAS_DELTA: tl.constexpr, NEOX: tl.constexpr):
    """Keys of `cell` (BLOCK_N,) for kv head kvh as float32 (BLOCK_N, BLOCK_D), rotated by a further
    `dlt` positions each when HAS_DELTA (the cache plan's deltas: a key is stored rotated with its
    original position, and a rotation by a then by b is one by a + b, GGUF.md §11). The pairs are
    NORM's (2i, 2i+1) or NEOX's (i, i + D/2), as kernels.rope."""
    base = K + cell[:, None] * stride_kc + kvh * stride_kh
    mask = rows_ok[:, None] & (d[None, :] < D)
    k = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        half = D // 2
        if NEOX:
            partner = tl.where(d < half, d + half, d - half)
            fi = tl.where(d < half, d, d - half)
            sign = tl.where(d < half, -1.0, 1.0)
        else:
            partner = d ^ 1
            fi = d // 2
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        kp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        ang = dlt.to(tl.float32)[:, None] * tl.load(INV_FREQ + fi, mask=d < D, other=0.0)[None, :]
        k = k * tl.cos(ang) + sign[None, :] * kp * tl.sin(ang)
    return k


@triton.jit
def attention_split_kernel(
    O_PART, M_PART, L_PART, Q, K, V, CELLS, DELTAS, INV_FREQ, NLIVE,  # pointers; NLIVE: the live count
    cells_per_split, rep,  # rep: query heads per kv head (GQA)
    stride_qh, stride_kc, stride_kh, stride_vc, stride_vh,
    qk_scale,  # 1/sqrt(head_dim) * log2(e): the softmax in base 2
    D,
    HAS_DELTA: tl.constexpr, NEOX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rep rounded up to a power of two
    PDL: tl.constexpr = 0,  # launched early (pdl.py)
):
    pdl_wait(PDL)
    # one program per kv head and run of cells, for all `rep` query heads that read that kv head: each
    # key and value is gathered (and, in the streaming modes, rotated by its cell's delta) once for
    # the whole group instead of once per query head
    kvh = tl.program_id(0)
    s = tl.program_id(1)
    n_split = tl.num_programs(1)
    # the count is read from memory, so that a captured CUDA graph replays with any number of live
    # cells: splits past it are empty (m = -inf, l = 0) and the merge weighs them 0
    n_live = tl.load(NLIVE)
    d = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    heads = kvh * rep + r
    hm = r < rep
    q = tl.load(Q + heads[:, None] * stride_qh + d[None, :], mask=hm[:, None] & (d[None, :] < D),
                other=0.0).to(tl.float32) * qk_scale  # (R, D)
    start = s * cells_per_split
    end = tl.minimum(start + cells_per_split, n_live)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < end
        cell = tl.load(CELLS + j, mask=ok, other=0).to(tl.int64)
        dlt = tl.load(DELTAS + j, mask=ok, other=0) if HAS_DELTA else 0
        k = load_keys(K, cell, kvh, stride_kc, stride_kh, d, D, ok, dlt, INV_FREQ, HAS_DELTA, NEOX)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (R, BLOCK_N)
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(V + cell[:, None] * stride_vc + kvh * stride_vh + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    part = heads * n_split + s
    tl.store(O_PART + part[:, None] * BLOCK_D + d[None, :], acc, mask=hm[:, None])
    tl.store(M_PART + part, m, mask=hm)
    tl.store(L_PART + part, l, mask=hm)


@triton.jit
def attention_merge_kernel(
    OUT, O_PART, M_PART, L_PART,  # pointers
    XQ, XD, XS,  # QUANT: the output's 8-bit blocks (act_q8's q, d, s of the (1, n_head * D) row)
    n_split, D, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, GPU: tl.constexpr,
    PDL: tl.constexpr = 0,  # launched early (pdl.py)
):
    pdl_wait(PDL)
    # runs of BLOCK_S splits at a time (a whole long cache's splits in one tile would not fit in
    # registers): the largest max first, then the weighted sums
    h = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, n_split, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mx = tl.maximum(mx, tl.load(M_PART + h * n_split + s, mask=s < n_split, other=float("-inf")))
    m_all = tl.max(mx, axis=0)
    num = tl.zeros([BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, n_split, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(M_PART + h * n_split + s, mask=s < n_split, other=float("-inf"))
        l = tl.load(L_PART + h * n_split + s, mask=s < n_split, other=0.0)
        w = tl.exp2(m - m_all)  # empty and padded splits: exp2(-inf) = 0
        o = tl.load(O_PART + (h * n_split + s[:, None]) * BLOCK_D + d[None, :], mask=s[:, None] < n_split, other=0.0)
        num += tl.sum(w[:, None] * o, axis=0)
        den += w * l
    out = num / tl.sum(den, axis=0)
    tl.store(OUT + h * stride_oh + d, out, mask=d < D)
    if QUANT:  # a head is whole 8-bit blocks (D = BLOCK_D, a multiple of 32): the output projection's
        # input made here, from the values just stored, instead of by a launch of act_q8 that reads them back
        q, dq, sq = quantize_blocks(tl.reshape(out, (BLOCK_D // 32, 32)), GPU)
        tl.store(XQ + h * BLOCK_D + d, tl.reshape(q, (BLOCK_D,)).to(tl.int8))
        j = h * (BLOCK_D // 32) + tl.arange(0, BLOCK_D // 32)
        tl.store(XD + j, dq)
        tl.store(XS + j, sq)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cells: torch.Tensor,
                     deltas: torch.Tensor | None = None, freqs: torch.Tensor | None = None, rope_mode: int = NORM,
                     n_live: torch.Tensor | None = None, cells_per_split: int | None = None,
                     block_n: int | None = None, quant: bool = False):
    """Attention of one token's queries over the live cells.

    q: (n_head, head_dim) float (already rotated); k_cache, v_cache: (n_cells, n_head_kv, head_dim)
    float16/float32 with contiguous heads; cells: (n_live,) int, n_live >= 1 -> (n_head, head_dim) float32.
    deltas: (n_live,) int or None, the further rotation of each cell's key (freqs: kernels.inv_freq,
    rope_mode: NORM or NEOX). n_live: None, or a (1,) int32 device tensor holding how many leading
    entries of `cells` (and deltas) are live, at least one: the shapes then stay fixed whatever the
    count (CUDA graphs). quant: also the output's 8-bit form (act_q8 of the (1, n_head * head_dim) row,
    made by the merge; head_dim a power of two, a multiple of 32): returns kernels.Act, f the float rows."""
    H, D = q.shape
    n_cells, H_kv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, "cache shapes must match the queries"
    assert H % H_kv == 0, "query heads must be a multiple of kv heads"
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "heads must be contiguous"
    max_live = cells.shape[0]
    assert max_live >= 1, "attention needs at least one live cell"
    assert cells.dtype == torch.int32 or n_live is None, "fixed-shape calls take int32 cells"
    cells = cells.to(device=q.device, dtype=torch.int32).contiguous()
    if n_live is None:
        n_live = torch.full((1,), max_live, dtype=torch.int32, device=q.device)
    has_delta = deltas is not None
    if has_delta:
        assert freqs is not None and freqs.shape == (D // 2,), "deltas need the rotation frequencies"
        assert deltas.shape == cells.shape, "one delta per live cell"
        deltas = deltas.to(device=q.device, dtype=torch.int32).contiguous()
        freqs = freqs.to(device=q.device, dtype=torch.float32).contiguous()
    q = q.contiguous()
    # runs of at least 16 cells, at most 1024 runs (the merge reads 32 at a time), counted over the
    # whole cache: every call on a cache then has the same runs and the same merge (the direct
    # launches of a step and its CUDA-graph replay agree bit for bit); runs past the live cells are
    # empty. Short runs because a run's steps are a chain of dependent gathers (cell index, then its
    # key and value: ~1 µs each on the H200): runs of 64 cells in steps of 8 took 22 µs a layer for
    # a cache of 1024 cells holding ~520 (a quarter of a decode step of the 8B model)
    n_max = max(max_live, n_cells)
    cells_per_split = cells_per_split or max(16, triton.cdiv(n_max, 1024))
    n_split = triton.cdiv(n_max, cells_per_split)
    BLOCK_D = triton.next_power_of_2(D)
    o_part = torch.empty(H, n_split, BLOCK_D, dtype=torch.float32, device=q.device)
    m_part = torch.empty(H, n_split, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    out = torch.empty(H, D, dtype=torch.float32, device=q.device)
    rep = H // H_kv
    BLOCK_R = triton.next_power_of_2(rep)
    # the (query heads x cells x head_dim) products live in registers (4096 values, 32 a thread of 4
    # warps: 96-120 registers and no stack for 4 heads of 128 on sm_90; 8192 spilled): fewer cells per
    # step for larger groups and heads
    block_n = block_n or min(triton.next_power_of_2(cells_per_split), max(4, min(64, 4096 // (BLOCK_R * BLOCK_D))))
    attention_split_kernel[(H_kv, n_split)](
        o_part, m_part, l_part, q, k_cache, v_cache, cells, deltas if has_delta else cells,
        freqs if has_delta else q, n_live, cells_per_split, H // H_kv,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        LOG2E / math.sqrt(D), D, HAS_DELTA=has_delta, NEOX=rope_mode == NEOX, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        BLOCK_R=BLOCK_R, **pdl_launch(q.device))
    if quant:
        assert D == BLOCK_D and D % 32 == 0, "the merge quantizes heads of whole 8-bit blocks"
        xq = torch.empty(1, H * D, dtype=torch.int8, device=q.device)
        xd = torch.empty(1, H * D // 32, dtype=torch.float32, device=q.device)
        xs = torch.empty_like(xd)
    else:
        xq = xd = xs = out
    attention_merge_kernel[(H,)](out, o_part, m_part, l_part, xq, xd, xs, n_split, D, out.stride(0),
                                 BLOCK_S=min(32, triton.next_power_of_2(n_split)), BLOCK_D=BLOCK_D, QUANT=quant,
                                 GPU=q.device.type == "cuda", **pdl_launch(q.device))
    return Act(xq, xd, xs, out.view(1, H * D)) if quant else out


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cells: torch.Tensor, deltas: torch.Tensor | None = None, freqs: torch.Tensor | None = None,
                         rope_mode: int = NORM) -> torch.Tensor:
    """Softmax attention in q's dtype: q (n_head, d) over k/v_cache[cells], keys rotated by deltas."""
    rep = q.shape[0] // k_cache.shape[1]
    k = k_cache[cells.long()].to(q.dtype)
    if deltas is not None:
        k = rope_ref(k, deltas, freqs, rope_mode)
    k = k.repeat_interleave(rep, dim=1)  # (n_live, n_head, d)
    v = v_cache[cells.long()].to(q.dtype).repeat_interleave(rep, dim=1)
    scores = torch.einsum("hd,shd->hs", q, k) / math.sqrt(q.shape[1])
    return torch.einsum("hs,shd->hd", torch.softmax(scores, dim=-1), v)
