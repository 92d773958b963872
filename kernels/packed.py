"""Quantized weights repacked once at load: each row's codes in one aligned run of 32-bit words, the
scales in arrays of their own.

GGUF interleaves scales and codes in blocks of 18 (Q4_0), 34 (Q8_0), 144 (Q4_K) and 210 (Q6_K)
bytes, so a row's codes start 2 bytes off a word in every other block of three of those types and a
kernel reads them in narrow pieces. Repacked, a block's codes are whole 16-byte vectors (when the row
length is a multiple of 128 values, every model's) that a decode kernel reads with one load each and a
prefill kernel reads as whole tiles, and the scales are a separate small array. Only the places of the
bytes change, never a value (Q4_K's 6-bit scales are unpacked to one byte each, their exact values):

    Q4_0  qs (N, K/8) int32: each block's 16 code bytes in file order (byte i: value i low, i + 16 high)
          d (N, K/32) float16
    Q8_0  qs (N, K/4) int32: each block's 32 int8 codes; d (N, K/32) float16
    Q4_K  qs (N, K/8) int32: each block's 128 code bytes in file order (chunk c of 32 bytes: values
          64c + i in the low nibbles, 64c + 32 + i in the high ones)
          sc (N, K/64) int32: per chunk c the bytes scale(2c), min(2c), scale(2c + 1), min(2c + 1) of the
          block's 6-bit scales and mins (GGUF.md §7.2); d (N, K/256) int32: d | dmin << 16 (the file's
          first word of the block)
    Q6_K  qs (N, K/8) int32: ql (128 bytes a block); qh (N, K/16) int32: qh (64 bytes a block);
          sc (N, K/16) int8; d (N, K/256) float16
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .quants import BLOCKS, Q4_0, Q4_K, Q6_K, Q8_0, _half_ref, row_bytes

PACKED_TYPES = (Q4_0, Q8_0, Q4_K, Q6_K)


class Packed(NamedTuple):
    """A repacked quantized weight of logical shape (N, K) (see the module's table)."""
    qtype: int
    K: int
    qs: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor | None = None
    qh: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qs.shape[0], self.K)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in (self.qs, self.d, self.sc, self.qh) if a is not None)


def _words(b: torch.Tensor) -> torch.Tensor:
    """(N, nblk, n) uint8 -> (N, nblk * n / 4) int32, a fresh (aligned) contiguous copy."""
    return b.reshape(b.shape[0], -1).contiguous().view(torch.int32)


def pack(w: torch.Tensor, qtype: int, K: int) -> Packed:
    """Weight bytes (N, row_bytes) uint8 of a (N, K) weight of a type in PACKED_TYPES -> Packed, on w's
    device (torch operations: a copy of the bytes, once)."""
    assert qtype in PACKED_TYPES, "only Q4_0, Q8_0, Q4_K and Q6_K are repacked"
    assert w.dtype == torch.uint8 and w.dim() == 2 and w.shape[1] == row_bytes(qtype, K), "bytes do not match"
    N = w.shape[0]
    block, size = BLOCKS[qtype]
    b = w.reshape(N, K // block, size)
    half = lambda lo: b[..., lo:lo + 2].contiguous().view(torch.float16).reshape(N, -1)  # noqa: E731
    if qtype == Q4_0:
        return Packed(qtype, K, _words(b[..., 2:18]), half(0))
    if qtype == Q8_0:
        return Packed(qtype, K, _words(b[..., 2:34]), half(0))
    if qtype == Q4_K:
        s = b[..., 4:16].to(torch.int32)  # GGUF.md §7.2: j < 4 from bytes j, j + 4; else nibbles and top bits
        sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), -1)
        mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), -1)
        sm = torch.stack((sc, mn), -1).reshape(N, -1, 4, 4).to(torch.uint8)  # (chunk, [sc, mn, sc, mn])
        return Packed(qtype, K, _words(b[..., 16:144]), _words(b[..., 0:4]), sc=_words(sm))
    sc = b[..., 192:208].contiguous().view(torch.int8).reshape(N, -1)
    return Packed(qtype, K, _words(b[..., 0:128]), half(208), sc=sc, qh=_words(b[..., 128:192]))


def dequantize_packed_ref(p: Packed) -> torch.Tensor:
    """The float32 values (N, K) of a repacked weight, from its arrays in torch (the tests hold it to
    the float64 decoding of the file's bytes)."""
    N, K = p.shape
    qs = p.qs.view(torch.uint8).to(torch.int32)
    if p.qtype == Q8_0:
        return (qs.view(N, -1, 32).to(torch.int8).float() * p.d.float()[..., None]).reshape(N, K)
    if p.qtype == Q4_0:
        b = qs.view(N, -1, 16)
        return ((torch.cat((b & 15, b >> 4), -1) - 8).float() * p.d.float()[..., None]).reshape(N, K)
    if p.qtype == Q4_K:
        b = qs.view(N, -1, 4, 32)
        q = torch.stack((b & 15, b >> 4), 3).reshape(N, -1, 8, 32).float()  # chunk c -> runs 2c, 2c + 1
        sm = p.sc.view(torch.uint8).view(N, -1, 8, 2).float()  # (block, run, [scale, min])
        dm = p.d.view(torch.uint8).view(N, -1, 2, 2)
        d, dmin = _half_ref(dm[:, :, 0])[..., None, None], _half_ref(dm[:, :, 1])[..., None, None]
        return (d * (sm[..., 0:1] * q) - dmin * sm[..., 1:2]).reshape(N, K)
    ql = qs.view(N, -1, 2, 2, 32)  # (block, half, [ql 64h + l, 64h + 32 + l])
    qh = p.qh.view(torch.uint8).to(torch.int32).view(N, -1, 2, 1, 32)
    low = torch.cat((ql & 15, ql >> 4), 3)  # quarters 0..3 of a half: r = 0, 1 low nibbles, 2, 3 high
    q = (low | ((qh >> (2 * torch.arange(4, device=qs.device)[:, None])) & 3) << 4) - 32
    sc = p.sc.to(torch.float32).view(N, -1, 2, 4, 2, 1)
    return (p.d.float()[..., None, None, None, None] * sc * q.reshape(N, -1, 2, 4, 2, 16).float()).reshape(N, K)
