"""The CUDA backend. Tests marked `gpu` need a CUDA GPU and are skipped cleanly without one (CI);
the rest check what a machine without a GPU gets.

Kernels: every matrix-product path against float64 references on fresh random blocks (every code
and bit pattern) of odd sizes. Models: logits against the torch reference and the CPU engine for
every tensor type, prompt and step by step; every KV cache mode against the CPU engine through long
streams with compression events, cells and statistics included; CUDA graphs and the float decode
path against the default."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import fixtures
from sepedge import BackendError, Engine, InvalidArgumentError
from sepedge import _ffi
from sepedge._ffi import ffi, lib
from sepedge.convert import OUTTYPES, convert, quants
from sepedge.errors import check
from sepedge.reference import Transformer
from test_kernels import TYPES, q8_reference, random_blocks


def cuda_devices() -> tuple[int, str]:
    n = ffi.new("int32_t *")
    status = lib.se_cuda_device_count(n)
    return (n[0] if status == 0 else 0), ffi.string(lib.se_last_error()).decode()


N_GPUS, WHY_NOT = cuda_devices()
_skip = pytest.mark.skipif(N_GPUS == 0, reason=f"no CUDA GPU ({WHY_NOT or 'none found'})")


def gpu(f):
    return pytest.mark.gpu(_skip(f))


def cublas_status() -> tuple[bool, str]:
    """Whether the library loads cuBLAS for the prefill route (only asked where there is a GPU)."""
    if N_GPUS == 0:
        return False, "no CUDA GPU"
    ok = lib.se_cuda_cublas_load() == 0
    return ok, "" if ok else ffi.string(lib.se_last_error()).decode()


HAS_CUBLAS, WHY_NO_CUBLAS = cublas_status()
_skip_cublas = pytest.mark.skipif(not HAS_CUBLAS, reason=f"no cuBLAS ({WHY_NO_CUBLAS})")


def gpu_cublas(f):
    """A test of the cuBLAS route: needs a GPU and cuBLAS."""
    return pytest.mark.gpu(_skip(_skip_cublas(f)))

# Kernels, relative to sum_j |w_j x_j| of each output: float32 accumulation; the f16 tensor-core
# prefill path rounds weights and activations to f16 (2^-11 relative each); the int8 tensor-core
# path (MMQ_TYPES) sums each block's integer products exactly and scales them in float32.
MAX_MV_REL_ERROR = 1e-5
MAX_TC_REL_ERROR = 2e-3
# The cuBLAS route rounds weights and activations (divided by their row's power of two) to f16, as
# the f16 tensor-core kernel does, and accumulates in float32: the same bound.
MAX_F16_ROUTE_REL_ERROR = MAX_TC_REL_ERROR
# Its residual add (path 5): the float32 sum of the old value and the product, one rounding more.
MAX_F16_ROUTE_ADD_REL = 1e-6
MAX_MMQ_REL_ERROR = 1e-5
# the int8 kernel's two conversions of its exact integer sums to float (SEPEDGE_CUDA_MMQ_CVT): equal
# values, so they differ at most by how the compiler contracts the float scaling (float32 roundings,
# one a block of 32, bounded as the kernel's own error)
MAX_CVT_REL_DIFF = 1e-5
# Models, max |a - b| / max |b| over a sequence's logits (f16 keys and values throughout).
# Prefill against the float64 reference: f16 tensor-core inputs (measured <= 1e-3 on every type);
# quantized weights with an int8 tensor-core kernel take 8-bit activations, as in decode
# (MAX_DECODE_REL).
MAX_PREFILL_REL = 3e-3
# Decode against the reference: float weights at rounding level (measured <= 3e-4); quantized ones
# take 8-bit activations as llama.cpp and the CPU engine do (measured <= 1.6e-2).
MAX_DECODE_REL = {"f32": 1e-3, "f16": 1e-3, "bf16": 1e-3, "q8_0": 4e-2, "q4_0": 4e-2, "q4_1": 4e-2, "q4_k_m": 4e-2}
# Decode against the CPU engine from an empty cache: the same 8-bit activation scheme, but summation
# order and f16 rounding differ, and a value that lands on the other side of a rounding step moves
# by a whole 8-bit step (measured <= 2e-5 for float weights, <= 1.4e-2 for quantized ones).
MAX_REL_VS_CPU_DECODE = {"f32": 1e-3, "f16": 1e-3, "bf16": 1e-3, "q8_0": 4e-2, "q4_0": 4e-2, "q4_1": 4e-2, "q4_k_m": 4e-2}
# Prefill against the CPU engine, whose products take 8-bit activations for quantized weights.
MAX_REL_VS_CPU_PREFILL = 4e-2
# Decode with the attention on the tensor cores (SEPEDGE_CUDA_ATTN_TC=1), float weights, against the
# float64 reference, the CPU engine and the float attention kernel: the queries and the softmax
# weights P (and in the modes with deltas the turned keys) are rounded to f16 (2^-11 relative each)
# before their products, as in the prefill tensor-core kernel, the rest summed in f32: the prefill bound.
MAX_DECODE_TC_REL = MAX_PREFILL_REL
SEP_RATE = 0.2
N_STEPS = 200
REPORT = os.environ.get("SEPEDGE_CUDA_REPORT")  # a file to append measured errors to (tuning the bounds)


def report(*fields) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write("\t".join(str(x) for x in fields) + "\n")


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---------------------------------------------------------------------------------------------
# without a GPU


@pytest.mark.skipif(N_GPUS > 0, reason="a GPU is present")
def test_no_gpu_is_a_clear_error(tiny_dirs, tmp_path):
    path = convert(tiny_dirs("mha-d64"), tmp_path / "m.gguf", outtype="q8_0", progress=False)
    with pytest.raises(BackendError, match="CUDA"):
        Engine(path, device="cuda")
    w = np.zeros(32 * 2, dtype=np.uint8)
    x = np.zeros(32, dtype=np.float32)
    out = np.zeros(2, dtype=np.float32)
    with pytest.raises(BackendError, match="CUDA"):
        check(lib.se_cuda_mul_mat(int(QT.Q8_0), ffi.from_buffer(w), 1, 32, ffi.from_buffer("float[]", x), 1,
                                  ffi.from_buffer("float[]", out), 0))
    with pytest.raises(BackendError, match="CUDA"):
        check(lib.se_cuda_cublas_load())
    with pytest.raises(BackendError, match="CUDA"):
        check(lib.se_cuda_dequantize_f16(int(QT.Q8_0), ffi.from_buffer(w), 1, 32, ffi.new("uint16_t[]", 32)))


@pytest.mark.parametrize("rel", _ffi.CUBLAS_WHEEL_FILES)
def test_cublas_found_in_wheels(tmp_path, monkeypatch, rel):
    """The Python layer finds libcublas where the nvidia-cublas wheels put it, on the import path,
    without importing the package; nothing where no wheel lies on the path."""
    import importlib
    fake = tmp_path / "nvidia" / rel
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    found = _ffi.cublas_from_wheels()
    assert found is None or Path(found).is_file()
    assert found is None or "libcublas.so" in found
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"")
    importlib.invalidate_caches()
    assert _ffi.cublas_from_wheels() == str(fake)


def q4_K_split_reference(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CUDA backend's Q4_K layout (its default upload) from GGUF superblocks (n, 144):
    codes (n, 128) as in the file; heads (n, 20): d, dmin as in the file, then each sub-block j's six-bit
    scale and min (GGUF.md 7.2: j < 4 the low 6 bits of bytes j and j + 4 of the packed 12; j >= 4 the
    nibbles of byte j + 4 with the top 2 bits of bytes j - 4 and j above them) as bytes 4 + 2 j, 5 + 2 j."""
    s = blocks[:, 4:16].astype(np.int32)
    lo, hi = s[:, 0:4], s[:, 4:8]
    sc = np.concatenate([lo & 63, (s[:, 8:12] & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (s[:, 8:12] >> 4) | ((hi >> 6) << 4)], axis=1)
    heads = np.empty((len(blocks), 20), dtype=np.uint8)
    heads[:, 0:4] = blocks[:, 0:4]
    heads[:, 4::2], heads[:, 5::2] = sc, mn
    return blocks[:, 16:].copy(), heads


def test_q4_K_repack_layout(rng):
    """The host repack of the CUDA Q4_K layout (every build has it) equals the numpy reference byte for
    byte on fresh random superblocks (every bit pattern of the packed scales), and the values read from
    the layout as the kernels read them (code nibble (j % 2) of bytes 32 (j // 2) .., d * scale * code -
    dmin * min) are the file's values (the CPU dequantization)."""
    n = int(rng.integers(1, 300))
    data = random_blocks(rng, QT.Q4_K, n)
    q, s = np.empty(n * 128, dtype=np.uint8), np.empty(n * 20, dtype=np.uint8)
    check(lib.se_cuda_repack_q4_K(ffi.from_buffer(data), n, ffi.from_buffer(q), ffi.from_buffer(s)))
    ref_q, ref_s = q4_K_split_reference(data.reshape(n, 144))
    np.testing.assert_array_equal(q.reshape(n, 128), ref_q)
    np.testing.assert_array_equal(s.reshape(n, 20), ref_s)
    heads = s.reshape(n, 20)
    d = heads[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    dmin = heads[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
    codes = q.reshape(n, 4, 1, 32)
    nib = ((codes >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]) & 0xF).reshape(n, 8, 32).astype(np.float64)
    vals = d[:, None, None] * heads[:, 4::2, None] * nib - dmin[:, None, None] * heads[:, 5::2, None]
    want = gguf.quants.dequantize(data, QT.Q4_K).astype(np.float64).reshape(n, 8, 32)
    np.testing.assert_allclose(vals, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    with pytest.raises(InvalidArgumentError):
        check(lib.se_cuda_repack_q4_K(ffi.NULL, 1, ffi.from_buffer(q), ffi.from_buffer(s)))


# ---------------------------------------------------------------------------------------------
# kernels


def mul_mat(qtype, data, rows, cols, x, path) -> np.ndarray:
    n = len(x)
    out = np.empty((n, rows), dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    check(lib.se_cuda_mul_mat(int(qtype), ffi.from_buffer(np.ascontiguousarray(data)), rows, cols,
                              ffi.from_buffer("float[]", x), n, ffi.from_buffer("float[]", out), path))
    return out


def weights(rng, qtype, rows, cols) -> np.ndarray:
    if gguf.GGML_QUANT_SIZES[qtype][0] == 1:
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype).reshape(-1)
    return random_blocks(rng, qtype, rows * cols // gguf.GGML_QUANT_SIZES[qtype][0])


def shapes(qtype):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    cols = [block, 3 * block, 37 * block] if block > 1 else [7, 33, 96, 1001]
    return [(rows, c) for rows, c in zip([1, 37, 130, 5], cols + cols[:1])]


Q8_TYPES = {QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K}  # types with a dp4a decode kernel
MMQ_TYPES = Q8_TYPES  # types whose prefill products run on int8 tensor cores over 8-bit activations
MMQ_WIDTHS = ("auto", "32", "64", "128")  # tokens a block of the int8 kernel (SEPEDGE_CUDA_MMQ_BN)


def q8_activations(x: np.ndarray) -> np.ndarray:
    """The activations as the 8-bit kernels see them (float64), row by row."""
    rows = []
    for row in x:
        a = q8_reference(row)
        rows.append((a["d"][:, None].astype(np.float64) * a["qs"]).reshape(-1))
    return np.stack(rows)


def prefill_shapes(qtype):
    """The kernel shapes plus one of several tiles in every dimension with tails (rows 128 a tile,
    tokens 32, 64 or 128, K 256 values, three pipeline stages; Q4_0's K ends in a short tile)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    cols = {1: 1001, 32: 9 * 256 + 5 * 32}.get(block, 9 * 256)
    big = (300, cols, 150)
    return [(rows, cols, n) for rows, cols in shapes(qtype) for n in (2, 70)] + [big]


@gpu
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_kernels(rng, qtype):
    """One token: dp4a against the float64 dot of dequantized weights and 8-bit activations; the
    float path against the float64 dot with the activations as given."""
    for rows, cols in shapes(qtype):
        data = weights(rng, qtype, rows, cols)
        w = gguf.quants.dequantize(data, qtype).reshape(rows, cols).astype(np.float64)
        x = (rng.standard_normal((3, cols)) * rng.choice([1e-3, 1, 30])).astype(np.float32)
        for path in (0, 1):
            got = mul_mat(qtype, data, rows, cols, x[:1] if path == 0 else x, path)
            xs = x[:1] if path == 0 else x
            if path == 0 and qtype in Q8_TYPES:
                a = q8_reference(xs[0])
                xs = (a["d"][:, None].astype(np.float64) * a["qs"]).reshape(1, -1)
            ref = xs.astype(np.float64) @ w.T
            scale = np.abs(xs.astype(np.float64)) @ np.abs(w).T
            err = float((np.abs(got - ref) / np.maximum(scale, 1e-30)).max())
            report("decode", qtype.name, path, rows, cols, err)
            assert err <= MAX_MV_REL_ERROR, (rows, cols, path)


# the row-team kernels (Q4_0, Q4_K, Q6_K) in their variants, and the warp-per-row one
MV_KERNELS = {
    "teams": {"SEPEDGE_CUDA_MV": "teams"},
    "teams128": {"SEPEDGE_CUDA_MV": "teams", "SEPEDGE_CUDA_MVT_TEAM": "128"},  # 4-warp teams from 65 units
    "loads4": {"SEPEDGE_CUDA_MV": "teams", "SEPEDGE_CUDA_MVT_LOADS": "4"},     # Q4_0: 4 loads a thread
    "rows": {"SEPEDGE_CUDA_MV": "rows"},
}
# Fused RMSNorm: the kernel normalizes in float32 (rsqrtf) where the reference does it in float64,
# so an activation landing within rounding of an 8-bit step can take the other code: allow this
# many whole steps per output (each |w_j| * d_j), on top of MAX_MV_REL_ERROR.
MAX_Q8_FLIPS = 2
NORM_EPS = 1e-5


def team_shapes(qtype):
    """Rows that are not multiples of a group and of 32 (swiglu chunks), and K for every team
    width: one warp (<= 32 and <= 64 units of 32) and 4 warps with 1, 2 and 4 units a thread."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    units = [8, 40, 120, 200, 448] if block == 256 else [3, 33, 65, 129, 300]
    return [(rows, 32 * u) for rows, u in zip([7, 70, 33, 130, 64], units)]


@gpu
@pytest.mark.parametrize("kernel", MV_KERNELS)
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_decode_team_kernels(rng, qtype, kernel, monkeypatch):
    """The decode products of 8-bit activations for every team shape, plain and with the fused
    RMSNorm (and SwiGLU), against float64 references; both kernels."""
    for name, value in MV_KERNELS[kernel].items():
        monkeypatch.setenv(name, value)
    for rows, cols in team_shapes(qtype):
        data = weights(rng, qtype, 2 * rows, cols)
        w = gguf.quants.dequantize(data, qtype).reshape(2 * rows, cols).astype(np.float64)
        x = (rng.standard_normal((2, cols)) * rng.choice([1e-3, 1, 30])).astype(np.float32)
        # plain: the first rows rows against q8(x[0])
        got = mul_mat(qtype, data[: data.size // 2], rows, cols, x[:1], 0)[0]
        a = q8_reference(x[0])
        xq = (a["d"][:, None].astype(np.float64) * a["qs"]).reshape(-1)
        ref, scale = w[:rows] @ xq, np.abs(w[:rows]) @ np.abs(xq)
        err = float((np.abs(got - ref) / np.maximum(scale, 1e-30)).max())
        report("decode-team", kernel, qtype.name, rows, cols, err)
        assert err <= MAX_MV_REL_ERROR, (rows, cols)
        # fused norm: x[1] as the norm's weights; all 2 rows rows, then as gate (first half) and up
        xn = x[0].astype(np.float64) / np.sqrt(np.mean(x[0].astype(np.float64) ** 2) + NORM_EPS) * x[1]
        a = q8_reference(xn.astype(np.float32))
        xq = (a["d"][:, None].astype(np.float64) * a["qs"]).reshape(-1)
        step = np.repeat(a["d"].astype(np.float64), 32)  # one 8-bit step of each activation
        ref, scale = w @ xq, np.abs(w) @ np.abs(xq)
        bound = MAX_MV_REL_ERROR * scale + MAX_Q8_FLIPS * (np.abs(w) * step).max(axis=1)
        got = mul_mat(qtype, data, 2 * rows, cols, x, 2)[0]
        assert np.all(np.isfinite(got)) and np.all(np.abs(got - ref) <= bound), (rows, cols, float(np.abs(got - ref).max()))
        report("decode-norm", kernel, qtype.name, rows, cols, float((np.abs(got - ref) / bound).max()))
        g, u, eg, eu = ref[:rows], ref[rows:], bound[:rows], bound[rows:]
        silu = g / (1 + np.exp(-np.clip(g, -700, 700)))
        h = silu * u
        # |d silu / dg| <= 1.1; float32 silu and product: 1e-6 relative
        h_bound = 1.1 * eg * (np.abs(u) + eu) + (np.abs(silu) + 1.1 * eg) * eu + 1e-6 * np.abs(h)
        got = mul_mat(qtype, data, 2 * rows, cols, x, 3)[0][:rows]
        assert np.all(np.isfinite(got)) and np.all(np.abs(got - h) <= h_bound), (rows, cols, float(np.abs(got - h).max()))
        report("decode-swiglu", kernel, qtype.name, rows, cols, float((np.abs(got - h) / h_bound).max()))


@gpu
@pytest.mark.parametrize("mmq", [True, False], ids=["int8", "f16"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prefill_kernel(rng, qtype, mmq, monkeypatch):
    """Many tokens through the tensor cores against the float64 product of dequantized weights:
    int8 (the types that have it) with the 8-bit activations, f16 (every type, SEPEDGE_CUDA_MMQ=0)
    with the activations as given."""
    if mmq and qtype not in MMQ_TYPES:
        pytest.skip("no int8 tensor-core kernel for this type: the f16 one serves it")
    if not mmq:
        monkeypatch.setenv("SEPEDGE_CUDA_MMQ", "0")
    # int8: the width the launch picks, and every token-tile width forced (the test shapes are too
    # small for the launch to pick 64 or 128 itself)
    for rows, cols, n in prefill_shapes(qtype):
        data = weights(rng, qtype, rows, cols)
        w = gguf.quants.dequantize(data, qtype).reshape(rows, cols).astype(np.float64)
        x = (rng.standard_normal((n, cols)) * rng.choice([1e-3, 1, 30])).astype(np.float32)
        xs = q8_activations(x) if mmq else x.astype(np.float64)
        ref = xs @ w.T
        scale = np.abs(xs) @ np.abs(w).T
        results = {}
        for width in MMQ_WIDTHS if mmq else ("auto",):
            if width == "auto":
                monkeypatch.delenv("SEPEDGE_CUDA_MMQ_BN", raising=False)
            else:
                monkeypatch.setenv("SEPEDGE_CUDA_MMQ_BN", width)
            got = results[width] = mul_mat(qtype, data, rows, cols, x, 0)
            err = float((np.abs(got - ref) / np.maximum(scale, 1e-30)).max())
            report("prefill", qtype.name, f"int8-{width}" if mmq else "f16", n, rows, cols, err)
            assert np.isfinite(got).all(), (width, rows, cols, n)
            assert err <= (MAX_MMQ_REL_ERROR if mmq else MAX_TC_REL_ERROR), (width, rows, cols, n)
        if mmq:  # the integer sums converted through the MMA's start value: the same exact integers
            monkeypatch.delenv("SEPEDGE_CUDA_MMQ_BN", raising=False)
            monkeypatch.setenv("SEPEDGE_CUDA_MMQ_CVT", "magic")
            other = mul_mat(qtype, data, rows, cols, x, 0)
            monkeypatch.delenv("SEPEDGE_CUDA_MMQ_CVT")
            diff = float((np.abs(other.astype(np.float64) - results["auto"]) / np.maximum(scale, 1e-30)).max())
            assert diff <= MAX_CVT_REL_DIFF, (rows, cols, n)


# the cuBLAS route: weights to f16 (every type), then cublasGemmEx


@gpu_cublas
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_f16_matches_cpu(rng, qtype):
    """The route's weights: exactly the CPU's dequantization (float32) rounded to f16, every type,
    odd row counts; float32 weights too (round to nearest even on both sides)."""
    for rows, cols, _ in prefill_shapes(qtype):
        data = weights(rng, qtype, rows, cols)
        ref = gguf.quants.dequantize(data, qtype).reshape(rows, cols).astype(np.float32).astype(np.float16)
        got = np.empty(rows * cols, dtype=np.uint16)
        check(lib.se_cuda_dequantize_f16(int(qtype), ffi.from_buffer(np.ascontiguousarray(data)), rows, cols,
                                         ffi.from_buffer("uint16_t[]", got)))
        got = got.view(np.float16).reshape(rows, cols)
        bad = ~((got == ref) | (np.isnan(got) & np.isnan(ref)))
        assert not bad.any(), (rows, cols, np.argwhere(bad)[:4].tolist())


def route_inputs(rng, n, cols) -> np.ndarray:
    """Activation rows of mixed magnitudes: beyond f16's range (1e6: the hidden states of random-weight
    8B files), ordinary, and small."""
    x = rng.standard_normal((n, cols))
    x *= rng.choice([1e6, 7e4, 1, 1e-3], size=(n, 1))
    return x.astype(np.float32)


@gpu_cublas
@pytest.mark.parametrize("scratch_mb", ["64", "1"])  # 1 MB: the big shape's weight in 128-row slices
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cublas_route_product(rng, qtype, scratch_mb, monkeypatch):
    """The route's product against the float64 product of the dequantized weights and the
    activations as given (rows beyond 65504 included), plain and adding to what the output holds."""
    monkeypatch.setenv("SEPEDGE_CUDA_CUBLAS_SCRATCH_MB", scratch_mb)
    for rows, cols, n in prefill_shapes(qtype):
        data = weights(rng, qtype, rows, cols)
        w = gguf.quants.dequantize(data, qtype).reshape(rows, cols).astype(np.float64)
        x = route_inputs(rng, n, cols)
        ref = x.astype(np.float64) @ w.T
        scale = np.abs(x.astype(np.float64)) @ np.abs(w).T
        got = mul_mat(qtype, data, rows, cols, x, 4)
        err = float((np.abs(got - ref) / np.maximum(scale, 1e-30)).max())
        report("cublas", qtype.name, scratch_mb, n, rows, cols, err)
        assert np.isfinite(got).all() and err <= MAX_F16_ROUTE_REL_ERROR, (rows, cols, n, err)
        # path 5: the residual add, the residual rows as large as the activations' largest
        base = (rng.standard_normal((n, rows)) * np.abs(x).max(axis=1, keepdims=True)).astype(np.float32)
        out = base.copy()
        check(lib.se_cuda_mul_mat(int(qtype), ffi.from_buffer(np.ascontiguousarray(data)), rows, cols,
                                  ffi.from_buffer("float[]", x), n, ffi.from_buffer("float[]", out), 5))
        want = base.astype(np.float64) + ref
        bound = MAX_F16_ROUTE_REL_ERROR * scale + MAX_F16_ROUTE_ADD_REL * (np.abs(want) + np.abs(base))
        assert np.isfinite(out).all() and np.all(np.abs(out - want) <= bound), (rows, cols, n)


# Q4_K is uploaded in the split layout (codes apart, scales and mins unpacked to bytes:
# se_cuda_repack_q4_K) unless SEPEDGE_CUDA_Q4K_REPACK=0; the tests above take the default, these the
# file's superblocks, which every reader of a Q4_K weight on the device still takes


@gpu
@pytest.mark.parametrize("kernel", MV_KERNELS)
def test_q4_K_file_layout_decode(rng, kernel, monkeypatch):
    """The decode products of the file's layout (the row-team and warp-per-row kernels, plain, fused
    RMSNorm, SwiGLU; the float path) against the same float64 references as the split layout's."""
    monkeypatch.setenv("SEPEDGE_CUDA_Q4K_REPACK", "0")
    test_decode_team_kernels(rng, QT.Q4_K, kernel, monkeypatch)
    test_decode_kernels(rng, QT.Q4_K)


@gpu
@pytest.mark.parametrize("mmq", [True, False], ids=["int8", "f16"])
def test_q4_K_file_layout_prefill(rng, mmq, monkeypatch):
    """The prefill kernels read the file's layout as they read the split one: within the same bounds,
    and the int8 kernel (the same scale table, the same codes) and the float decode path (dequant32:
    the same float operations) give the same bits from both layouts."""
    monkeypatch.setenv("SEPEDGE_CUDA_Q4K_REPACK", "0")
    test_prefill_kernel(rng, QT.Q4_K, mmq, monkeypatch)
    for rows, cols, n in prefill_shapes(QT.Q4_K):
        data = weights(rng, QT.Q4_K, rows, cols)
        x = (rng.standard_normal((n, cols)) * rng.choice([1e-3, 1, 30])).astype(np.float32)
        got = {}
        for split in ("0", "1"):
            monkeypatch.setenv("SEPEDGE_CUDA_Q4K_REPACK", split)
            got[split] = mul_mat(QT.Q4_K, data, rows, cols, x, 0), mul_mat(QT.Q4_K, data, rows, cols, x[:2], 1)
        np.testing.assert_array_equal(got["0"][0], got["1"][0])
        np.testing.assert_array_equal(got["0"][1], got["1"][1])


@gpu_cublas
def test_q4_K_file_layout_cublas_route(rng, monkeypatch):
    """The cuBLAS route's dequantization reads the file's layout too: the CPU's values rounded to f16,
    and its product within its bound."""
    monkeypatch.setenv("SEPEDGE_CUDA_Q4K_REPACK", "0")
    test_dequantize_f16_matches_cpu(rng, QT.Q4_K)
    test_cublas_route_product(rng, QT.Q4_K, "1", monkeypatch)


# ---------------------------------------------------------------------------------------------
# models


def cuda_engine(path, **kw):
    return Engine(path, device="cuda", kv_type="f16", **kw)


def cpu_engine(path, **kw):
    return Engine(path, kv_type="f16", n_threads=4, **kw)


def step_by_step(llm, tokens) -> np.ndarray:
    llm.reset()
    return np.stack([llm.eval([t]) for t in tokens])


@gpu
@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("spec", fixtures.SPECS, ids=lambda s: s.name)
def test_logits_match_reference_and_cpu(gguf_path, rng, spec, outtype):
    path = gguf_path(spec.name, outtype)
    tokens = rng.integers(0, spec.n_tokens or spec.n_vocab, 40 + N_STEPS).tolist()
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    with cuda_engine(path, n_ctx=512, n_batch=16) as gpu_llm, cpu_engine(path, n_ctx=512, n_batch=16) as cpu_llm:
        prompt = gpu_llm.eval_logits(tokens[:40])  # chunks of 16: prefill, then decode after it
        steps = np.stack([gpu_llm.eval([t]) for t in tokens[40:]])
        gpu_all, cpu_all = step_by_step(gpu_llm, tokens), step_by_step(cpu_llm, tokens)
        cpu_llm.reset()
        cpu_prompt = cpu_llm.eval_logits(tokens[:40])
        errs = (rel(prompt, ref[:40]), rel(steps, ref[40:]), rel(gpu_all, cpu_all), rel(prompt, cpu_prompt))
        report("model", spec.name, outtype, *errs)
        assert errs[0] <= max(MAX_PREFILL_REL, MAX_DECODE_REL[outtype])  # 8-bit activations where quantized
        assert errs[1] <= MAX_DECODE_REL[outtype]
        assert errs[2] <= MAX_REL_VS_CPU_DECODE[outtype]
        assert errs[3] <= MAX_REL_VS_CPU_PREFILL
        gpu_llm.reset()
        gpu_llm.eval_logits(tokens[:40])
        assert gpu_llm.kv_stats() == cpu_llm.kv_stats()


@gpu_cublas
@pytest.mark.parametrize("outtype", list(OUTTYPES))
@pytest.mark.parametrize("spec", fixtures.SPECS, ids=lambda s: s.name)
def test_cublas_route_prefill_matches_cpu(gguf_path, rng, spec, outtype, monkeypatch):
    """Prefill with the cuBLAS route forced on (chunks of 2 tokens and more): logits against the
    float64 reference within the f16 kernels' bound (the 8-bit activations of the int8 kernels would
    not meet it), against the CPU engine as the int8 path, and the cache as the CPU engine's."""
    monkeypatch.setenv("SEPEDGE_CUDA_CUBLAS_MIN", "2")
    path = gguf_path(spec.name, outtype)
    tokens = rng.integers(0, spec.n_tokens or spec.n_vocab, 40).tolist()
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    with cuda_engine(path, n_ctx=512, n_batch=16) as gpu_llm, cpu_engine(path, n_ctx=512, n_batch=16) as cpu_llm:
        prompt, cpu_prompt = gpu_llm.eval_logits(tokens), cpu_llm.eval_logits(tokens)
        errs = (rel(prompt, ref), rel(prompt, cpu_prompt))
        report("model-cublas", spec.name, outtype, *errs)
        assert errs[0] <= MAX_PREFILL_REL
        assert errs[1] <= MAX_REL_VS_CPU_PREFILL
        assert gpu_llm.kv_stats() == cpu_llm.kv_stats()


FALLBACK_SCRIPT = """
import sys, numpy as np
from sepedge import Engine
from sepedge._ffi import lib
assert lib.se_cuda_cublas_load() != 0, "cuBLAS loaded from a path that does not exist"
with Engine(sys.argv[1], device="cuda", kv_type="f16", n_ctx=512, n_batch=64) as llm:
    np.save(sys.argv[2], llm.eval_logits([int(t) for t in sys.argv[3].split(",")]))
"""


@gpu
def test_cublas_route_fallback(gguf_path, rng, monkeypatch, tmp_path):
    """Without cuBLAS (SEPEDGE_CUBLAS naming a file that does not exist, in a fresh process: the
    library loads cuBLAS once a process) and with the route switched off, prefill runs on the int8
    kernels: the same logits bit for bit."""
    path = gguf_path("gqa-d128-llama31", "q4_k_m")
    tokens = rng.integers(0, 777, 200).tolist()
    monkeypatch.setenv("SEPEDGE_CUDA_CUBLAS", "0")
    with cuda_engine(path, n_ctx=512, n_batch=64) as llm:
        off = llm.eval_logits(tokens)
    monkeypatch.delenv("SEPEDGE_CUDA_CUBLAS")
    env = dict(os.environ, SEPEDGE_CUBLAS=str(tmp_path / "missing" / "libcublas.so.13"), SEPEDGE_CUDA_CUBLAS_MIN="2")
    out = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(path), str(out), ",".join(map(str, tokens))],
                   env=env, check=True)
    np.testing.assert_array_equal(np.load(out), off)
    if HAS_CUBLAS:  # the route itself on the same prompt: as close to the int8 path as the CPU engine is
        monkeypatch.setenv("SEPEDGE_CUDA_CUBLAS_MIN", "2")
        with cuda_engine(path, n_ctx=512, n_batch=64) as llm:
            on = llm.eval_logits(tokens)
        assert rel(on, off) <= MAX_REL_VS_CPU_PREFILL


@pytest.fixture(scope="module")
def separators(gguf_path):
    with Engine(gguf_path("gqa3-sharded-padded", "f16"), n_ctx=8) as e:
        return e.info["separators"]


@pytest.fixture
def stream(rng, separators):
    seps = np.array([s for s in separators if s < 520])
    others = np.setdiff1d(np.arange(520), seps)

    def make(n: int) -> list[int]:
        return np.where(rng.random(n) < SEP_RATE, rng.choice(seps, n), rng.choice(others, n)).tolist()

    return make


MODES = [
    ("full", {}),
    ("sepllm", dict(n_init=4, n_sep=8, n_local=24, n_cache=1024)),          # capped separators, masked in chunks
    ("sepllm", dict(n_init=3, n_sep=0, n_local=32, n_cache=1024)),
    ("sepllm-stream", dict(n_init=4, n_sep=8, n_local=24, n_cache=64)),     # a compression every few tokens
    ("sepllm-stream", dict(n_init=4, n_sep=64, n_local=256, n_cache=800)),  # the default sizes: many splits
    ("streamingllm", dict(n_init=4, n_local=28, n_cache=32)),
    ("sepllm-slide", dict(n_init=4, n_sep=8, n_local=20, n_cache=32)),      # separator deltas change every token
    ("sepllm-runs", dict(n_init=3, n_sep=6, n_local=23, n_cache=32)),
]


@gpu
@pytest.mark.parametrize("mode,sizes", MODES, ids=[f"{m}-{s.get('n_cache', 'ctx')}-{s.get('n_sep', '')}" for m, s in MODES])
@pytest.mark.parametrize("spec", ["gqa3-sharded-padded", "mha-d64", "gqa-d128-llama31"])  # head_dim 32, 64, 128
def test_kv_modes_match_cpu(gguf_path, stream, spec, mode, sizes):
    """Long streams, step by step and as chunked prompts: the same logits, cells and statistics as
    the CPU engine."""
    path = gguf_path(spec, "f16")
    n = 1000 if mode != "full" else 600
    tokens = stream(n)
    kw = dict(kv_mode=mode, **sizes) if mode != "full" else dict(n_ctx=1024)
    with cuda_engine(path, n_batch=64, **kw) as gpu_llm, cpu_engine(path, n_batch=64, **kw) as cpu_llm:
        steps, cpu_steps = step_by_step(gpu_llm, tokens), step_by_step(cpu_llm, tokens)
        assert [list(a) for a in gpu_llm._ctx.cells()] == [list(a) for a in cpu_llm._ctx.cells()]
        assert gpu_llm.kv_stats() == cpu_llm.kv_stats()
        gpu_llm.reset()
        cpu_llm.reset()
        prompt, cpu_prompt = gpu_llm.eval_logits(tokens), cpu_llm.eval_logits(tokens)
        errs = (rel(steps, cpu_steps), rel(prompt, cpu_prompt))
        report("mode", spec, mode, sizes, *errs)
        assert errs[0] <= MAX_REL_VS_CPU_DECODE["f16"]
        assert errs[1] <= MAX_REL_VS_CPU_PREFILL
        assert gpu_llm.kv_stats() == cpu_llm.kv_stats()


DELTA_MODES = [(m, s) for m, s in MODES if m in ("sepllm-stream", "streamingllm", "sepllm-slide", "sepllm-runs")]


@gpu
@pytest.mark.parametrize("mode,sizes", DELTA_MODES, ids=[f"{m}-{s['n_cache']}" for m, s in DELTA_MODES])
@pytest.mark.parametrize("spec", ["qwen2-tied", "qwen2-untied-odd"])  # SE_ROPE_NEOX, head_dim 64 and 32
@pytest.mark.parametrize("ring", ["0", "1"])  # the decode attention's keys through registers / the cp.async ring
def test_kv_modes_neox_match_cpu(gguf_path, stream, spec, mode, sizes, ring, monkeypatch):
    """The modes whose cells carry deltas with the other rotary pairing (dimensions i, i + d / 2):
    each key turned by its delta as the float decode kernel reads it (its partner dimensions from the
    cache row, or from another lane's piece of the ring; test_kv_modes_tc covers the tensor-core one);
    step by step, the CPU engine's logits and cells."""
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", "0")
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_RING", ring)
    path = gguf_path(spec, "f16")
    tokens = stream(700)
    with cuda_engine(path, n_batch=64, kv_mode=mode, **sizes) as gpu_llm, cpu_engine(path, n_batch=64, kv_mode=mode, **sizes) as cpu_llm:
        steps, cpu_steps = step_by_step(gpu_llm, tokens), step_by_step(cpu_llm, tokens)
        assert [list(a) for a in gpu_llm._ctx.cells()] == [list(a) for a in cpu_llm._ctx.cells()]
        err = rel(steps, cpu_steps)
        report("mode-neox", spec, mode, sizes, err)
        assert err <= MAX_REL_VS_CPU_DECODE["f16"]


@gpu
@pytest.mark.parametrize("spec,qtype,mode", [("gqa-d128-llama31", "q4_k_m", "full"), ("gqa-d128-llama31", "q4_0", "sepllm-stream"),
                                             ("qwen2-tied", "q4_0", "full")])
def test_split_cells_and_typed_matvec(gguf_path, rng, monkeypatch, spec, qtype, mode):
    """The one-token attention's split size (SEPEDGE_CUDA_ATTN_SPLIT_CELLS: 16 cells, many splits and
    merges; 1024, one split) moves only the summation order of the softmax: both within the decode
    tolerance of the CPU engine, in full and in a delta mode; the decode products made for one
    weight type (SEPEDGE_CUDA_MV_SPEC=1) give the same bits as the kernel made for any (the default).
    Every product on the warp-per-row kernel (SEPEDGE_CUDA_MV=rows), the one MV_SPEC makes per type: in
    these tiny models the row-team kernels would take the launches and both runs would be one kernel."""
    path = gguf_path(spec, qtype)
    monkeypatch.setenv("SEPEDGE_CUDA_MV", "rows")
    tokens = rng.integers(0, 700, 300).tolist()  # inside both vocabularies
    kw = dict(n_ctx=512, kv_mode=mode) if mode == "full" else dict(kv_mode=mode, n_init=4, n_sep=32, n_local=64, n_cache=128)
    with cpu_engine(path, n_batch=16, **kw) as cpu_llm:
        cpu_steps = step_by_step(cpu_llm, tokens)
    got = {}
    for cells, typed in (("16", "1"), ("1024", "1"), ("16", "0")):
        monkeypatch.setenv("SEPEDGE_CUDA_ATTN_SPLIT_CELLS", cells)
        monkeypatch.setenv("SEPEDGE_CUDA_MV_SPEC", typed)
        with cuda_engine(path, n_batch=16, **kw) as llm:
            got[cells, typed] = step_by_step(llm, tokens)
        err = rel(got[cells, typed], cpu_steps)
        report("split-cells", spec, qtype, mode, cells, typed, err)
        assert err <= MAX_REL_VS_CPU_DECODE[qtype], (cells, typed)
    np.testing.assert_array_equal(got["16", "1"], got["16", "0"])


# The one-token products a q4_k_m model takes with the switch on: "auto", the defaults (in the tiny
# model the row-team kernels serve every all-Q4_K launch and the warp-per-row kernel, made for any kind,
# the mixed Q / K / V of layer 1, whose V is Q6_K); "rows-typed", the warp-per-row kernel everywhere
# (SEPEDGE_CUDA_MV=rows), made for the split layout where a launch's outputs are all Q4_K
# (SEPEDGE_CUDA_MV_SPEC=1: with the defaults the row-team kernels take those launches first).
Q4K_SPLIT_MV = {"auto": {}, "rows-typed": {"SEPEDGE_CUDA_MV": "rows", "SEPEDGE_CUDA_MV_SPEC": "1"}}


@gpu
@pytest.mark.parametrize("mv", Q4K_SPLIT_MV)
def test_q4_K_split_model(gguf_path, rng, monkeypatch, mv):
    """A q4_k_m file uploaded in the split layout (the default) and as the file's (=0): prompt and step-by-step logits against
    the CPU engine within the decode bounds, the prompt (int8 prefill kernels, the same table from
    either layout) and the float decode path (SEPEDGE_CUDA_MATVEC=float: dequant32, the same float
    operations) bit for bit as with the file's layout (test_graphs_and_decode_paths bounds the latter);
    the 8-bit decode steps not bit for bit (the split layout's dot products sum in another order: the
    switch was taken); rows-typed: the kernel made for the split layout gives the bits of the one made
    for any kind."""
    path = gguf_path("gqa-d128-llama31", "q4_k_m")
    tokens = rng.integers(0, 700, 200).tolist()
    for name, value in Q4K_SPLIT_MV[mv].items():
        monkeypatch.setenv(name, value)
    with cpu_engine(path, n_ctx=512, n_batch=16) as cpu_llm:
        cpu_prompt = cpu_llm.eval_logits(tokens[:40])
        cpu_steps = step_by_step(cpu_llm, tokens)
    got = {}
    for split in ("0", "1"):
        monkeypatch.setenv("SEPEDGE_CUDA_Q4K_REPACK", split)
        monkeypatch.delenv("SEPEDGE_CUDA_MATVEC", raising=False)
        with cuda_engine(path, n_ctx=512, n_batch=16) as llm:
            prompt = llm.eval_logits(tokens[:40])
            steps = step_by_step(llm, tokens)
        monkeypatch.setenv("SEPEDGE_CUDA_MATVEC", "float")
        with cuda_engine(path, n_ctx=512, n_batch=16) as llm:
            floats = step_by_step(llm, tokens)
        got[split] = prompt, steps, floats
        errs = rel(prompt, cpu_prompt), rel(steps, cpu_steps), rel(floats, cpu_steps)
        report("q4k-split-model", split, mv, *errs)
        assert errs[0] <= MAX_REL_VS_CPU_PREFILL
        assert errs[1] <= MAX_REL_VS_CPU_DECODE["q4_k_m"]
    np.testing.assert_array_equal(got["0"][0], got["1"][0])
    np.testing.assert_array_equal(got["0"][2], got["1"][2])
    assert not np.array_equal(got["0"][1], got["1"][1]), "SEPEDGE_CUDA_Q4K_REPACK=1 gave the bits of the file's layout: not taken"
    if mv == "rows-typed":
        monkeypatch.delenv("SEPEDGE_CUDA_MATVEC")
        monkeypatch.setenv("SEPEDGE_CUDA_MV_SPEC", "0")
        with cuda_engine(path, n_ctx=512, n_batch=16) as llm:
            np.testing.assert_array_equal(step_by_step(llm, tokens), got["1"][1])


@gpu
def test_graphs_and_decode_paths(gguf_path, rng, monkeypatch):
    """CUDA graphs replay exactly the kernels of a direct launch, with or without chained launches
    and prefetch; the float decode path (weights
    dequantized in registers) agrees with the dp4a one up to the 8-bit activations."""
    path = gguf_path("gqa-d128-llama31", "q4_k_m")
    tokens = rng.integers(0, 777, 300).tolist()
    # the float decode attention, whose variants (ring, layout, next-L2) this compares; at head_dim 128
    # the tensor-core one is the default (test_decode_attention_tc checks its graphs and direct launches)
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", "0")
    with cuda_engine(path, n_ctx=512) as llm:
        graphs = step_by_step(llm, tokens)
    # chained launches (programmatic dependent launch) and L2 prefetch change when work runs, never what
    monkeypatch.setenv("SEPEDGE_CUDA_PDL", "0")
    monkeypatch.setenv("SEPEDGE_CUDA_PREFETCH", "0")
    with cuda_engine(path, n_ctx=512) as llm:
        unchained = step_by_step(llm, tokens)
    np.testing.assert_array_equal(graphs, unchained)
    monkeypatch.delenv("SEPEDGE_CUDA_PDL")
    monkeypatch.setenv("SEPEDGE_CUDA_PREFETCH", "2")
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_SPLITS", "1")  # one split: a block walks every cell, stage by stage
    with cuda_engine(path, n_ctx=512) as llm:
        few_splits = step_by_step(llm, tokens)
    monkeypatch.delenv("SEPEDGE_CUDA_ATTN_SPLITS")
    monkeypatch.delenv("SEPEDGE_CUDA_PREFETCH")
    # the decode attention's loop with keys and values through registers, and the shared-memory ring
    # at every depth: the same arithmetic in the same order; the next products' weights asked of L2
    # (none, a little, all of them) change nothing either, nor the cache's layout (cell- or head-major)
    for env in ({"SEPEDGE_CUDA_ATTN_RING": "1", "SEPEDGE_CUDA_NEXT_L2": "24"},
                {"SEPEDGE_CUDA_ATTN_RING": "1", "SEPEDGE_CUDA_ATTN_STAGES": "2", "SEPEDGE_CUDA_NEXT_L2": "1"},
                {"SEPEDGE_CUDA_ATTN_RING": "1", "SEPEDGE_CUDA_ATTN_STAGES": "4", "SEPEDGE_CUDA_NEXT_L2": "1000"},
                {"SEPEDGE_CUDA_KV_LAYOUT": "cells"}, {"SEPEDGE_CUDA_KV_LAYOUT": "cells", "SEPEDGE_CUDA_ATTN_RING": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with cuda_engine(path, n_ctx=512) as llm:
            np.testing.assert_array_equal(step_by_step(llm, tokens), graphs, err_msg=str(env))
        for k in env:
            monkeypatch.delenv(k)
    monkeypatch.setenv("SEPEDGE_CUDA_GRAPHS", "0")
    with cuda_engine(path, n_ctx=512) as llm:
        direct = step_by_step(llm, tokens)
    np.testing.assert_array_equal(graphs, direct)
    monkeypatch.setenv("SEPEDGE_CUDA_MATVEC", "float")
    with cuda_engine(path, n_ctx=512) as llm:
        floats = step_by_step(llm, tokens)
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    report("paths", rel(graphs, ref), rel(floats, ref), rel(few_splits, ref))
    assert rel(floats, ref) <= MAX_DECODE_REL["f16"]
    assert rel(graphs, ref) <= MAX_DECODE_REL["q4_k_m"]
    assert rel(few_splits, ref) <= MAX_DECODE_REL["q4_k_m"]


# Shapes for the tensor-core decode attention: query heads a KV head (the rows of its products'
# columns) 1, 4 and 8, head_dim 128 and 64; with mha-d64 (1, 64) and gqa-d128-llama31 (2, 128).
TC_SPECS = [
    fixtures.TinySpec("tc-g1-d128", n_embd=256, n_layer=2, n_head=2, n_head_kv=2, n_ff=512, n_vocab=640, head_dim=128,
                      pre="llama-bpe"),
    fixtures.TinySpec("tc-g4-d128", n_embd=256, n_layer=2, n_head=8, n_head_kv=2, n_ff=512, n_vocab=640, head_dim=128,
                      pre="llama-bpe", rope_theta=500000.0),
    fixtures.TinySpec("tc-g8-d64", n_embd=256, n_layer=2, n_head=8, n_head_kv=1, n_ff=512, n_vocab=640, head_dim=64,
                      pre="llama-bpe"),
]


@pytest.fixture(scope="module")
def tc_gguf(gguf_path, tmp_path_factory):
    """Factory: a TC_SPECS spec (or one of fixtures.SPECS) as an f16 GGUF, once per module."""
    out, done = tmp_path_factory.mktemp("tc-gguf"), {}
    specs = {s.name: s for s in TC_SPECS}

    def get(name: str) -> Path:
        if name in fixtures.SPEC_BY_NAME:
            return gguf_path(name, "f16")
        if name not in done:
            d = fixtures.make_tiny_checkpoint(specs[name], out / name)
            done[name] = convert(d, out / f"{name}-f16.gguf", outtype="f16", progress=False)
        return done[name]

    return get


def tc_steps(path, tokens, monkeypatch, tc: str, **env) -> np.ndarray:
    """Step-by-step logits of a fresh CUDA engine (full cache) with SEPEDGE_CUDA_ATTN_TC=tc and env."""
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", tc)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with cuda_engine(path, n_ctx=2048) as llm:
        out = step_by_step(llm, tokens)
    for k in env:
        monkeypatch.delenv(k)
    monkeypatch.delenv("SEPEDGE_CUDA_ATTN_TC")
    return out


@gpu
@pytest.mark.parametrize("spec", ["tc-g1-d128", "tc-g4-d128", "tc-g8-d64", "mha-d64", "gqa-d128-llama31"])
def test_decode_attention_tc(tc_gguf, rng, spec, monkeypatch):
    """The tensor-core decode attention, step by step over 1,100 tokens (every cache length from 1:
    odd ones, one split and many, stages of 256 cells): the float64 reference's logits, the CPU
    engine's and the float kernel's within MAX_DECODE_TC_REL, as one split a column (a block walks
    every cell) and the 4-blocks variant (=2); direct launches without chaining: the same bits."""
    path = tc_gguf(spec)
    tokens = rng.integers(0, 640, 1100).tolist()
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    with cpu_engine(path, n_ctx=2048) as cpu_llm:
        cpu = step_by_step(cpu_llm, tokens)
    fl = tc_steps(path, tokens, monkeypatch, "0")
    tc = tc_steps(path, tokens, monkeypatch, "1")
    errs = (rel(tc, ref), rel(tc, cpu), rel(tc, fl), rel(fl, ref))
    report("attn-tc", spec, *errs)
    assert errs[0] <= MAX_DECODE_TC_REL and errs[1] <= MAX_DECODE_TC_REL and errs[2] <= MAX_DECODE_TC_REL, errs
    assert not np.array_equal(tc, fl)  # the switch took the other kernel (f16 queries round differently)
    one_split = tc_steps(path, tokens, monkeypatch, "1", SEPEDGE_CUDA_ATTN_SPLITS="1")
    assert rel(one_split, ref) <= MAX_DECODE_TC_REL
    four_blocks = tc_steps(path, tokens, monkeypatch, "2")  # the same kernel at 128 registers (another split count)
    assert rel(four_blocks, ref) <= MAX_DECODE_TC_REL
    direct = tc_steps(path, tokens, monkeypatch, "1", SEPEDGE_CUDA_GRAPHS="0", SEPEDGE_CUDA_PDL="0", SEPEDGE_CUDA_PREFETCH="0")
    np.testing.assert_array_equal(direct, tc)  # graphs, chaining and prefetch change when work runs, never what


TC_MODE_SPECS = ["gqa-d128-llama31", "qwen2-tied"]  # head_dim 128 (SE_ROPE_NORM's pairs), 64 (SE_ROPE_NEOX's)


@gpu
@pytest.mark.parametrize("mode,sizes", MODES, ids=[f"{m}-{s.get('n_cache', 'ctx')}-{s.get('n_sep', '')}" for m, s in MODES])
@pytest.mark.parametrize("spec", TC_MODE_SPECS)
def test_kv_modes_tc(gguf_path, stream, spec, mode, sizes, monkeypatch):
    """Every cache mode with SEPEDGE_CUDA_ATTN_TC=1 and 2 takes the tensor-core kernel (the modes with
    deltas its variant that turns each key by its cell's delta in registers, both rotary pairings):
    the CPU engine's logits within MAX_DECODE_TC_REL, and not the float kernel's bits. With the
    switch off (the float kernel), the CPU engine's logits and cells in every mode."""
    path = gguf_path(spec, "f16")
    tokens = stream(1000 if mode != "full" else 600)
    kw = dict(kv_mode=mode, **sizes) if mode != "full" else dict(n_ctx=1024)
    got = {}
    for tc in ("0", "1", "2"):
        monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", tc)
        with cuda_engine(path, n_batch=64, **kw) as llm:
            got[tc] = step_by_step(llm, tokens)
            cells = [list(a) for a in llm._ctx.cells()]
    with cpu_engine(path, n_batch=64, **kw) as cpu_llm:
        cpu = step_by_step(cpu_llm, tokens)
        assert cells == [list(a) for a in cpu_llm._ctx.cells()]
    errs = (rel(got["1"], cpu), rel(got["2"], cpu))
    report("mode-tc", spec, mode, sizes, *errs, rel(got["0"], cpu))
    assert rel(got["0"], cpu) <= MAX_REL_VS_CPU_DECODE["f16"]
    assert errs[0] <= MAX_DECODE_TC_REL and errs[1] <= MAX_DECODE_TC_REL, errs
    assert not np.array_equal(got["1"], got["0"])  # the switch took the other kernel (f16 queries round differently)


@gpu
@pytest.mark.parametrize("spec", TC_MODE_SPECS)
def test_stream_long_tc(gguf_path, stream, spec, monkeypatch):
    """sepllm-stream at the paper's sizes over 3,000 tokens (a compression every ~500: a full separator
    region whose cells' deltas move at each, an initial region, a recent window without deltas) with
    the tensor-core kernel (its rotating variant at both register caps): the CPU engine's logits
    within MAX_DECODE_TC_REL and its cells."""
    path = gguf_path(spec, "f16")
    tokens = stream(3000)
    kw = dict(kv_mode="sepllm-stream", n_init=4, n_sep=64, n_local=256, n_cache=800)
    with cpu_engine(path, n_batch=64, **kw) as cpu_llm:
        cpu = step_by_step(cpu_llm, tokens)
        cpu_cells = [list(a) for a in cpu_llm._ctx.cells()]
        stats = cpu_llm.kv_stats()
    assert stats["live_sep"] == 64 and stats["tokens_evicted"] > 2000, stats  # the regions the test is about
    for tc in ("1", "2"):
        monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", tc)
        with cuda_engine(path, n_batch=64, **kw) as llm:
            got = step_by_step(llm, tokens)
            assert [list(a) for a in llm._ctx.cells()] == cpu_cells
        err = rel(got, cpu)
        report("stream-long-tc", spec, tc, err)
        assert err <= MAX_DECODE_TC_REL, (tc, err)


# The one-token attention's merge of its splits (SEPEDGE_CUDA_ATTN_MERGE): the float kernel (head_dim 32
# with a group of 3, 64 with 2) and the tensor-core one (128 with groups of 4 and 2, turning keys by their
# deltas; 64 with a group of 8), sepllm-stream (cells with deltas: the initial and separator regions) and
# a full cache.
STREAM_800 = dict(n_init=4, n_sep=64, n_local=256, n_cache=800)
STREAM_64 = dict(n_init=4, n_sep=8, n_local=24, n_cache=64)
MERGE_CASES = [
    ("gqa3-sharded-padded", "0", "sepllm-stream", STREAM_800),
    ("qwen2-tied", "0", "sepllm-stream", STREAM_64),
    ("tc-g4-d128", "2", "sepllm-stream", STREAM_800),
    ("gqa-d128-llama31", "2", "sepllm-stream", STREAM_64),
    ("tc-g8-d64", "2", "sepllm-stream", STREAM_64),
    ("tc-g4-d128", "1", "full", {}),
]


@gpu
@pytest.mark.parametrize("spec,tc,mode,sizes", MERGE_CASES,
                         ids=[f"{s}-tc{t}-{m}-{z.get('n_cache', 'ctx')}" for s, t, m, z in MERGE_CASES])
def test_attn_merge_same_bits(tc_gguf, stream, spec, tc, mode, sizes, monkeypatch):
    """SEPEDGE_CUDA_ATTN_MERGE=1 (every split's partial of a thread's outputs in flight at once) and =2
    (also the splits' handshake by one thread's acquire-release atomic) add the same products in the
    same order as 0 (1 is the default): the same bits, step by step, with 16 cells a split (one stage of a
    block; the kernels made for the merge where a column has fewer than 32 splits: n_cache 64, else 0's)
    and with the default split size; and
    the CPU engine's logits within the kernel's tolerance."""
    path = tc_gguf(spec)
    tokens = stream(900 if mode != "full" else 600)
    kw = dict(kv_mode=mode, **sizes) if mode != "full" else dict(n_ctx=1024)
    monkeypatch.setenv("SEPEDGE_CUDA_ATTN_TC", tc)
    with cpu_engine(path, n_batch=64, **kw) as cpu_llm:
        cpu = step_by_step(cpu_llm, tokens)
    bound = MAX_DECODE_TC_REL if tc != "0" else MAX_REL_VS_CPU_DECODE["f16"]
    for cells in ("16", "128"):
        monkeypatch.setenv("SEPEDGE_CUDA_ATTN_SPLIT_CELLS", cells)
        got = {}
        for merge in ("0", "1", "2"):
            monkeypatch.setenv("SEPEDGE_CUDA_ATTN_MERGE", merge)
            with cuda_engine(path, n_batch=64, **kw) as llm:
                got[merge] = step_by_step(llm, tokens)
        err = rel(got["2"], cpu)
        report("attn-merge", spec, tc, mode, cells, err)
        assert err <= bound, (cells, err)
        np.testing.assert_array_equal(got["1"], got["0"])
        np.testing.assert_array_equal(got["2"], got["0"])


@gpu
def test_bad_requests_are_clear_errors(gguf_path):
    path = gguf_path("mha-d64", "q8_0")
    with pytest.raises(InvalidArgumentError, match="f16"):
        Engine(path, device="cuda", kv_type="f32")
    with cuda_engine(path, n_ctx=16) as llm:
        with pytest.raises(Exception, match="exceed the context window"):
            llm.eval(list(range(20)))
        assert llm.kv_stats()["tokens_seen"] == 0  # nothing was processed
        llm.eval(list(range(10)))


@gpu
def test_generation_matches_cpu(gguf_path):
    """Greedy generation through the Engine: the CPU's text, as far as its choices are clear (a
    near-tie between the two best tokens may go either way within the logits' tolerance)."""
    path = gguf_path("qwen2-tied", "q8_0")
    with cuda_engine(path, n_ctx=256) as g, cpu_engine(path, n_ctx=256) as c:
        text = g.generate("Hello", max_tokens=24, temperature=0)
        tokens = c.tokenize("Hello")
        logits = c.eval_logits(tokens)[-1]
        for _ in range(24):
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < 1e-2 * np.abs(logits).max():
                break
            tokens.append(int(np.argmax(logits)))
            if tokens[-1] in c.tokenizer.eog_ids:
                break
            logits = c.eval([tokens[-1]])
        clear = c.detokenize(tokens[len(c.tokenize("Hello")):]).decode("utf-8", "replace")
        assert text.startswith(clear[:-4] if len(clear) > 4 else "")
