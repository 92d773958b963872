"""RoPE by a per-row position: rotates queries and keys at their positions, and rotates cached keys by
the position deltas of the cells they moved to (llama.cpp's K-shift, GGUF.md §11): a rotation by a
then by b is a rotation by a + b, so one kernel does both.

Two pairings (GGUF.md §6): NORM rotates adjacent pairs (x[2i], x[2i+1]), what `llama` GGUF files are
permuted for; NEOX rotates (x[i], x[i + d/2]), the HF rotate-half convention of `qwen2`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, pdl_wait

NORM, NEOX = 0, 2  # ggml's rope modes


@triton.jit
def _rotate(src, dst, i0, i1, cos, sin, mask):
    """Pairs (i0, i1) of the rows at src rotated by (cos, sin) and stored at dst (src itself: in place),
    rounded to dst's type."""
    x0 = tl.load(src + i0[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + i0[None, :], (x0 * cos - x1 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + i1[None, :], (x0 * sin + x1 * cos).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    X, POS, INV_FREQ,  # pointers; X is rotated in place
    n_heads, half,  # heads per row, rotated pairs per head (head_dim / 2)
    stride_t, stride_h,
    MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    angle = tl.load(POS + t).to(tl.float32) * tl.load(INV_FREQ + i, mask=i < half, other=0.0)
    cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    if MODE == 0:  # NORM: adjacent pairs
        i0, i1 = 2 * i, 2 * i + 1
    else:  # NEOX: the two halves
        i0, i1 = i, i + half
    base = X + t.to(tl.int64) * stride_t + heads[:, None] * stride_h
    mask = (heads[:, None] < n_heads) & (i[None, :] < half)
    _rotate(base, base, i0, i1, cos, sin, mask)


@triton.jit
def rope_store_kernel(
    KC, VC, K, V, POS, CELLS, INV_FREQ, Q,  # pointers: caches (n_cells, n_head_kv, head_dim), new keys/values;
    n_heads, half, D, n_q_heads,            # Q: the queries, rotated in place by the programs after the keys'
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cc, stride_ch, stride_qt, stride_qh,
    MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_Q: tl.constexpr, PDL: tl.constexpr = 0,  # PDL: launched early (pdl.py)
):
    pdl_wait(PDL)
    t = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_kv_blocks = tl.cdiv(n_heads, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    angle = tl.load(POS + t).to(tl.float32) * tl.load(INV_FREQ + i, mask=i < half, other=0.0)
    cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
    if MODE == 0:
        i0, i1 = 2 * i, 2 * i + 1
    else:
        i0, i1 = i, i + half
    if HAS_Q and pid_h >= n_kv_blocks:  # the queries, as rope_kernel (one launch for both: decode is
        # launch-bound, one launch of ~2 µs less per layer)
        heads = (pid_h - n_kv_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < n_q_heads) & (i[None, :] < half)
        base = Q + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
        _rotate(base, base, i0, i1, cos, sin, mask)
    else:
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        cell = tl.load(CELLS + t).to(tl.int64)
        mask = (heads[:, None] < n_heads) & (i[None, :] < half)
        src = K + t.to(tl.int64) * stride_kt + heads[:, None] * stride_kh
        dst = KC + cell * stride_cc + heads[:, None] * stride_ch
        _rotate(src, dst, i0, i1, cos, sin, mask)
        d = tl.arange(0, BLOCK_DV)
        vmask = (heads[:, None] < n_heads) & (d[None, :] < D)
        v = tl.load(V + t.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=vmask, other=0.0)
        tl.store(VC + cell * stride_cc + heads[:, None] * stride_ch + d[None, :], v.to(VC.dtype.element_ty),
                 mask=vmask)


def inv_freq(head_dim: int, theta: float, freq_factors: torch.Tensor | None = None,
             linear_factor: float = 1.0) -> torch.Tensor:
    """The head_dim / 2 rotation frequencies, float32: theta^(-2i/d) / factor_i / linear_factor
    (Llama 3.1's rope_freqs factors, GGUF.md §5; linear scaling divides the positions)."""
    f = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim) / linear_factor
    if freq_factors is not None:
        f = f / freq_factors.double().cpu()
    return f.float()


def rope_(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, mode: int = NORM,
          block_h: int = 8) -> torch.Tensor:
    """Rotate x in place and return it.

    x: (T, n_heads, head_dim) float with a contiguous last axis (a cache's rows are fine);
    positions: (T,) int, a position or a delta per row; freqs: (head_dim / 2,) float32 from inv_freq."""
    T, H, D = x.shape
    assert mode in (NORM, NEOX), "mode is NORM (0) or NEOX (2)"
    assert D % 2 == 0 and freqs.shape == (D // 2,), "freqs must have head_dim / 2 entries"
    assert x.stride(2) == 1 and positions.shape == (T,), "one position per row, contiguous heads"
    positions = positions.to(device=x.device, dtype=torch.int32).contiguous()
    freqs = freqs.to(device=x.device, dtype=torch.float32).contiguous()
    if T:
        grid = (T, triton.cdiv(H, block_h))
        rope_kernel[grid](x, positions, freqs, H, D // 2, x.stride(0), x.stride(1),
                          MODE=mode, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(D // 2))
    return x


def rope_store(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cells: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, freqs: torch.Tensor, mode: int = NORM,
               block_h: int = 8, q: torch.Tensor | None = None) -> None:
    """A forward pass's new keys and values into their cache cells in one launch: keys rotated at
    their positions, both rounded to the cache's type; with q, the queries rotated in place at the
    same positions in that launch too (as rope_).

    k, v: (T, n_head_kv, head_dim) float with contiguous heads (views of a fused QKV product are fine);
    positions, cells: (T,) int; k_cache, v_cache: (n_cells, n_head_kv, head_dim), one layout;
    q: None or (T, n_head, head_dim) float with contiguous heads."""
    T, H, D = k.shape
    assert v.shape == k.shape and k_cache.shape[1:] == (H, D) and v_cache.shape == k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1, "caches of one layout"
    assert k.stride(2) == 1 and v.stride(2) == 1 and freqs.shape == (D // 2,)
    assert positions.shape == (T,) and cells.shape == (T,)
    assert q is None or (q.shape[0] == T and q.shape[2] == D and q.stride(2) == 1), "queries of the same rows"
    if T:
        positions = positions.to(device=k.device, dtype=torch.int32).contiguous()
        cells = cells.to(device=k.device).contiguous()
        Hq = q.shape[1] if q is not None else 0
        grid = (T, triton.cdiv(H, block_h) + triton.cdiv(Hq, block_h))
        qq = q if q is not None else k
        rope_store_kernel[grid](k_cache, v_cache, k, v, positions, cells, freqs, qq, H, D // 2, D, Hq, k.stride(0),
                                k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
                                qq.stride(0), qq.stride(1), MODE=mode, BLOCK_H=block_h,
                                BLOCK_D=triton.next_power_of_2(D // 2), BLOCK_DV=triton.next_power_of_2(D),
                                HAS_Q=q is not None, **pdl_launch(k.device))


def rope_ref(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, mode: int = NORM) -> torch.Tensor:
    """The rotation out of place, in x's dtype (use float64 inputs for a reference)."""
    angles = positions.to(torch.float64)[:, None] * freqs.to(torch.float64)[None, :]
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
    if mode == NORM:
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)

