"""The converter's numpy quantizers against gguf's (bit for bit) and against their error bounds."""

import secrets

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from sepedge.convert import quants

TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0]  # those gguf can quantize too
K_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K]

# relative RMS error of quantize -> dequantize on standard normal data (measured: f16 2.1e-4,
# bf16 1.7e-3, q8_0 5.4e-3, q4_0 8.6e-2, q4_1 7.8e-2, q5_0 4.3e-2, q4_k 7.2e-2, q5_k 3.6e-2, q6_k 1.8e-2)
MAX_REL_RMS_ERROR = {QT.F32: 0.0, QT.F16: 3e-4, QT.BF16: 2.5e-3, QT.Q8_0: 7e-3, QT.Q4_0: 0.11, QT.Q4_1: 0.10,
                     QT.Q5_0: 0.055, QT.Q4_K: 0.085, QT.Q5_K: 0.045, QT.Q6_K: 0.022}


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")  # shown by pytest when the test fails
    return np.random.default_rng(seed)


def tricky_rows(rng, n_rows: int, n_cols: int) -> np.ndarray:
    """Normal rows plus blocks that stress rounding: zeros, constants, exact .5 ties, one outlier,
    negative extremes, denormal-small and huge values."""
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    flat = x.reshape(-1, 32)
    n = len(flat)
    flat[0 % n] = 0.0
    flat[1 % n] = 0.75
    flat[2 % n] = np.arange(32, dtype=np.float32) - 16.0          # codes land on .5 boundaries
    flat[3 % n] = rng.integers(-8, 8, 32).astype(np.float32) * 0.25
    flat[4 % n, 5] = -40.0                                           # signed extreme picks the scale
    flat[5 % n] *= 1e-30
    flat[6 % n] *= 1e4
    return x


def reference_bytes(x: np.ndarray, qtype: QT) -> np.ndarray:
    q = gguf.quants.quantize(x, qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 4128), (300, 64)])
def test_bit_identical_to_gguf(rng, qtype, shape):
    x = tricky_rows(rng, *shape)
    ours = quants.quantize(x, qtype)
    ref = reference_bytes(x, qtype)
    assert ours.shape == ref.shape == (shape[0], quants.row_nbytes(qtype, shape[1]))
    bad_rows = np.nonzero((ours != ref).any(axis=1))[0]
    assert bad_rows.size == 0, f"{qtype.name}: {bad_rows.size} rows differ, first {bad_rows[:5]}"


@pytest.mark.parametrize("qtype", TYPES + K_TYPES, ids=lambda t: t.name)
def test_error_bound(rng, qtype):
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    back = gguf.quants.dequantize(quants.quantize(x, qtype), qtype).reshape(x.shape)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel <= MAX_REL_RMS_ERROR[qtype]


def test_bf16_keeps_nan_and_inf():
    x = np.array([[np.nan, -np.inf, np.inf, 1.0] * 8], dtype=np.float32)
    back = gguf.quants.dequantize(quants.quantize(x, QT.BF16), QT.BF16)
    assert np.isnan(back[0, 0]) and back[0, 1] == -np.inf and back[0, 2] == np.inf and back[0, 3] == 1.0


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quants_handle_hard_blocks(rng, qtype):
    """Zeros, constants, one outlier, huge and tiny values: finite codes, error within bounds."""
    x = tricky_rows(rng, 4, 512)
    x[1, :256] = 0.0
    x[2, :256] = 3.0
    back = gguf.quants.dequantize(quants.quantize(x, qtype), qtype).reshape(x.shape)
    assert np.isfinite(back).all()
    assert np.array_equal(back[1, :256], x[1, :256])
    normal = slice(3, 4)  # an untouched row of normal values
    rel = np.sqrt(np.mean((back[normal] - x[normal]) ** 2) / np.mean(x[normal] ** 2))
    assert rel <= MAX_REL_RMS_ERROR[qtype]


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_rejects_rows_not_made_of_blocks(qtype):
    assert not quants.can_quantize(qtype, 72)
    with pytest.raises(ValueError, match="block"):
        quants.quantize(np.zeros((2, 72), np.float32), qtype)
