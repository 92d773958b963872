"""The Triton kernels (sepedge.kernels) against float64 references on fresh random inputs of odd sizes.

Without a CUDA GPU (CI) the kernels run through Triton's interpreter on CPU tensors, small shapes only;
with one they run compiled on the GPU, and the tests marked `gpu` add model-sized shapes. The float64
dequantization here is written from the block tables of GGUF.md §7, independently of the kernels' own
decoding and of their torch references (and checked against gguf-py's)."""

import importlib
import math
import os
import secrets

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at import below

pytest.importorskip("triton")
from sepedge import kernels as K  # noqa: E402
from sepedge.kernels import quants as Q  # noqa: E402
from sepedge.kernels.matvec import PACKED  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
type_id = Q.NAMES.get
# byte offsets of the f16 scales in each block (random bytes there could be NaN or huge)
SCALE_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}

# tolerances
DEQUANT_REL = 2.0 ** -23     # float32 decoding: one rounding of d * sc * q - dmin * m
DOT_REL = 2e-5               # float32 sums: |error| / sum |w_j x_j| of a row
CPU_PRODUCT_REL = 1e-6       # against the CPU core's product of the same rows: float32 summation order only
SUM_ORDER_REL = 1e-4         # float32 sums of the same products in another order: K 2^-24 at worst (K 768: 4.6e-5)
HALF_DOT_REL = 2e-3          # half-precision operands (2^-11 each) on tensor cores, float32 sums
HALF_ROUND = 2.0 ** -11      # one rounding to float16 (relative)
NORM_REL = 1e-5              # RMSNorm: float32 sum of squares and rsqrt
ROPE_ATOL = 1e-4             # float32 angles of positions up to 2000 (ulp 1.2e-4), values ~N(0, 1)
SWIGLU_RTOL, SWIGLU_ATOL = 1e-5, 1e-6
ATTN_ATOL = 1e-5             # float32 cache: online softmax in float32
ATTN_ROT_ATOL = 2e-4         # keys rotated on read: float32 angles of deltas up to 700 (ulp 6e-5), keys ~N(0, 4)

gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
SIZES = ["small", pytest.param("large", marks=gpu_only)]


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")  # shown by pytest when the test fails
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# float64 reference decoding (GGUF.md §7)


def f16(b: np.ndarray, off: int) -> np.ndarray:
    return b[:, off:off + 2].copy().view(np.float16)[:, 0].astype(np.float64)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: value j in the low nibble of byte j, value j + 16 in its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)


def k_scales(s: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """6-bit scale and min of sub-block j from the 12 packed bytes (GGUF.md §7.2)."""
    s = s.astype(np.int64)
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 15) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)


