"""Vectorized numpy quantizers, bit-identical to ggml's reference C quantizers.

Every function takes float32 rows `(n_rows, n_cols)` and returns the GGUF bytes of those rows,
`(n_rows, n_cols // block_size * type_size)` uint8. Rows are independent, so callers stream a
tensor through these in row chunks.

Bit-exactness rests on doing each step in float32 exactly as the C code does: the scale `d` and
its inverse are float32, codes come from the *unrounded* inverse, and only the stored `d` (and
Q4_1's `m`) are rounded to float16.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT


def _blocks(rows: np.ndarray, block: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % block:
        raise ValueError(f"rows of shape {rows.shape} cannot be split into blocks of {block}")
    return rows.reshape(-1, block)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _roundf(x: np.ndarray) -> np.ndarray:
    # C roundf (half away from zero) without the x + 0.5 rounding error near 0.5
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(fl + np.floor((a - fl) * np.float32(2)), x)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    # weight j in the low nibble of byte j, weight j + 16 in its high nibble
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_f32(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return rows.view(np.uint8).reshape(rows.shape[0], -1)


def quantize_f16(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return np.ascontiguousarray(rows.astype(np.float16)).view(np.uint8).reshape(rows.shape[0], -1)


def quantize_bf16(rows: np.ndarray) -> np.ndarray:
    n = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    # NaN stays NaN (made quiet); everything else rounds to nearest even, as ggml_fp32_to_bf16
    nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    n = np.where(nan, (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
    h = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return h.astype(np.uint16).view(np.uint8).reshape(n.shape[0], -1)


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    d = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = _roundf(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1).reshape(len(rows), -1)


def quantize_q4_0(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    # the signed value of largest magnitude (first one on ties) maps to code 0, i.e. -8 * d
    imax = np.abs(x).argmax(axis=1)[:, None]
    d = (np.take_along_axis(x, imax, axis=1) / np.float32(-8)).astype(np.float32)
    q = np.trunc(x * _inverse(d) + np.float32(8.5))
    q = np.minimum(q, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1).reshape(len(rows), -1)


def quantize_q4_1(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    lo = x.min(axis=1, keepdims=True)
    d = ((x.max(axis=1, keepdims=True) - lo) / np.float32(15)).astype(np.float32)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5))
    q = np.minimum(q, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1).reshape(len(rows), -1)


def quantize_q5_0(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    imax = np.abs(x).argmax(axis=1)[:, None]
    d = (np.take_along_axis(x, imax, axis=1) / np.float32(-16)).astype(np.float32)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(16.5)), 31).astype(np.uint8)
    bits = (q >> 4).astype(np.uint32)  # the fifth bit of weight j goes to bit j of qh
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32).astype("<u4")
    return np.concatenate([_f16_bytes(d), qh.reshape(-1, 1).view(np.uint8), _pack_nibbles(q & np.uint8(15))],
                          axis=1).reshape(len(rows), -1)


# --- K-quants: 256-weight super-blocks (GGUF.md §7.2). The gguf package cannot make these; the
# algorithms are llama.cpp's reference quantizers (ggml-quants.c), vectorized over sub-blocks.

QK_K = 256


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # ggml's nearest_int rounds half to even too


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for rows of sub-blocks: a scale and a min (value = scale * L - min) that
    minimize the weighted squared error, searched over nstep + 1 scales. Returns (scale, min, L)."""
    f = np.float32
    xmin = np.minimum(x.min(axis=1), f(0))
    xmax = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    flat = xmax == xmin
    span = np.where(flat, f(1), xmax - xmin)
    iscale = f(nmax) / span
    L = np.clip(_nearest(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    scale = f(1) / iscale
    best = (w * (scale[:, None] * L + xmin[:, None] - x) ** 2).sum(axis=1)
    mn = xmin.copy()
    for step in range(nstep + 1):
        isc = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / span
        la = np.clip(_nearest(isc[:, None] * (x - xmin[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * la).sum(axis=1), (w * la * la).sum(axis=1), (w * la * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, f(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f(1)), this_scale)
        err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, f(0), scale)
    mn = np.where(flat, xmin, mn)
    return scale.astype(f), (-mn).astype(f), L


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block (m, 8) -> the 12-byte layout (m, 12)."""
    out = np.zeros((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _k_scales_mins(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Per super-block: f16 d and dmin, the packed 6-bit scales, and the codes (m, 256)."""
    f = np.float32
    m = len(x)
    sub = x.reshape(m * 8, 32)
    av = np.sqrt((sub * sub).sum(axis=1) / f(32))
    scales, mins, _ = _qkx2(sub, av[:, None] + np.abs(sub), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(m, 8), mins.reshape(m, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, f(63) / np.where(max_scale > 0, max_scale, f(1)), f(0))
    inv_min = np.where(max_min > 0, f(63) / np.where(max_min > 0, max_min, f(1)), f(0))
    ls = np.minimum(_nearest(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / f(63)).astype(np.float16)
    dmin = (max_min / f(63)).astype(np.float16)
    dl = d.astype(f)[:, None] * ls.astype(f)  # the scales as stored, to re-quantize against
    dm = dmin.astype(f)[:, None] * lm.astype(f)
    xs = x.reshape(m, 8, 32)
    q = _nearest((xs + dm[:, :, None]) / np.where(dl == 0, f(1), dl)[:, :, None])
    q = np.where(dl[:, :, None] == 0, 0, np.clip(q, 0, nmax)).astype(np.uint8).reshape(m, 256)
    head = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                           _pack_k_scales(ls, lm)], axis=1)
    return head, q


def _chunk_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes (m, 256) -> qs (m, 128): chunk c holds weights 64c.. in low and 64c + 32.. in high nibbles."""
    q = q.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(len(q), 128).astype(np.uint8)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, QK_K)
    head, q = _k_scales_mins(x, 15, -1.0, 20)
    return np.concatenate([head, _chunk_nibbles(q)], axis=1).reshape(len(rows), -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    x = _blocks(rows, QK_K)
    head, q = _k_scales_mins(x, 31, -0.5, 15)
    hi = (q >> 4).reshape(-1, 4, 2, 32).astype(np.uint8)  # bits 2c and 2c + 1 of qh[l]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([head, qh, _chunk_nibbles(q)], axis=1).reshape(len(rows), -1)


def _qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """make_qx_quants with squared-value weights (rmse_type 1), per row of 16: the best scale."""
    f = np.float32
    imax = np.abs(x).argmax(axis=1)[:, None]
    mx = np.take_along_axis(x, imax, axis=1)[:, 0]
    tiny = np.abs(mx) < f(1e-15)
    mxs = np.where(tiny, f(1), mx)
    w = x * x

    def sums(iscale):
        lv = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * lv).sum(axis=1), (w * lv * lv).sum(axis=1)

    sumlx, suml2 = sums(f(-nmax) / mxs)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        lx, l2 = sums(-(f(nmax) + f(0.1) * f(step)) / mxs)
        better = (l2 > 0) & (lx * lx > best * l2)
        new = lx / np.where(l2 > 0, l2, f(1))
        scale = np.where(better, new, scale)
        best = np.where(better, new * lx, best)
    return np.where(tiny, f(0), scale).astype(f)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    f = np.float32
    x = _blocks(rows, QK_K)
    m = len(x)
    sub = x.reshape(m * 16, 16)
    scales = _qx(sub, 32).reshape(m, 16)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)[:, 0]
    zero = np.abs(max_scale) < f(1e-15)
    iscale = np.where(zero, f(0), f(-128) / np.where(zero, f(1), max_scale))
    d = np.where(zero, f(0), f(1) / np.where(zero, f(1), iscale)).astype(np.float16)
    sc = np.minimum(_nearest(iscale[:, None] * scales), 127).astype(np.int8)
    dl = d.astype(f)[:, None] * sc.astype(f)
    q = _nearest(x.reshape(m, 16, 16) / np.where(dl == 0, f(1), dl)[:, :, None])
    q = np.where(dl[:, :, None] == 0, 32, np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(m, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(m, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    qh = qh.reshape(m, 64).astype(np.uint8)
    return np.concatenate([ql.astype(np.uint8), qh, sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)],
                          axis=1).reshape(len(rows), -1)


QUANTIZERS = {
    QT.F32: quantize_f32,
    QT.F16: quantize_f16,
    QT.BF16: quantize_bf16,
    QT.Q8_0: quantize_q8_0,
    QT.Q4_0: quantize_q4_0,
    QT.Q4_1: quantize_q4_1,
    QT.Q5_0: quantize_q5_0,
    QT.Q4_K: quantize_q4_k,
    QT.Q5_K: quantize_q5_k,
    QT.Q6_K: quantize_q6_k,
}


def row_nbytes(qtype: QT, n_cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_cols // block * size


def can_quantize(qtype: QT, n_cols: int) -> bool:
    return qtype in QUANTIZERS and n_cols % GGML_QUANT_SIZES[qtype][0] == 0


# Work in slices of about this many values: small temporaries stay in cache and are recycled by
# the allocator instead of being mapped and faulted in afresh for every operation.
_SLICE_VALUES = 1 << 16


def quantize(rows: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize float rows `(n_rows, n_cols)` to GGUF bytes `(n_rows, row_nbytes)`."""
    n_rows, n_cols = rows.shape
    if not can_quantize(qtype, n_cols):
        raise ValueError(f"row length {n_cols} is not a multiple of the {qtype.name} block size")
    out = np.empty((n_rows, row_nbytes(qtype, n_cols)), dtype=np.uint8)
    step = max(1, _SLICE_VALUES // max(n_cols, 1))
    for r in range(0, n_rows, step):
        out[r:r + step] = QUANTIZERS[qtype](rows[r:r + step])
    return out
