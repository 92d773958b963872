"""C kernels (dequantization, dot products, half precision) against numpy / gguf references."""

import os

import gguf

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from sepedge._ffi import ffi, lib
from sepedge.convert import quants
from sepedge.errors import InvalidArgumentError, UnsupportedError, check
from test_quants import rng  # noqa: F401  (fixture: fresh seed per test, printed on failure)

TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
QUANTIZED = [t for t in TYPES if gguf.GGML_QUANT_SIZES[t][0] > 1]
# byte offsets of the f16 scale fields in each block (random bytes there could be NaN or huge)
SCALE_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
                QT.Q6_K: [208]}


def random_blocks(rng, qtype: QT, n_blocks: int) -> np.ndarray:
    """Random block bytes with sane f16 scales: every code, scale byte and bit pattern occurs."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        b[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(-1)
# max |dot - float64 reference| relative to sum |w_j x_j|: float32 accumulation over a row
MAX_DOT_REL_ERROR = 1e-5


def c_dequantize(data: np.ndarray, qtype: QT, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.float32)
    check(lib.se_dequantize(int(qtype), ffi.from_buffer(np.ascontiguousarray(data)), ffi.from_buffer("float[]", out), n))
    return out


def c_dot(row: np.ndarray, qtype: QT, x: np.ndarray) -> float:
    out = ffi.new("float *")
    x = np.ascontiguousarray(x, dtype=np.float32)
    check(lib.se_dot(int(qtype), ffi.from_buffer(np.ascontiguousarray(row)), ffi.from_buffer("float[]", x), len(x), out))
    return out[0]


def lengths(qtype: QT) -> list[int]:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return [block, 3 * block, 37 * block] + ([1, 7, 33, 1001] if block == 1 else [])


@pytest.mark.parametrize("qtype", [t for t in TYPES if t in quants.QUANTIZERS], ids=lambda t: t.name)
def test_dequantize_matches_gguf(rng, qtype):
    for n in lengths(qtype):
        x = (rng.standard_normal(n) * rng.choice([1e-3, 1, 50])).astype(np.float32)
        data = quants.quantize(x.reshape(1, -1), qtype).reshape(-1)
        expected = gguf.quants.dequantize(data, qtype).reshape(-1)
        np.testing.assert_array_equal(c_dequantize(data, qtype, n), expected)


@pytest.mark.parametrize("qtype", QUANTIZED + [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes(rng, qtype):
    """Any bit pattern (NaN/inf scales included) decodes exactly as gguf decodes it."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, 64 * size, dtype=np.uint8)
    np.testing.assert_array_equal(c_dequantize(data, qtype, 64 * block),
                                  gguf.quants.dequantize(data.reshape(1, -1), qtype).reshape(-1))
    if qtype in SCALE_FIELDS:  # and with sane scales, so that no NaN hides a wrong code
        data = random_blocks(rng, qtype, 64)
        np.testing.assert_array_equal(c_dequantize(data, qtype, 64 * block),
                                      gguf.quants.dequantize(data.reshape(1, -1), qtype).reshape(-1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dot_matches_float64(rng, qtype):
    for n in lengths(qtype):
        if qtype in quants.QUANTIZERS:
            data = quants.quantize(rng.standard_normal((1, n)).astype(np.float32), qtype).reshape(-1)
        else:
            data = random_blocks(rng, qtype, n // gguf.GGML_QUANT_SIZES[qtype][0])
        wq = gguf.quants.dequantize(data, qtype).reshape(-1).astype(np.float64)
        x = rng.standard_normal(n).astype(np.float32)
        expected = float(wq @ x.astype(np.float64))
        scale = float(np.abs(wq * x).sum())
        assert abs(c_dot(data, qtype, x) - expected) <= MAX_DOT_REL_ERROR * scale, n


def test_fp16_rounding_matches_numpy(rng):
    edge = np.array([0.0, -0.0, 1.0, 65504.0, 65519.9, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6.1e-5, 6.0e-8, 2.98e-8,
                     2.9802322e-08, 5.96e-8, 1e-10, -3.0517578e-05, 0.33333334, 1.0009766, 1.0004883, 1.0014648],
                    dtype=np.float32)
    scaled = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([edge, scaled, bits]).astype(np.float32)
    out = np.empty(len(values), dtype=np.uint16)
    check(lib.se_fp32_to_fp16_row(ffi.from_buffer("float[]", values), ffi.from_buffer("uint16_t[]", out), len(values)))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(out[~nan], expected[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()


def test_fp16_decoding_is_exhaustive():
    h = np.arange(1 << 16, dtype=np.uint16)
    got = c_dequantize(h, QT.F16, len(h))
    expected = h.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(got[nan]).all()


def test_kernel_errors():
    with pytest.raises(InvalidArgumentError, match="blocks of 32"):
        c_dequantize(np.zeros(40, np.uint8), QT.Q8_0, 33)
    with pytest.raises(UnsupportedError, match="no kernels"):
        c_dequantize(np.zeros(84, np.uint8), QT.Q2_K, 256)


def test_type_table_matches_ggml():
    name, block, size, ok = ffi.new("char **"), ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
    for qtype in QT:
        check(lib.se_type_info(int(qtype), name, block, size, ok))
        # gguf-py lists Q8_1 as 40 bytes; ggml's block is 36 (GGUF.md §7); Q8_1 never appears in files
        expected = (32, 36) if qtype == QT.Q8_1 else gguf.GGML_QUANT_SIZES[qtype]
        assert (block[0], size[0]) == expected, qtype.name
        assert ffi.string(name[0]).decode() == qtype.name
        assert bool(ok[0]) == (qtype in TYPES), qtype.name
    with pytest.raises(InvalidArgumentError, match="unknown tensor type 31"):
        check(lib.se_type_info(31, name, block, size, ok))


# ---------------------------------------------------------------------------------------------
# the fast path: activations quantized to 8 bits in blocks of 32, integer products per block

Q8_BLOCK = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
FAST_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1]
# float32 accumulation of per-block partial sums vs the float64 sum of exact integer products
MAX_VEC_DOT_REL_ERROR = 2e-6


def q8_reference(x: np.ndarray) -> np.ndarray:
    """What the activations become: d = max|x| / 127 (float32), q = round-to-even(x / d), s = d * sum q."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d)).astype(np.float32)
    q = np.rint(blocks * inv[:, None]).astype(np.int8)
    out = np.zeros(len(blocks), dtype=Q8_BLOCK)
    out["d"], out["qs"] = d, q
    out["s"] = (d * q.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float32)
    return out


def weight_codes(data: np.ndarray, qtype: QT, n: int):
    """Per block: scale d, min m (Q4_1) and integer codes, from the GGUF bytes."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = data.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float64).reshape(-1)
    if qtype == QT.Q8_0:
        return d, None, b[:, 2:].copy().view(np.int8).astype(np.int64)
    qs = b[:, 4:] if qtype == QT.Q4_1 else b[:, 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int64)
    if qtype == QT.Q4_0:
        return d, None, codes - 8
    return d, b[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1), codes


ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture(params=ISAS)
def simd(request):
    """Every kernel level the CPU has (its own and each lower one), skipped where it lacks one."""
    if lib.se_set_isa(request.param.encode()) != 0:
        pytest.skip(f"this CPU has no {request.param} kernels")
    try:
        yield ffi.string(lib.se_simd()).decode()
    finally:
        lib.se_set_simd(1)


def test_isa_selection():
    """se_set_isa picks a level and se_simd names it; an unknown name is an error."""
    try:
        check(lib.se_set_isa(b"portable"))
        assert ffi.string(lib.se_simd()) == b"none"
        for name in ISAS[:2]:
            if lib.se_set_isa(name.encode()) == 0:
                assert ffi.string(lib.se_simd()).decode() == name
        with pytest.raises(InvalidArgumentError):
            check(lib.se_set_isa(b"sse9"))
    finally:
        lib.se_set_simd(1)


def test_isa_env_override():
    """SEPEDGE_ISA=avx2|portable caps the level chosen at load (a fresh process)."""
    import subprocess
    import sys
    code = "from sepedge._ffi import lib, ffi; print(ffi.string(lib.se_simd()).decode())"
    for name, want in (("portable", {"none"}), ("avx2", {"avx2", "none"})):
        env = dict(os.environ, SEPEDGE_ISA=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() in want, (name, out)


def test_activation_quantization_is_exact(rng, simd):
    for n in (32, 96, 576, 4096):
        x = (rng.standard_normal(n) * rng.choice([1e-4, 1, 300])).astype(np.float32)
        x[:32] = 0  # an all-zero block
        out = np.zeros(n // 32, dtype=Q8_BLOCK)
        check(lib.se_quantize_act_q8(ffi.from_buffer("float[]", x), ffi.from_buffer(out), n))
        ref = q8_reference(x)
        np.testing.assert_array_equal(out["qs"], ref["qs"])
        np.testing.assert_array_equal(out["d"], ref["d"])
        np.testing.assert_array_equal(out["s"], ref["s"])


@pytest.mark.parametrize("qtype", [t for t in QUANTIZED if t not in FAST_TYPES], ids=lambda t: t.name)
def test_vec_dot_equals_the_dot_of_dequantized_codes(rng, simd, qtype):
    """For every quantized type: the dot of the dequantized weights with the dequantized 8-bit
    activations, in float64."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for n_blocks in (1, 3, 17):
        n = n_blocks * block
        data = random_blocks(rng, qtype, n_blocks)
        w = gguf.quants.dequantize(data, qtype).reshape(-1).astype(np.float64)
        x = rng.standard_normal(n).astype(np.float32)
        a = q8_reference(x)
        xq = (a["d"][:, None].astype(np.float64) * a["qs"]).reshape(-1)
        out = ffi.new("float *")
        check(lib.se_vec_dot(int(qtype), ffi.from_buffer(data), ffi.from_buffer("float[]", x), n, out))
        assert abs(out[0] - w @ xq) <= MAX_VEC_DOT_REL_ERROR * np.abs(w * xq).sum(), (n, simd)


@pytest.mark.parametrize("qtype", FAST_TYPES, ids=lambda t: t.name)
def test_vec_dot_is_the_integer_dot(rng, simd, qtype):
    for n in (32, 64, 96, 33 * 32, 4096):
        w = rng.standard_normal(n).astype(np.float32)
        data = quants.quantize(w.reshape(1, -1), qtype).reshape(-1)
        x = rng.standard_normal(n).astype(np.float32)
        a = q8_reference(x)
        d, m, codes = weight_codes(data, qtype, n)
        per_block = (codes * a["qs"].astype(np.int64)).sum(axis=1)  # exact integers
        expected = (d * a["d"] * per_block).sum() + (0 if m is None else (m * a["s"]).sum())
        out = ffi.new("float *")
        check(lib.se_vec_dot(int(qtype), ffi.from_buffer(data), ffi.from_buffer("float[]", x), n, out))
        scale = (np.abs(d * a["d"] * np.abs(codes * a["qs"]).sum(axis=1)).sum()
                 + (0 if m is None else np.abs(m * a["s"]).sum()))
        assert abs(out[0] - expected) <= MAX_VEC_DOT_REL_ERROR * scale, (n, simd)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_vec_dot_float_types(rng, simd, qtype):
    for n in (1, 7, 8, 15, 16, 33, 1001):
        w = rng.standard_normal(n).astype(np.float32)
        data = quants.quantize(w.reshape(1, -1), qtype).reshape(-1)
        wq = gguf.quants.dequantize(data, qtype).reshape(-1).astype(np.float64)
        x = rng.standard_normal(n).astype(np.float32)
        out = ffi.new("float *")
        check(lib.se_vec_dot(int(qtype), ffi.from_buffer(data), ffi.from_buffer("float[]", x), n, out))
        assert abs(out[0] - wq @ x) <= MAX_DOT_REL_ERROR * np.abs(wq * x).sum(), (n, simd)


# ---------------------------------------------------------------------------------------------
# matrix products: the forward pass's row-range driver, on interleaved groups of 8 rows (the
# layout the CPU backend repacks Q4_0, Q5_0, Q8_0, Q4_K and Q6_K weights into at load) or row by row

PACKED_TYPES = [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q6_K]
# per output: float32 accumulation over blocks vs the float64 sum, relative to sum |w_j x_j|
MAX_MATMUL_REL_ERROR = 1e-5


def c_matmul(data: np.ndarray, qtype: QT, rows: int, cols: int, x: np.ndarray, packed: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.full((len(x), rows), np.nan, dtype=np.float32)
    check(lib.se_matmul(int(qtype), ffi.from_buffer(np.ascontiguousarray(data)), rows, cols,
                        ffi.from_buffer("float[]", x), len(x), ffi.from_buffer("float[]", out), int(packed)))
    return out


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_matmul_matches_float64(rng, simd, qtype, packed):
    """Every quantized type, odd row counts (groups of 8 and leftovers), odd block counts, token
    counts below, at and above the kernels' 4-token tile."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for rows, n_blocks, n in ((8, 1, 1), (24, 3, 5), (40, 7, 4), (13, 5, 7), (56, 3, 37)):
        cols = n_blocks * max(block, 32)
        data = random_blocks(rng, qtype, rows * cols // block)
        w = gguf.quants.dequantize(data, qtype).reshape(rows, cols).astype(np.float64)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[0, :32] = 0  # an all-zero activation block
        a = np.stack([q8_reference(r) for r in x])
        xq = a["d"][..., None].astype(np.float64) * a["qs"]
        xq = xq.reshape(n, cols)
        out = c_matmul(data, qtype, rows, cols, x, packed)
        expected = xq @ w.T
        scale = np.abs(xq) @ np.abs(w).T
        assert np.all(np.abs(out - expected) <= MAX_MATMUL_REL_ERROR * scale + 1e-30), (rows, cols, n, simd)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_matmul_does_not_depend_on_the_token_tile(rng, simd, qtype):
    """A token's outputs are bit for bit the same whether it is multiplied alone or within a batch
    (logits must not depend on how a prompt is cut into chunks)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols, n = 48, 3 * max(block, 32), 11
    data = random_blocks(rng, qtype, rows * cols // block)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    batch = c_matmul(data, qtype, rows, cols, x, True)
    alone = np.concatenate([c_matmul(data, qtype, rows, cols, x[t:t + 1], True) for t in range(n)])
    np.testing.assert_array_equal(batch, alone)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_matmul_does_not_depend_on_the_row_pairing(rng, simd, qtype):
    """A row's outputs are bit for bit the same whether its group of 8 is multiplied paired with a
    neighbour (the 16-row AVX-512 kernels) or alone (threads cut the rows at any multiple of 8)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols, n = 40, 5 * max(block, 32), 6
    data = random_blocks(rng, qtype, rows * cols // block).reshape(rows, -1)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    together = c_matmul(data, qtype, rows, cols, x, True)
    for g in range(rows // 8):
        alone = c_matmul(data[8 * g:8 * g + 8], qtype, 8, cols, x, True)
        np.testing.assert_array_equal(together[:, 8 * g:8 * g + 8], alone)


def test_matmul_errors():
    out = np.zeros(8, dtype=np.float32)
    x = np.zeros(32, dtype=np.float32)
    w = np.zeros(18, dtype=np.uint8)
    with pytest.raises(InvalidArgumentError):
        check(lib.se_matmul(int(QT.Q4_0), ffi.from_buffer(w), 1, 33, ffi.from_buffer("float[]", x), 1,
                            ffi.from_buffer("float[]", out), 1))
    with pytest.raises(UnsupportedError):
        check(lib.se_matmul(int(QT.Q2_K), ffi.from_buffer(w), 1, 256, ffi.from_buffer("float[]", x), 1,
                            ffi.from_buffer("float[]", out), 1))
