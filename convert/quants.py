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


QUANTIZERS = {
    QT.F32: quantize_f32,
    QT.F16: quantize_f16,
    QT.BF16: quantize_bf16,
    QT.Q8_0: quantize_q8_0,
    QT.Q4_0: quantize_q4_0,
    QT.Q4_1: quantize_q4_1,
}


def row_nbytes(qtype: QT, n_cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_cols // block * size


def can_quantize(qtype: QT, n_cols: int) -> bool:
    return n_cols % GGML_QUANT_SIZES[qtype][0] == 0


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