def decode_blocks(b: np.ndarray, qtype: int) -> np.ndarray:
    """(n_blocks, block bytes) uint8 -> (n_blocks, values per block) float64."""
    n = len(b)
    if qtype == Q.Q8_0:
        return f16(b, 0)[:, None] * b[:, 2:].view(np.int8)
    if qtype == Q.Q4_0:
        return f16(b, 0)[:, None] * (nibbles(b[:, 2:]) - 8)
    if qtype == Q.Q4_1:
        return f16(b, 0)[:, None] * nibbles(b[:, 4:]) + f16(b, 2)[:, None]
    if qtype == Q.Q5_0:
        qh = b[:, 2:6].copy().view("<u4")[:, 0].astype(np.int64)
        high = (qh[:, None] >> np.arange(32)) & 1
        return f16(b, 0)[:, None] * (nibbles(b[:, 6:]) + 16 * high - 16)
    if qtype in (Q.Q4_K, Q.Q5_K):
        y = np.empty((n, 256))
        qs = b[:, -128:].astype(np.int64)
        d, dmin = f16(b, 0), f16(b, 2)
        for j in range(8):  # sub-block j: chunk j // 2 of 32 bytes, low nibbles when j is even
            c = qs[:, 32 * (j // 2):32 * (j // 2) + 32]
            q = c & 15 if j % 2 == 0 else c >> 4
            if qtype == Q.Q5_K:
                q = q + 16 * ((b[:, 16:48].astype(np.int64) >> j) & 1)
            sc, m = k_scales(b[:, 4:16], j)
            y[:, 32 * j:32 * j + 32] = (d * sc)[:, None] * q - (dmin * m)[:, None]
        return y
    if qtype == Q.Q6_K:
        y = np.empty((n, 256))
        ql, qh = b[:, :128].astype(np.int64), b[:, 128:192].astype(np.int64)
        sc = b[:, 192:208].view(np.int8).astype(np.float64)
        d = f16(b, 208)
        for half in range(2):
            for l in range(32):
                lo = ql[:, 64 * half + l]
                lo32 = ql[:, 64 * half + l + 32]
                h = qh[:, 32 * half + l]
                is_ = 8 * half + l // 16
                base = 128 * half + l
                y[:, base] = d * sc[:, is_] * (((lo & 15) | ((h & 3) << 4)) - 32)
                y[:, base + 32] = d * sc[:, is_ + 2] * (((lo32 & 15) | (((h >> 2) & 3) << 4)) - 32)
                y[:, base + 64] = d * sc[:, is_ + 4] * (((lo >> 4) | (((h >> 4) & 3) << 4)) - 32)
                y[:, base + 96] = d * sc[:, is_ + 6] * (((lo32 >> 4) | (((h >> 6) & 3) << 4)) - 32)
        return y
    raise ValueError(qtype)


def decode(w: np.ndarray, qtype: int, n_cols: int) -> np.ndarray:
    """Weight bytes (N, row bytes) -> float64 (N, n_cols)."""
    N = len(w)
    if qtype == Q.F32:
        return w.copy().view(np.float32).astype(np.float64)
    if qtype == Q.F16:
        return w.copy().view(np.float16).astype(np.float64)
    if qtype == Q.BF16:
        return (w.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    block, size = Q.BLOCKS[qtype]
    return decode_blocks(w.reshape(-1, size), qtype).reshape(N, n_cols)


def random_weight(rng, qtype: int, N: int, n_cols: int) -> np.ndarray:
    """(N, row bytes) uint8: random floats, or random block bytes (every code and bit pattern) with sane
    f16 scales."""
    block, size = Q.BLOCKS[qtype]
    if qtype == Q.F32:
        return rng.standard_normal((N, n_cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((N, n_cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        x = rng.standard_normal((N, n_cols)).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    b = rng.integers(0, 256, (N, n_cols // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        b[..., off:off + 2] = (rng.standard_normal((N, n_cols // block)) * 0.01).astype(np.float16).view(
            np.uint8).reshape(N, n_cols // block, 2)
    return b.reshape(N, -1)


def on_device(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, device=DEVICE)  # a copy: in-place kernels leave the numpy input alone


def n_cols_for(qtype: int, size: str) -> int:
    block = Q.BLOCKS[qtype][0]
    if size == "large":
        return 4096
    return 2 * 256 if block == 256 else (5 * 32 if block == 32 else 37 * 2)  # odd numbers of blocks / values


# ---------------------------------------------------------------------------------------------
# dequantization


@pytest.mark.parametrize("qtype", [t for t in TYPES if Q.BLOCKS[t][0] > 1], ids=type_id)
def test_reference_decoding_matches_gguf(rng, qtype):
    """The float64 decoding above agrees with gguf-py's, so the two cannot share a misreading."""
    gguf = pytest.importorskip("gguf")
    w = random_weight(rng, qtype, 3, 512)
    np.testing.assert_array_equal(decode(w, qtype, 512).astype(np.float32), gguf.quants.dequantize(w, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=type_id)
def test_get_rows(rng, qtype):
    N, n_cols = 29, n_cols_for(qtype, "small")
    w = random_weight(rng, qtype, N, n_cols)
    ids = rng.integers(0, N, 7)
    ref = decode(w, qtype, n_cols)[ids]
    got = K.get_rows(on_device(w), qtype, n_cols, on_device(ids)).double().cpu().numpy()
    assert np.all(np.abs(got - ref) <= DEQUANT_REL * np.abs(ref))
    torch_ref = K.dequantize_ref(torch.from_numpy(w), qtype, n_cols)[ids].double().numpy()
    assert np.all(np.abs(torch_ref - ref) <= DEQUANT_REL * np.abs(ref))


# ---------------------------------------------------------------------------------------------
# products


def check_product(got: torch.Tensor, w64: np.ndarray, x64: np.ndarray, bias, rel: float):
    ref = x64 @ w64.T + (0 if bias is None else bias.astype(np.float64))
    scale = np.abs(x64) @ np.abs(w64).T + 1e-30
    err = np.abs(got.double().cpu().numpy() - ref) / scale
    assert err.max() <= rel, f"max error {err.max():.3g} of sum |w x| (tolerance {rel})"


def q8_codes64(x32: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CPU core's quantize_q8 (se-quants.c) in numpy float32 on float32 rows: codes, scales d and
    d * sum of codes per block of 32; every step a float32 operation, as the C code's."""
    b = x32.reshape(x32.shape[0], -1, 32)
    d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint((b * inv[..., None]).astype(np.float32))  # numpy's rint: half to even, as nearbyintf
    return q.astype(np.int8).reshape(x32.shape), d, (d * q.sum(-1).astype(np.float32)).astype(np.float32)


def dequant_act64(a) -> np.ndarray:
    """The value an 8-bit activation row stands for, in float64: code times block scale."""
    q = a.q.cpu().numpy().astype(np.float64)
    d = a.d.cpu().numpy().astype(np.float64)
    return (q.reshape(q.shape[0], -1, 32) * d[..., None]).reshape(q.shape)


def act_row_ref(x, mode, norm, up):
    """The float row an activation kernel quantizes, in float64 (x itself, its RMSNorm with weight norm,
    or SwiGLU with up), and the relative tolerance of the kernel's float32 row against it."""
    x64 = x.astype(np.float64)
    if mode == "norm":
        return x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * norm, NORM_REL
    if mode == "swiglu":
        return x64 / (1 + np.exp(-np.clip(x64, -700, 700))) * up, SWIGLU_RTOL
    return x64, 0.0


@pytest.mark.parametrize("mode", ["plain", "norm", "swiglu"])
# 129 blocks: one past the RMSNorm's single tile (act_q8.NORM_ROW_NB), its two-pass loop
@pytest.mark.parametrize("n", [32, 5 * 32, 129 * 32, pytest.param(14336, marks=gpu_only)])
def test_act_q8(rng, mode, n):
    """Activations to 8 bits: codes, scales and sums exactly the CPU core's for the float rows the kernel
    quantized; those rows (after the fused norm or SwiGLU) within float32 rounding of float64; rows of
    zeros, of large and of tiny values; strided rows (the halves of a fused gate/up product)."""
    T = 4
    x = (rng.standard_normal((T, 2 * n)) * np.array([[1], [1e-30], [3e4], [0]])).astype(np.float32)[:, :n]
    x[0, :3] = [0.5, -2.5, 127.0]  # ties of the rounding
    up = rng.standard_normal((T, 2 * n)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, n).astype(np.float32)
    xd, upd = on_device(np.concatenate([x, x], 1))[:, :n], on_device(up)[:, n:]  # strided views
    a = K.act_q8(xd, norm=on_device(norm) if mode == "norm" else None, eps=1e-5,
                 up=upd if mode == "swiglu" else None, keep_float=True)
    f = a.f.cpu().numpy()
    ref, tol = act_row_ref(x, mode, norm, up[:, n:])
    assert np.all(np.abs(f - ref) <= tol * np.abs(ref).max(-1, keepdims=True) + 1e-37)
    q, d, s = q8_codes64(f)
    np.testing.assert_array_equal(a.q.cpu().numpy(), q)
    np.testing.assert_array_equal(a.d.cpu().numpy(), d)
    np.testing.assert_allclose(a.s.cpu().numpy(), s, rtol=2 ** -23, atol=0)
    if mode == "plain":  # the torch reference agrees
        r = K.act_q8_ref(xd)
        assert torch.equal(r.q, a.q) and torch.equal(r.d, a.d)


def product_inputs(rng, qtype, T, n_cols, scale=1.0):
    """x (T, n_cols) float32, and what the product multiplies: the float64 value of its 8-bit form
    for quantized weights (made by act_q8, tested above), x itself for float weights."""
    x = (rng.standard_normal((T, n_cols)) * scale).astype(np.float32)
    if qtype in K.FLOAT_TYPES:
        return x, x.astype(np.float64)
    return x, dequant_act64(K.act_q8(on_device(x)))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", TYPES, ids=type_id)
def test_matvec(rng, qtype, size):
    """The default kernel of each type (the repacked weight's where there is one) and the byte-wise one,
    from float rows (quantized here) and from their 8-bit form, with a bias or a residual."""
    N, T = (37, 2) if size == "small" else (4099, 3)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, N, n_cols)
    x, x64 = product_inputs(rng, qtype, T, n_cols)
    bias = rng.standard_normal(N).astype(np.float32) if qtype == Q.Q8_0 else None  # qwen2's q/k/v biases
    for packed in ([True, False] if qtype in PACKED else [None]):
        got = K.matvec(on_device(w), qtype, on_device(x), None if bias is None else on_device(bias), packed=packed)
        check_product(got, decode(w, qtype, n_cols), x64, bias, DOT_REL)
        # the residual stream added in the epilogue (with a bias: folded into it), from the Act
        res = rng.standard_normal((T, N)).astype(np.float32)
        xa = on_device(x) if qtype in K.FLOAT_TYPES else K.act_q8(on_device(x))
        got = K.matvec(on_device(w), qtype, xa, None if bias is None else on_device(bias), packed=packed,
                       res=on_device(res))
        check_product(got - on_device(res), decode(w, qtype, n_cols), x64, bias, DOT_REL + 1e-6)


def assert_same_act(a, b):
    """Two 8-bit activation batches are the same codes, scales and sums, bit for bit."""
    for name in ("q", "d", "s"):
        assert torch.equal(getattr(a, name), getattr(b, name)), f"8-bit {name} differ"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", list(PACKED), ids=type_id)
def test_matvec_glu(rng, qtype, size):
    """The fused gate/up product (matvec_glu): its float gate and up rows within DOT_REL of float64,
    and the 8-bit blocks of silu(gate) * up it makes in its epilogue exactly act_q8's of those rows
    (the kernel tested above against the CPU core's arithmetic); n_ff an odd number of 8-bit blocks
    (the last program half full) at the default tiles and at the smallest (several programs), a bias."""
    n_ff, T = (5 * 32, 2) if size == "small" else (4096 + 3 * 32, 2)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, 2 * n_ff, n_cols)
    x, x64 = product_inputs(rng, qtype, T, n_cols)
    bias = rng.standard_normal(2 * n_ff).astype(np.float32) if qtype == Q.Q8_0 else None
    p = K.pack(on_device(w), qtype, n_cols)
    xa = K.act_q8(on_device(x))
    tiles = [dict(), dict(block_n=64, nb=1)] if size == "small" else [dict(), dict(block_n=128, nb=2)]
    for tile in tiles:
        h, gu = K.matvec_glu(p, qtype, xa, None if bias is None else on_device(bias), keep_gate_up=True, **tile)
        check_product(gu, decode(w, qtype, n_cols), x64, bias, DOT_REL)
        assert_same_act(h, K.act_q8(gu[:, :n_ff], up=gu[:, n_ff:]))
        h2, none = K.matvec_glu(p, qtype, xa, None if bias is None else on_device(bias), **tile)
        assert none is None
        assert_same_act(h2, h)  # without the float rows: the same blocks


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", list(PACKED), ids=type_id)
def test_matvec_norm(rng, qtype, size):
    """A product into the residual stream that also makes the next RMSNorm's 8-bit row from its last
    program (matvec_norm): y within DOT_REL of float64, the 8-bit blocks exactly act_q8's of y through
    the norm (the same norm_q8_row), the tickets back at zero; two rows, several programs a row at the
    smallest tiles, rows of odd block counts, and a second call on the same tickets."""
    N, T = (7 * 32, 2) if size == "small" else (4096 + 5 * 32, 2)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, N, n_cols)
    x, x64 = product_inputs(rng, qtype, T, n_cols)
    res = rng.standard_normal((T, N)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, N).astype(np.float32)
    p, xa, nd = K.pack(on_device(w), qtype, n_cols), K.act_q8(on_device(x)), on_device(norm)
    tickets = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    small = dict(block_n=64, nb=2) if size == "small" else dict(block_n=8, nb=2)
    for i, tile in enumerate([small, dict(), small]):
        r = on_device(res * (i + 1))  # another row each call: a stale one in reused memory would show
        y, h = K.matvec_norm(p, qtype, xa, r, nd, 1e-5, tickets, **tile)
        check_product(y - r, decode(w, qtype, n_cols), x64, None, DOT_REL + 1e-6)
        assert_same_act(h, K.act_q8(y, norm=nd, eps=1e-5))
        assert not tickets.any()


@pytest.mark.parametrize("qtype", list(PACKED), ids=type_id)
def test_packed_tails(rng, qtype):
    """Repacked weights: their values exactly the file's (float64 decoding of the bytes); the decode
    kernels with small tiles over an odd number of blocks (a partial last step), rows that do not fill
    the last program, large activations and codes of every value; the bytes at an odd offset of their
    storage."""
    block = Q.BLOCKS[qtype][0]
    N, n_cols = 13, block * (3 if block == 256 else 7)
    w = random_weight(rng, qtype, N, n_cols)
    wd = on_device(np.concatenate([np.zeros(1, np.uint8), w.reshape(-1)]))[1:].view(w.shape)
    p = K.pack(wd, qtype, n_cols)
    ref = decode(w, qtype, n_cols)
    np.testing.assert_array_equal(K.dequantize_packed_ref(p).double().cpu().numpy(), ref.astype(np.float32))
    x, x64 = product_inputs(rng, qtype, 1, n_cols, scale=5.0)
    got = K.matvec(p, qtype, on_device(x), block_n=4, block_k=2 * block)
    check_product(got, ref, x64, None, DOT_REL)


class _NotLaunched:
    """Stands for a kernel a test must not launch: any launch fails."""

    def __getitem__(self, grid):
        raise AssertionError("the Q4_K kernel of SEPEDGE_TRITON_Q4K=0 was launched")


def _packed_case(rng, qtype, size):
    """A random weight of 37 or 4099 rows (not a whole program of rows) and 3 or 16 blocks of 256, its
    float64 values, its packed form, 8-bit inputs of 2 or 3 rows and a residual of the same shape."""
    N, T, n_cols = (37, 2, 3 * 256) if size == "small" else (4099, 3, 4096)
    w = random_weight(rng, qtype, N, n_cols)
    x, x64 = product_inputs(rng, qtype, T, n_cols, scale=3.0)
    res = rng.standard_normal((T, N)).astype(np.float32)
    return N, T, n_cols, decode(w, qtype, n_cols), K.pack(on_device(w), qtype, n_cols), x64, K.act_q8(on_device(x)), res


@pytest.mark.parametrize("size", SIZES)
def test_matvec_q4k_v2(rng, size, monkeypatch):
    """SEPEDGE_TRITON_Q4K=1 (matvec_q4_k_v2_kernel): the plain product with a residual, the fused gate/up
    and norm epilogues, against float64 at DOT_REL; an odd number of blocks with a partial last step,
    rows that do not fill the last program, pipelined and unpipelined loops (stages 1 and 3: the
    interpreter runs both alike, the compile test builds both for sm_90), one row a thread and two
    (pair); the variant-0 kernel is replaced by one that fails if launched, so these are the new
    kernel's results."""
    M = importlib.import_module("sepedge.kernels.matvec")  # the package's `matvec` is the function
    monkeypatch.setenv(M.Q4K_ENV, "1")
    monkeypatch.setitem(M.PACKED, Q.Q4_K, (_NotLaunched(), *M.PACKED[Q.Q4_K][1:]))
    small = size == "small"
    N, T, n_cols, w64, p, x64, xa, res = _packed_case(rng, Q.Q4_K, size)
    tiles = [dict(), dict(block_n=8, nb=2, stages=1), dict(block_n=8, nb=2, stages=3),
             dict(block_n=16, nb=2, stages=1, pair=1), dict(block_n=16, nb=2, stages=3, pair=1)]
    for tile in tiles:
        got = M.matvec_q8(p, Q.Q4_K, xa, **tile)
        check_product(got, w64, x64, None, DOT_REL)
        got = M.matvec_q8(p, Q.Q4_K, xa, on_device(res), N, **tile)
        check_product(got - on_device(res), w64, x64, None, DOT_REL + 1e-6)
    # the gate/up product with its SwiGLU epilogue: n_ff an odd number of 8-bit blocks
    n_ff = 5 * 32 if small else 4096 + 3 * 32
    wg = random_weight(rng, Q.Q4_K, 2 * n_ff, n_cols)
    for tile in ([dict(), dict(block_n=64, nb=1), dict(block_n=128, nb=1, pair=1)] if small
                 else [dict(), dict(block_n=128, nb=1), dict(block_n=128, nb=1, pair=1)]):
        h, gu = K.matvec_glu(K.pack(on_device(wg), Q.Q4_K, n_cols), Q.Q4_K, xa, keep_gate_up=True, **tile)
        check_product(gu, decode(wg, Q.Q4_K, n_cols), x64, None, DOT_REL)
        assert_same_act(h, K.act_q8(gu[:, :n_ff], up=gu[:, n_ff:]))
    # into the residual stream with the next RMSNorm's 8-bit row
    nn = 7 * 32 if small else 4096 + 5 * 32
    wn = random_weight(rng, Q.Q4_K, nn, n_cols)
    r = on_device(rng.standard_normal((T, nn)).astype(np.float32))
    nd = on_device(rng.uniform(0.5, 1.5, nn).astype(np.float32))
    tickets = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    pn = K.pack(on_device(wn), Q.Q4_K, n_cols)
    for tile in (dict(block_n=8, nb=2), dict(block_n=16, nb=2, pair=1)):
        y, h = K.matvec_norm(pn, Q.Q4_K, xa, r, nd, 1e-5, tickets, **tile)
        check_product(y - r, decode(wn, Q.Q4_K, n_cols), x64, None, DOT_REL + 1e-6)
        assert_same_act(h, K.act_q8(y, norm=nd, eps=1e-5))
        assert not tickets.any()


@pytest.mark.parametrize("size", SIZES)
def test_matvec_q6k_staged(rng, size, monkeypatch):
    """SEPEDGE_TRITON_Q4K=2: Q6_K's kernel with its loop pipelined (stages 3) or not, at tiles of the
    staged table and the defaults, an odd number of blocks, rows that do not fill the last program, a
    residual; against float64 at DOT_REL."""
    M = importlib.import_module("sepedge.kernels.matvec")
    monkeypatch.setenv(M.Q4K_ENV, "2")
    N, T, n_cols, w64, p, x64, xa, res = _packed_case(rng, Q.Q6_K, size)
    for tile in [dict(), dict(block_n=8, nb=2, stages=1), dict(block_n=8, nb=2, stages=3)]:
        check_product(M.matvec_q8(p, Q.Q6_K, xa, **tile), w64, x64, None, DOT_REL)
        got = M.matvec_q8(p, Q.Q6_K, xa, on_device(res), N, **tile)
        check_product(got - on_device(res), w64, x64, None, DOT_REL + 1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=type_id)
def test_matvec_prefetch(rng, qtype, size):
    """The K-quant kernels' PF 1 (the next step's loads in flight while a step is summed): the plain product
    with a residual, the fused gate/up and the norm epilogues, at steps of 1 and 2 blocks over an odd block
    count (the last prefetch past the end), rows that do not fill the last program: bit for bit PF 0's sums
    (the same products added in the same order) and within DOT_REL of float64."""
    M = importlib.import_module("sepedge.kernels.matvec")  # the package's `matvec` is the function
    N, T, n_cols, w64, p, x64, xa, res = _packed_case(rng, qtype, size)
    for tile in (dict(block_n=8, nb=1), dict(block_n=8, nb=2), dict(block_n=4, nb=4)):
        got = M.matvec_q8(p, qtype, xa, on_device(res), N, prefetch=1, **tile)
        assert torch.equal(got, M.matvec_q8(p, qtype, xa, on_device(res), N, prefetch=0, **tile))
        check_product(got - on_device(res), w64, x64, None, DOT_REL + 1e-6)
    n_ff = 5 * 32 if size == "small" else 4096 + 3 * 32
    wg = random_weight(rng, qtype, 2 * n_ff, n_cols)
    pg = K.pack(on_device(wg), qtype, n_cols)
    for tile in (dict(block_n=64, nb=1), dict(block_n=128, nb=2)):
        h, gu = K.matvec_glu(pg, qtype, xa, keep_gate_up=True, prefetch=1, **tile)
        h0, gu0 = K.matvec_glu(pg, qtype, xa, keep_gate_up=True, prefetch=0, **tile)
        assert torch.equal(gu, gu0)
        assert_same_act(h, h0)
        check_product(gu, decode(wg, qtype, n_cols), x64, None, DOT_REL)
    nn = 7 * 32 if size == "small" else 4096 + 5 * 32
    wn = random_weight(rng, qtype, nn, n_cols)
    pn = K.pack(on_device(wn), qtype, n_cols)
    r = on_device(rng.standard_normal((T, nn)).astype(np.float32))
    nd = on_device(rng.uniform(0.5, 1.5, nn).astype(np.float32))
    tickets = torch.zeros(T, dtype=torch.int32, device=DEVICE)
    y, h = K.matvec_norm(pn, qtype, xa, r, nd, 1e-5, tickets, block_n=32, nb=2, prefetch=1)
    y0, h0 = K.matvec_norm(pn, qtype, xa, r, nd, 1e-5, tickets, block_n=32, nb=2, prefetch=0)
    assert torch.equal(y, y0)
    assert_same_act(h, h0)
    check_product(y - r, decode(wn, qtype, n_cols), x64, None, DOT_REL + 1e-6)
    assert not tickets.any()


def test_q4k_variant_values(monkeypatch):
    """SEPEDGE_TRITON_Q4K: unset or empty is 0; 0, 1 and 2 select; anything else is an error at the launch."""
    M = importlib.import_module("sepedge.kernels.matvec")
    monkeypatch.delenv(M.Q4K_ENV, raising=False)
    assert M.q4k_variant() == 0
    for v, want in (("", 0), ("0", 0), ("1", 1), ("2", 2)):
        monkeypatch.setenv(M.Q4K_ENV, v)
        assert M.q4k_variant() == want
    monkeypatch.setenv(M.Q4K_ENV, "3")
    with pytest.raises(ValueError, match="SEPEDGE_TRITON_Q4K"):
        M.q4k_variant()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", TYPES, ids=type_id)
def test_matmul(rng, qtype, size):
    """The default kernel of each type (repacked weights: several blocks of 32 per step, a partial
    last one) and, for the repacked types, the byte-wise one; a bias or a residual."""
    M, N = (19, 37) if size == "small" else (301, 1031)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, N, n_cols)
    x, x64 = product_inputs(rng, qtype, M, n_cols)
    bias = rng.standard_normal(N).astype(np.float32) if qtype == Q.Q4_K else None
    res = rng.standard_normal((M, N)).astype(np.float32) if qtype in (Q.Q8_0, Q.Q4_K) else None
    for packed in ([True, False] if qtype in PACKED else [None]):
        # several tiles each way; 3 blocks of 32 per step of the repacked kernels: 5 or 16 blocks a row
        blocks = dict(block_m=16, block_n=16, block_k=96 if packed else 32) if size == "small" else {}
        got = K.matmul(on_device(w), qtype, on_device(x), None if bias is None else on_device(bias), **blocks,
                       res=None if res is None else on_device(res), packed=packed)
        if res is not None:  # the residual stream added in the epilogue
            got = got - on_device(res)
        check_product(got, decode(w, qtype, n_cols), x64, bias, HALF_DOT_REL if qtype in (Q.F16, Q.BF16) else DOT_REL)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in K.FLOAT_TYPES], ids=type_id)
def test_products_match_the_cpu_core(rng, qtype, T):
    """The same float rows through the CPU core's product (se_matmul: its quantize_q8, integer sums per
    block) and through the kernels (decode for T = 1, prefill for T = 5) agree to float32 summation
    order: the same 8-bit codes, the same per-block arithmetic."""
    from sepedge._ffi import ffi, lib
    N, n_cols = 37, 2 * 256 if Q.BLOCKS[qtype][0] == 256 else 7 * 32
    w = random_weight(rng, qtype, N, n_cols)
    x = (rng.standard_normal((T, n_cols)) * 3).astype(np.float32)
    cpu = np.zeros((T, N), np.float32)
    assert lib.se_matmul(int(qtype), ffi.from_buffer(np.ascontiguousarray(w)), N, n_cols,
                         ffi.from_buffer("float[]", x), T, ffi.from_buffer("float[]", cpu), 0) == 0
    got = (K.matvec if T == 1 else K.matmul)(on_device(w), qtype, on_device(x)).cpu().numpy()
    assert np.abs(got - cpu).max() <= CPU_PRODUCT_REL * np.abs(cpu).max()


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=type_id)
def test_products_beyond_half_range(rng, qtype):
    """Activations far beyond float16's range (65504; random-weight 8B files reach them in their
    feed-forward rows) stay finite and accurate in the prefill and decode products of quantized weights:
    their 8-bit form keeps a float32 scale per block. (Half-precision operands made NaN of such rows.)"""
    M, N, n_cols = 17, 19, 512
    w = random_weight(rng, qtype, N, n_cols)
    x, x64 = product_inputs(rng, qtype, M, n_cols, scale=1e6)
    for got in (K.matmul(on_device(w), qtype, on_device(x), block_m=16, block_n=16),
                K.matvec(on_device(w), qtype, on_device(x[:2]))):
        assert torch.isfinite(got).all()
        check_product(got, decode(w, qtype, n_cols), x64[:len(got)], None, DOT_REL)


@pytest.mark.parametrize("mode", ["plain", "norm", "swiglu"])
@pytest.mark.parametrize("n", [5 * 32, pytest.param(14336, marks=gpu_only)])
def test_act_f16(rng, mode, n):
    """Rows to half precision with a power-of-two scale per row: s * h within one float16 rounding of
    the float64 row (after the fused norm or SwiGLU); the row's largest |h| in [2^13, 2^14) (far from
    float16's 65504); rows of tiny, huge (beyond float16) and zero values; strided rows; the torch
    reference agrees."""
    T = 4
    x = (rng.standard_normal((T, 2 * n)) * np.array([[1], [1e-30], [1e6], [0]])).astype(np.float32)[:, :n]
    up = rng.standard_normal((T, 2 * n)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, n).astype(np.float32)
    xd, upd = on_device(np.concatenate([x, x], 1))[:, :n], on_device(up)[:, n:]  # strided views
    kw = dict(norm=on_device(norm) if mode == "norm" else None, eps=1e-5, up=upd if mode == "swiglu" else None)
    a = K.act_f16(xd, **kw)
    h, s = a.h.double().cpu().numpy(), a.s.double().cpu().numpy()
    ref, tol = act_row_ref(x, mode, norm, up[:, n:])
    top = np.abs(ref).max(-1, keepdims=True)
    assert np.all(np.abs(h * s[:, None] - ref) <= HALF_ROUND * np.abs(ref) + tol * top + 2.0 ** -24 * s[:, None])
    assert np.all(np.log2(s) == np.round(np.log2(s)))  # powers of two: exact scaling
    big = np.abs(h).max(-1)[top[:, 0] > 0]
    assert np.all((big >= 2 ** 13 * (1 - 2 * tol)) & (big <= 2 ** 14))
    r = K.act_f16_ref(xd, **kw)
    assert np.all(np.abs(r.h.double().cpu().numpy() * r.s.double().cpu().numpy()[:, None] - ref)
                  <= HALF_ROUND * np.abs(ref) + tol * top + 2.0 ** -24 * s[:, None])


# (qtype, SEPEDGE_TRITON_F16_DECODE) cases of the float16 products: the Q4_K / Q6_K tile decoders 1 and 3
# (kernels/matmul.py), the other types' one decoder
F16_CASES = [pytest.param(q, d, id=f"{type_id(q)}-decoder{d}") for q in PACKED for d in
             ((1, 3) if q in (Q.Q4_K, Q.Q6_K) else (1,))]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype, decoder", F16_CASES)
def test_matmul_f16(rng, qtype, decoder, size, monkeypatch):
    """The float16 prefill product of repacked weights (weight tiles decoded to float16 in registers,
    half-precision rows with a scale per row): within half-precision rounding of the float64 product of
    the file's values and the rows; rows far beyond float16's range; a partial last K tile (Q4_0/Q8_0:
    5 blocks of 32 in tiles of 64), several tiles each way, a residual or a bias in the epilogue; the
    GPU size autotuned; each Q4_K / Q6_K decoder (SEPEDGE_TRITON_F16_DECODE)."""
    monkeypatch.setenv(K.matmul_mod.F16_DECODE_ENV, str(decoder))
    M, N = (19, 37) if size == "small" else (301, 1031)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, N, n_cols)
    x = (rng.standard_normal((M, n_cols)) * np.where(rng.random((M, 1)) < 0.3, 1e6, 1.0)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if qtype == Q.Q8_0 else None
    res = rng.standard_normal((M, N)).astype(np.float32) if qtype in (Q.Q4_K, Q.Q8_0) else None
    blocks = dict(block_m=16, block_n=16, block_k=64) if size == "small" else {}
    p = K.pack(on_device(w), qtype, n_cols)
    got = K.matmul(p, qtype, K.act_f16(on_device(x)), None if bias is None else on_device(bias), **blocks,
                   res=None if res is None else on_device(res))
    assert torch.isfinite(got).all()
    if res is not None:
        got = got - on_device(res)
    check_product(got, decode(w, qtype, n_cols), x.astype(np.float64), bias, HALF_DOT_REL)


@pytest.mark.parametrize("qtype, decoder", F16_CASES)
def test_dequantize_f16(rng, qtype, decoder, monkeypatch):
    """A repacked weight written out as a plain float16 matrix (the decoder of the float16 products):
    Q4_0 and Q8_0 exactly the float64 values rounded to float16 (code x scale is exact before the one
    rounding); Q4_K and Q6_K within one float16 rounding after a float32 one (d * sc * q - dmin * m in
    float32 first); rows and K tiles that do not fill the last program, default and small tiles; only the
    first N * K values of a larger buffer written; the torch reference agrees; each decoder."""
    monkeypatch.setenv(K.matmul_mod.F16_DECODE_ENV, str(decoder))
    block = Q.BLOCKS[qtype][0]
    N, n_cols = 37, block * (3 if block == 256 else 7)
    w = random_weight(rng, qtype, N, n_cols)
    ref = decode(w, qtype, n_cols)
    p = K.pack(on_device(w), qtype, n_cols)
    for tiles in (dict(block_n=16, block_k=128 if block == 256 else 64), {}):
        buf = torch.full((N * n_cols + 7,), 7.0, dtype=torch.float16, device=DEVICE)
        got = K.dequantize_f16(p, buf, **tiles)
        assert got.shape == (N, n_cols) and got.data_ptr() == buf.data_ptr()
        assert (buf[N * n_cols:] == 7.0).all()
        g = got.double().cpu().numpy()
        if qtype in (Q.Q4_0, Q.Q8_0):
            np.testing.assert_array_equal(g, ref.astype(np.float16).astype(np.float64))
        else:
            tol = HALF_ROUND * np.abs(ref) + 4 * DEQUANT_REL * np.abs(ref).max(-1, keepdims=True) + 2.0 ** -25
            assert np.all(np.abs(g - ref) <= tol)
    r = K.dequantize_f16_ref(p).double().cpu().numpy()
    assert np.all(np.abs(r - ref) <= HALF_ROUND * np.abs(ref) + 4 * DEQUANT_REL * np.abs(ref).max() + 2.0 ** -25)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype, decoder", F16_CASES)
def test_matmul_dequantize_once(rng, qtype, decoder, size, monkeypatch):
    """The dequantize-once product of long chunks (the weight decoded to a float16 scratch, then the
    float16 kernel on the plain matrix): within half-precision rounding of the float64 product of the
    file's values and the rows; rows far beyond float16's range; a scratch smaller than the weight (row
    slices: 3 of 16, 16 and 5 rows, the bias or residual sliced with them) and one that holds it; a
    partial last K tile (small: 64-value tiles); the GPU size autotuned; each decoder."""
    monkeypatch.setenv(K.matmul_mod.F16_DECODE_ENV, str(decoder))
    M, N = (19, 37) if size == "small" else (301, 1031)
    n_cols = n_cols_for(qtype, size)
    w = random_weight(rng, qtype, N, n_cols)
    x = (rng.standard_normal((M, n_cols)) * np.where(rng.random((M, 1)) < 0.3, 1e6, 1.0)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if qtype in (Q.Q8_0, Q.Q6_K) else None
    res = rng.standard_normal((M, N)).astype(np.float32) if qtype in (Q.Q4_K, Q.Q8_0) else None
    blocks = dict(block_m=16, block_n=16, block_k=64) if size == "small" else {}
    p = K.pack(on_device(w), qtype, n_cols)
    xh = K.act_f16(on_device(x))
    for rows in (16, N):
        scratch = torch.empty(rows * n_cols + 3, dtype=torch.float16, device=DEVICE)
        got = K.matmul(p, qtype, xh, None if bias is None else on_device(bias), **blocks,
                       res=None if res is None else on_device(res), scratch=scratch)
        assert torch.isfinite(got).all()
        if res is not None:
            got = got - on_device(res)
        check_product(got, decode(w, qtype, n_cols), x.astype(np.float64), bias, HALF_DOT_REL)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=type_id)
def test_f16_decoders_equal(rng, qtype, monkeypatch):
    """SEPEDGE_TRITON_F16_DECODE 3 (code arrays read as int32 words, four codes a word) gives the
    tile of decoder 1 (bytes): the float16 values of dequantize_f16 equal value for value, their bits equal
    except Q6_K's zero codes (+0 where decoder 1 gives -0 for a negative scale, as its docstring says);
    the products of matmul_f16 within SUM_ORDER_REL of decoder 1's (the same tile values; on the GPU the
    compiler lays the dot out per decoder, and float32 sums in another order differ in their last bits,
    as an H200 showed); fresh random weights of 41
    rows (a last tile of 9), 3 blocks, tiles of 64 and 128 values and the default. An unknown value of
    the switch is an error at the launch (2 too: the deleted magic-number decoder), and so is an unknown
    decode argument."""
    N, n_cols = 41, 3 * 256
    w = random_weight(rng, qtype, N, n_cols)
    p = K.pack(on_device(w), qtype, n_cols)
    xh = K.act_f16(on_device(rng.standard_normal((19, n_cols)).astype(np.float32)))
    for tiles in (dict(block_n=16, block_k=64), dict(block_n=32, block_k=128), {}):
        ref = K.dequantize_f16(p, decode=1, **tiles)
        got = K.dequantize_f16(p, decode=3, **tiles)
        assert torch.equal(got, ref)  # as values: +0 == -0
        same_bits = got.view(torch.int16) == ref.view(torch.int16)
        signed_zero = (ref == 0) if qtype == Q.Q6_K else torch.zeros_like(same_bits)
        assert bool((same_bits | signed_zero).all())
    blocks = dict(block_n=16, block_m=16, block_k=64)
    ref = K.matmul_mod.matmul_f16(p, xh, None, 0, decode=1, **blocks).double()
    w16 = K.dequantize_f16(p, decode=1).double()
    scale = (xh.h.double().abs() @ w16.abs().T) * xh.s.double().reshape(-1, 1) + 1e-30
    got = K.matmul_mod.matmul_f16(p, xh, None, 0, decode=3, **blocks).double()
    err = float(((got - ref).abs() / scale).max())
    assert err <= SUM_ORDER_REL, f"decoder 3: {err:.3g} of sum |w x| from decoder 1's product"
    for bad in ("2", "4"):
        monkeypatch.setenv(K.matmul_mod.F16_DECODE_ENV, bad)
        with pytest.raises(ValueError, match=K.matmul_mod.F16_DECODE_ENV):
            K.dequantize_f16(p)
        with pytest.raises(ValueError, match=K.matmul_mod.F16_DECODE_ENV):
            K.matmul_mod.matmul_f16(p, xh, None, 0, **blocks)
    with pytest.raises(ValueError, match="decoder"):
        K.dequantize_f16(p, decode=2)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q6_K, Q.Q4_K], ids=type_id)
def test_head(rng, qtype, size):
    V, n_embd, T = (53, n_cols_for(qtype, "small"), 2) if size == "small" else (32003, 4096, 1)
    w = random_weight(rng, qtype, V, n_embd)
    x = (rng.standard_normal((T, n_embd)) * 3).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, n_embd).astype(np.float32)
    eps = 1e-5
    got = K.head(on_device(w), qtype, on_device(x), on_device(norm), eps)
    x64 = x.astype(np.float64)
    h = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * norm
    check_product(got, decode(w, qtype, n_embd), h, None, DOT_REL)


# ---------------------------------------------------------------------------------------------
# elementwise ops


@pytest.mark.parametrize("n", [1, 37, 576, pytest.param(4096, marks=gpu_only)])
def test_rms_norm(rng, n):
    x = (rng.standard_normal((5, n)) * rng.choice([1e-3, 1, 30])).astype(np.float32)
    w = rng.uniform(-2, 2, n).astype(np.float32)
    eps = 1e-6
    got = K.rms_norm(on_device(x), on_device(w), eps).double().cpu().numpy()
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    assert np.abs(got - ref).max() <= NORM_REL * np.abs(ref).max()


@pytest.mark.parametrize("mode", [K.NORM, K.NEOX], ids=["norm", "neox"])
@pytest.mark.parametrize("head_dim", [6, 64, pytest.param(128, marks=gpu_only)])
def test_rope(rng, mode, head_dim):
    """Positions and signed per-cell deltas, on a strided view (cached keys rotate in place)."""
    T, H = 11, 3
    cache = rng.standard_normal((T + 4, H + 2, head_dim)).astype(np.float32)
    positions = rng.integers(-2000, 2000, T)
    factors = rng.uniform(1, 8, head_dim // 2)  # Llama 3.1 rope_freqs
    freqs = K.inv_freq(head_dim, 10000.0, torch.from_numpy(factors), linear_factor=2.0)
    x = on_device(cache)
    view = x[2:2 + T, 1:1 + H]
    K.rope_(view, on_device(positions), freqs, mode)
    # float64 rotation written from the two pairings of GGUF.md §6
    f64 = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim) / 2.0 / factors
    angle = positions[:, None, None] * f64[None, None, :]
    src = cache[2:2 + T, 1:1 + H].astype(np.float64)
    i0 = np.arange(0, head_dim, 2) if mode == K.NORM else np.arange(head_dim // 2)
    i1 = i0 + 1 if mode == K.NORM else i0 + head_dim // 2
    ref = src.copy()
    ref[..., i0] = src[..., i0] * np.cos(angle) - src[..., i1] * np.sin(angle)
    ref[..., i1] = src[..., i0] * np.sin(angle) + src[..., i1] * np.cos(angle)
    out = x.cpu().numpy()
    assert np.abs(out[2:2 + T, 1:1 + H] - ref).max() <= ROPE_ATOL
    untouched = np.ones(cache.shape[:2], bool)
    untouched[2:2 + T, 1:1 + H] = False
    np.testing.assert_array_equal(out[untouched], cache[untouched])
    ref_t = K.rope_ref(torch.from_numpy(src), torch.from_numpy(positions), freqs.double(), mode).numpy()
    assert np.abs(ref_t - ref).max() <= ROPE_ATOL


@pytest.mark.parametrize("mode", [K.NORM, K.NEOX], ids=["norm", "neox"])
def test_rope_store(rng, mode):
    """New keys rotated at their positions and values, written to scattered cells of an f16 cache
    from strided views (the K and V columns of a fused QKV product); the queries rotated in place in
    the same launch."""
    T, H, D, n_cells = 5, 3, 16, 23
    qkv = rng.standard_normal((T, 6 * H * D)).astype(np.float32)  # k, v, q and more: strided views
    k_np = qkv[:, :H * D].reshape(T, H, D)
    v_np = qkv[:, H * D:2 * H * D].reshape(T, H, D)
    positions = rng.integers(0, 3000, T)
    cells = rng.permutation(n_cells)[:T].astype(np.int32)
    freqs = K.inv_freq(D, 10000.0)
    x = on_device(qkv)
    kc = torch.zeros(n_cells, H, D, dtype=torch.float16, device=DEVICE)
    vc = torch.zeros_like(kc)
    # the queries (3H = 9 heads: GQA, more than one block of 8) rotated in place in the same launch
    q_np = qkv[:, 2 * H * D:5 * H * D].reshape(T, 3 * H, D)
    q = x[:, 2 * H * D:5 * H * D].view(T, 3 * H, D)
    K.rope_store(x[:, :H * D].view(T, H, D), x[:, H * D:2 * H * D].view(T, H, D), on_device(positions),
                 on_device(cells), kc, vc, freqs.to(DEVICE), mode, q=q)
    ref_k = K.rope_ref(torch.from_numpy(k_np).double(), torch.from_numpy(positions), freqs.double(), mode).numpy()
    got_k, got_v = kc.double().cpu().numpy(), vc.double().cpu().numpy()
    assert np.abs(got_k[cells] - ref_k).max() <= ROPE_ATOL + 2.0 ** -11 * np.abs(ref_k).max()  # f16 rounding
    assert np.abs(got_v[cells] - v_np).max() <= 2.0 ** -11 * np.abs(v_np).max()
    others = np.setdiff1d(np.arange(n_cells), cells)
    assert not got_k[others].any() and not got_v[others].any()
    ref_q = K.rope_ref(torch.from_numpy(q_np).double(), torch.from_numpy(positions), freqs.double(), mode).numpy()
    assert np.abs(q.double().cpu().numpy() - ref_q).max() <= ROPE_ATOL
    np.testing.assert_array_equal(x[:, :2 * H * D].cpu().numpy(), qkv[:, :2 * H * D])  # k, v left as they were


@pytest.mark.parametrize("n", [1, 1000, 3 * 1024 + 7])
def test_swiglu(rng, n):
    g, u = (rng.standard_normal((2, n)) * 6).astype(np.float32)
    got = K.swiglu(on_device(g), on_device(u)).double().cpu().numpy()
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u
    np.testing.assert_allclose(got, ref, rtol=SWIGLU_RTOL, atol=SWIGLU_ATOL)
    # rows of a fused gate/up product: the two halves, strided
    gu = on_device(np.concatenate([np.stack([g, g[::-1]]), np.stack([u, u[::-1]])], axis=1))
    got2 = K.swiglu(gu[:, :n], gu[:, n:]).double().cpu().numpy()
    np.testing.assert_allclose(got2[0], ref, rtol=SWIGLU_RTOL, atol=SWIGLU_ATOL)
    np.testing.assert_allclose(got2[1], (g64 / (1 + np.exp(-g64)) * u)[::-1], rtol=SWIGLU_RTOL, atol=SWIGLU_ATOL)


# ---------------------------------------------------------------------------------------------
# attention over live cells


def attention64(q, k_cache, v_cache, cells, n_past):
    """Float64 softmax attention of T queries over cache rows `cells`; query t sees entries <= n_past + t."""
    T, H, D = q.shape
    rep = H // k_cache.shape[1]
    k = np.repeat(k_cache[cells].astype(np.float64), rep, axis=1)
    v = np.repeat(v_cache[cells].astype(np.float64), rep, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), k) / math.sqrt(D)
    s = np.where(np.arange(len(cells))[None, None, :] <= n_past + np.arange(T)[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)


def random_cache(rng, n_cells, H_kv, D, dtype):
    k = (rng.standard_normal((n_cells, H_kv, D)) * 2).astype(dtype)
    v = rng.standard_normal((n_cells, H_kv, D)).astype(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("size", SIZES)
def test_attention_decode(rng, dtype, size):
    """Live cells in scattered order (SepLLM keeps initial, separator and recent cells), several splits
    (small: one cell each, 97 over the cache: the live ones span more than the 32 the merge takes at a
    time, the rest are empty)."""
    n_cells, n_live, H, H_kv, D, per_split = (97, 45, 6, 2, 20, 1) if size == "small" else (40000, 32001, 32, 8, 128, 256)
    k, v = random_cache(rng, n_cells, H_kv, D, dtype)
    cells = rng.permutation(n_cells)[:n_live]
    q = rng.standard_normal((H, D)).astype(np.float32)
    got = K.attention_decode(on_device(q), on_device(k), on_device(v), on_device(cells), cells_per_split=per_split,
                             block_n=1 if size == "small" else 64)
    ref = attention64(q[None], k, v, cells, n_live)[0]
    assert np.abs(got.double().cpu().numpy() - ref).max() <= ATTN_ATOL
    torch_ref = K.attention_decode_ref(torch.from_numpy(q).double(), torch.from_numpy(k), torch.from_numpy(v),
                                       torch.from_numpy(cells)).numpy()
    assert np.abs(torch_ref - ref).max() <= ATTN_ATOL


@pytest.mark.parametrize("D", [32, 64])
def test_attention_decode_quant(rng, D):
    """The merge's 8-bit output (the output projection's input): the float output as the plain call's,
    bit for bit, and within ATTN_ATOL of float64; its blocks exactly act_q8's of that output."""
    n_cells, n_live, H, H_kv = 53, 37, 6, 2
    k, v = random_cache(rng, n_cells, H_kv, D, np.float32)
    cells = rng.permutation(n_cells)[:n_live]
    q = rng.standard_normal((H, D)).astype(np.float32)
    args = (on_device(q), on_device(k), on_device(v), on_device(cells))
    a = K.attention_decode(*args, cells_per_split=4, block_n=2, quant=True)
    plain = K.attention_decode(*args, cells_per_split=4, block_n=2)
    assert torch.equal(a.f, plain.reshape(1, H * D))
    assert np.abs(plain.double().cpu().numpy() - attention64(q[None], k, v, cells, n_live)[0]).max() <= ATTN_ATOL
    assert_same_act(a, K.act_q8(plain.reshape(1, H * D)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("size", SIZES)
def test_attention_prefill(rng, dtype, size):
    """A chunk after n_past scattered live cells; its own cells causal; blocks that cross the boundary."""
    n_cells, n_past, T, H, H_kv, D = (80, 21, 23, 4, 2, 24) if size == "small" else (9000, 4000, 777, 32, 8, 128)
    k, v = random_cache(rng, n_cells, H_kv, D, dtype)
    cells = rng.permutation(n_cells)[:n_past + T]
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    blocks = dict(block_m=16, block_n=16) if size == "small" else {}
    got = K.attention_prefill(on_device(q), on_device(k), on_device(v), on_device(cells), n_past, **blocks)
    ref = attention64(q, k, v, cells, n_past)
    err = np.abs(got.double().cpu().numpy() - ref).max()
    assert err <= ATTN_ATOL, f"max error {err:.3g}"
    torch_ref = K.attention_prefill_ref(torch.from_numpy(q).double(), torch.from_numpy(k), torch.from_numpy(v),
                                        torch.from_numpy(cells), n_past).numpy()
    assert np.abs(torch_ref - ref).max() <= ATTN_ATOL


def rotate64(k: np.ndarray, deltas: np.ndarray, f64: np.ndarray, mode: int) -> np.ndarray:
    """Keys (S, H, D) rotated by a further delta each, in float64 (the pairings of GGUF.md §6)."""
    D = k.shape[-1]
    angle = deltas[:, None, None] * f64[None, None, :]
    i0 = np.arange(0, D, 2) if mode == K.NORM else np.arange(D // 2)
    i1 = i0 + 1 if mode == K.NORM else i0 + D // 2
    src, out = k.astype(np.float64), k.astype(np.float64)
    out[..., i0] = src[..., i0] * np.cos(angle) - src[..., i1] * np.sin(angle)
    out[..., i1] = src[..., i0] * np.sin(angle) + src[..., i1] * np.cos(angle)
    return out


def attention64_masked(q, k, v, visible):
    """Float64 attention of q (T, H, D) over gathered keys/values (S, H_kv, D), visible (T, S) bool."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    k, v = np.repeat(k.astype(np.float64), rep, axis=1), np.repeat(v.astype(np.float64), rep, axis=1)
    s = np.einsum("thd,shd->hts", q.astype(np.float64), k) / math.sqrt(D)
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("mode", [K.NORM, K.NEOX], ids=["norm", "neox"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_attention_decode_deltas_fixed_shape(rng, mode, dtype):
    """Keys rotated on read by the cache plan's deltas; the live count read from device memory over
    fixed-size buffers (what a CUDA graph replays), the entries past it ignored."""
    n_cells, n_live, H, H_kv, D = 61, 29, 4, 2, 16
    k, v = random_cache(rng, n_cells, H_kv, D, dtype)
    cells = rng.permutation(n_cells).astype(np.int32)  # all n_cells entries; only the first n_live count
    deltas = rng.integers(-700, 0, n_cells).astype(np.int32)
    freqs = K.inv_freq(D, 10000.0)
    q = rng.standard_normal((H, D)).astype(np.float32)
    got = K.attention_decode(on_device(q), on_device(k), on_device(v), on_device(cells), deltas=on_device(deltas),
                             freqs=freqs, rope_mode=mode, n_live=on_device(np.array([n_live], np.int32)),
                             cells_per_split=8, block_n=4)
    f64 = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    live = cells[:n_live]
    ref = attention64_masked(q[None], rotate64(k[live], deltas[:n_live], f64, mode), v[live],
                             np.ones((1, n_live), bool))[0]
    assert np.abs(got.double().cpu().numpy() - ref).max() <= ATTN_ROT_ATOL
    torch_ref = K.attention_decode_ref(torch.from_numpy(q).double(), torch.from_numpy(k), torch.from_numpy(v),
                                       torch.from_numpy(live), torch.from_numpy(deltas[:n_live]), freqs, mode).numpy()
    assert np.abs(torch_ref - ref).max() <= ATTN_ROT_ATOL


@pytest.mark.parametrize("mode", [K.NORM, K.NEOX], ids=["norm", "neox"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_attention_prefill_mask_deltas(rng, mode, dtype):
    """A chunk under a cache plan's mask (any pattern; every query sees at least its own cell, some see
    nothing in a whole key block) with keys rotated by deltas."""
    n_cells, S, T, H, H_kv, D = 70, 41, 19, 4, 2, 32
    k, v = random_cache(rng, n_cells, H_kv, D, dtype)
    cells = rng.permutation(n_cells)[:S].astype(np.int32)
    deltas = rng.integers(-300, 300, S).astype(np.int32)
    visible = rng.random((T, S)) < 0.4
    visible[:, :16] = False  # the first key block hidden from everyone
    visible[np.arange(T), S - T + np.arange(T)] = True
    freqs = K.inv_freq(D, 500000.0)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    got = K.attention_prefill(on_device(q), on_device(k), on_device(v), on_device(cells), S - T,
                              mask=on_device(visible), deltas=on_device(deltas), freqs=freqs, rope_mode=mode,
                              block_m=16, block_n=16)
    f64 = 1.0 / 500000.0 ** (np.arange(0, D, 2) / D)
    ref = attention64_masked(q, rotate64(k[cells], deltas, f64, mode), v[cells], visible)
    err = np.abs(got.double().cpu().numpy() - ref).max()
    assert err <= ATTN_ROT_ATOL, f"max error {err:.3g}"
    torch_ref = K.attention_prefill_ref(torch.from_numpy(q).double(), torch.from_numpy(k), torch.from_numpy(v),
                                        torch.from_numpy(cells), S - T, torch.from_numpy(visible),
                                        torch.from_numpy(deltas), freqs, mode).numpy()
    assert np.abs(torch_ref - ref).max() <= ATTN_ROT_ATOL


def test_tuned_configs_reads_the_autotuners(monkeypatch):
    """kernels.tuning.tuned_configs (what triton_bench.py records beside a Triton row) lists each autotuned
    launcher's chosen config per shape key, named by module, kernel and variant; nothing before a launch."""
    import triton

    from sepedge.kernels.tuning import tuned_configs
    mm_mod, mv_mod = importlib.import_module("sepedge.kernels.matmul"), importlib.import_module("sepedge.kernels.matvec")
    kernel = PACKED[Q.Q4_0][0]
    tuner = triton.autotune(configs=[triton.Config({"BLOCK_N": 64, "NB": 2}, num_warps=4)], key=["N", "nblk"])(kernel)
    monkeypatch.setattr(mv_mod, "_tuned", {(Q.Q4_0, False, False): tuner})
    monkeypatch.setattr(mm_mod, "_tuned", {})
    assert tuned_configs() == {f"matvec:{kernel.__name__}:{(Q.Q4_0, False, False)}": {}}
    tuner.cache[(4096, 128)] = tuner.configs[0]
    got = tuned_configs()[f"matvec:{kernel.__name__}:{(Q.Q4_0, False, False)}"]
    assert list(got) == ["(4096, 128)"] and "BLOCK_N: 64" in got["(4096, 128)"] and "num_warps: 4" in got["(4096, 128)"]
