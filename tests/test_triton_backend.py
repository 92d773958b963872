"""The Triton backend (Engine(device="triton"), sepedge.triton_backend) end to end on tiny random
models: logits step by step through streams with compressions and evictions, and chunked prompts
longer than the cache, against the CPU engine, for every kv_mode and several tensor types; cells and
cache statistics equal to the CPU's (one native policy plans both); the generation API; the errors.
Without a GPU the kernels run through Triton's interpreter on CPU tensors (small shapes); with one,
the tests marked `gpu` add longer streams and the CUDA-graph decode."""

import importlib
import os
import secrets
import sys

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at their first import
pytest.importorskip("triton")

import fixtures  # noqa: E402
from sepedge import BackendError, CancelledError, Engine, InvalidArgumentError  # noqa: E402
from sepedge.reference import Transformer  # noqa: E402

# max |triton - other| / max |other| over a sequence's logits. Against the CPU engine with f32 keys and
# values: float weights differ by summation order only. Quantized weights take 8-bit activations in
# both engines (kernels/act_q8.py: the CPU core's quantize_q8 and per-block integer sums;
# test_triton_kernels.test_products_match_the_cpu_core holds single products to 1e-6), but a row
# that differs in its last bit (summation order) can put a value on the other side of a rounding tie,
# and one code moved in these tiny random models moves logits by up to ~1e-2 (measured: 2e-7 on
# streams without such a flip, 4e-3..1.3e-2 with one). Against the float64 reference: float32 sums,
# and for quantized weights the 8-bit activations (the CPU engine's tolerance in test_engine_logits).
MAX_REL_CPU = {"f32": 1e-4, "f16": 1e-3, "q8_0": 3e-2, "q4_k_m": 3e-2, "q4_0": 3e-2}
MAX_REL_REFERENCE = {"f32": 1e-4, "q8_0": 3e-2, "q4_k_m": 3e-2}
# an f16 cache rounds every key and value (2^-11 relative) where the CPU engine's f32 one does not
MAX_REL_CPU_F16_CACHE = 3e-3
SEP_RATE = 0.25
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

# small caches so that a short stream compresses and evicts many times (n_batch 8: chunked prompts);
# every kv_mode, every outtype the converter makes that the backend reads differently (f32, f16 and
# the quantized ones: q8_0, q4_0, q4_k_m with Q4_K/Q6_K), both rope pairings, odd sizes, GQA and
# biases. Under the interpreter each token costs ~0.3-0.9 s: one case per mode, short streams.
MODES = [
    ("full", {}, "qwen2-untied-odd", "q8_0"),
    ("sepllm", dict(n_init=2, n_sep=4, n_local=8, n_cache=18), "mha-d64", "q4_k_m"),
    ("sepllm-stream", dict(n_init=2, n_sep=4, n_local=8, n_cache=18), "qwen2-untied-odd", "q4_0"),
    ("streamingllm", dict(n_init=2, n_local=10, n_cache=13), "gqa-d128-llama31", "f32"),
    ("sepllm-slide", dict(n_init=2, n_sep=3, n_local=9, n_cache=14), "mha-d64", "f16"),
    ("sepllm-runs", dict(n_init=2, n_sep=3, n_local=9, n_cache=14), "gqa-d128-llama31", "q8_0"),
]
N_STREAM = 22 if not CUDA else 400  # tokens of each stream: past every cache above (full: fewer)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def make_stream(rng, llm, n: int) -> list[int]:
    """Random ids with a separator in about one token of four (so sepllm keeps and caps them)."""
    seps = np.array(llm.info["separators"])
    n_tok = fixtures.SPEC_BY_NAME[os.path.basename(llm.model_path).rsplit("-", 1)[0]].n_tokens or llm.n_vocab
    seps = seps[seps < n_tok]
    others = np.setdiff1d(np.arange(n_tok), seps)
    return np.where(rng.random(n) < SEP_RATE, rng.choice(seps, n), rng.choice(others, n)).tolist()


def step_by_step(llm, tokens) -> np.ndarray:
    llm.reset()
    return np.stack([llm.eval([t]) for t in tokens])


@pytest.mark.parametrize("mode,sizes,spec,outtype", MODES, ids=[f"{m}-{s}-{o}" for m, _, s, o in MODES])
def test_kv_modes_match_cpu(gguf_path, rng, monkeypatch, mode, sizes, spec, outtype):
    """A stream step by step, then as one prompt in chunks of n_batch (longer than a sparse cache):
    the CPU engine's logits, cells and statistics. Decode with every fusion on (SEPEDGE_TRITON_FUSE=1:
    the 8-bit inputs of the output and down products made by the attention merge and the gate/up
    product); test_fuse_modes_match_cpu covers the others."""
    monkeypatch.setenv("SEPEDGE_TRITON_FUSE", "1")
    path = gguf_path(spec, outtype)
    n = N_STREAM if mode != "full" or CUDA else 12
    kw = dict(kv_mode=mode, n_batch=8, kv_type="f32", **sizes) if mode != "full" else dict(n_ctx=n + 8, n_batch=8,
                                                                                          kv_type="f32")
    with Engine(path, device="triton", **kw) as tri, Engine(path, **kw) as cpu:
        tokens = make_stream(rng, cpu, n)
        steps, cpu_steps = step_by_step(tri, tokens), step_by_step(cpu, tokens)
        assert [list(a) for a in tri._ctx.cells()] == [list(a) for a in cpu._ctx.cells()]
        assert tri.kv_stats() == cpu.kv_stats()
        if mode != "full":
            assert cpu.kv_stats()["tokens_evicted"] > 0  # the stream did compress or evict
        prompt, cpu_prompt = tri.eval_logits(tokens), cpu.eval_logits(tokens)
        print(f"rel to the CPU engine: steps {rel(steps, cpu_steps):.3g}, prompt {rel(prompt, cpu_prompt):.3g}")
        assert rel(steps, cpu_steps) <= MAX_REL_CPU[outtype]
        assert rel(prompt, cpu_prompt) <= MAX_REL_CPU[outtype]
        assert tri.kv_stats() == cpu.kv_stats()


@pytest.mark.parametrize("fuse,mode,sizes,spec,outtype", [("0", *MODES[2]), ("attn", *MODES[1])],
                         ids=["0-sepllm-stream-q4_0", "attn-sepllm-q4_k_m"])
def test_fuse_modes_match_cpu(gguf_path, rng, monkeypatch, fuse, mode, sizes, spec, outtype):
    """Decode with act_q8 launches between the products (SEPEDGE_TRITON_FUSE=0) and with the merge's
    8-bit output only (attn, the default): the CPU engine's logits, and the fully fused path's
    (1) within the same tolerance."""
    path = gguf_path(spec, outtype)
    kw = dict(kv_mode=mode, n_batch=8, kv_type="f32", **sizes)
    with Engine(path, **kw) as cpu:
        tokens = make_stream(rng, cpu, 12)
        cpu_steps = step_by_step(cpu, tokens)
    steps = {}
    for f in (fuse, "1"):
        monkeypatch.setenv("SEPEDGE_TRITON_FUSE", f)
        with Engine(path, device="triton", **kw) as tri:
            steps[f] = step_by_step(tri, tokens)
        print(f"fuse {f}: rel to the CPU engine {rel(steps[f], cpu_steps):.3g}")
        assert rel(steps[f], cpu_steps) <= MAX_REL_CPU[outtype]
    assert rel(steps[fuse], steps["1"]) <= MAX_REL_CPU[outtype]


@pytest.mark.parametrize("q4k", ["1", "2"])
def test_q4k_modes_match_cpu(gguf_path, rng, monkeypatch, q4k):
    """The Q4_K (and, in mode 2, Q6_K) decode products of SEPEDGE_TRITON_Q4K in the whole forward pass
    of a Q4_K_M file (Q4_K and Q6_K weights), with the default fusion and the fully fused one (their
    gate/up and residual epilogues): the CPU engine's logits within the file's tolerance; the kernel of
    mode 0 is replaced by one that fails if launched."""
    M = importlib.import_module("sepedge.kernels.matvec")
    Q4_K = importlib.import_module("sepedge.kernels.quants").Q4_K

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the Q4_K kernel of SEPEDGE_TRITON_Q4K=0 was launched")

    monkeypatch.setitem(M.PACKED, Q4_K, (NotLaunched(), *M.PACKED[Q4_K][1:]))
    mode, sizes, spec, outtype = MODES[1]
    assert outtype == "q4_k_m"
    path = gguf_path(spec, outtype)
    kw = dict(kv_mode=mode, n_batch=8, kv_type="f32", **sizes)
    with Engine(path, **kw) as cpu:
        tokens = make_stream(rng, cpu, 10)
        cpu_steps = step_by_step(cpu, tokens)
    monkeypatch.setenv("SEPEDGE_TRITON_Q4K", q4k)
    for fuse in ("attn", "1"):
        monkeypatch.setenv("SEPEDGE_TRITON_FUSE", fuse)
        with Engine(path, device="triton", **kw) as tri:
            steps = step_by_step(tri, tokens)
        print(f"Q4K {q4k}, fuse {fuse}: rel to the CPU engine {rel(steps, cpu_steps):.3g}")
        assert rel(steps, cpu_steps) <= MAX_REL_CPU[outtype]


def test_fuse_mode_is_checked(gguf_path, monkeypatch):
    monkeypatch.setenv("SEPEDGE_TRITON_FUSE", "yes")
    with pytest.raises(InvalidArgumentError, match="SEPEDGE_TRITON_FUSE"):
        Engine(gguf_path("mha-d64", "q8_0"), device="triton")


def test_prefill_mode_is_checked(gguf_path, monkeypatch):
    monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "dequantize")
    with pytest.raises(InvalidArgumentError, match="SEPEDGE_TRITON_PREFILL"):
        Engine(gguf_path("mha-d64", "q8_0"), device="triton")


@pytest.mark.parametrize("spec,outtype", [("gqa-d128-llama31", "f32"), ("mha-d64", "q4_k_m")])
def test_full_matches_reference(gguf_path, rng, spec, outtype):
    """A chunked prompt, then decode steps after it, against the float64 torch reference."""
    path = gguf_path(spec, outtype)
    s = fixtures.SPEC_BY_NAME[spec]
    tokens = rng.integers(0, s.n_tokens or s.n_vocab, 23).tolist()
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    with Engine(path, device="triton", n_ctx=64, n_batch=8, kv_type="f32") as llm:
        got = np.concatenate([llm.eval(tokens[:19], all_logits=True)] + [llm.eval([t])[None] for t in tokens[19:]])
    print(f"rel to the reference {rel(got, ref):.3g}")
    assert rel(got, ref) <= MAX_REL_REFERENCE[outtype]


@pytest.mark.parametrize("spec,outtype", [("mha-d64", "q4_k_m"),
                                          pytest.param("qwen2-untied-odd", "q4_0", marks=gpu_only)])
def test_long_chunks_half_precision_products(gguf_path, rng, monkeypatch, spec, outtype):
    """Chunks of kernels.matmul_mod.F16_MIN_ROWS tokens or more take half-precision rows into the float16
    products (decode and short chunks keep the 8-bit ones): the prompt's logits against the float64
    reference, the CPU engine (8-bit activations) and the 8-bit products of the same backend."""
    from sepedge.kernels import matmul_mod
    if not CUDA:  # the interpreter: a shorter chunk does (the threshold is read at each pass)
        monkeypatch.setattr(matmul_mod, "F16_MIN_ROWS", 16)
    path = gguf_path(spec, outtype)
    s = fixtures.SPEC_BY_NAME[spec]
    n = matmul_mod.F16_MIN_ROWS + 5  # one chunk of F16_MIN_ROWS, one of 5 (the 8-bit path)
    tokens = rng.integers(0, s.n_tokens or s.n_vocab, n).tolist()
    ref = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    kw = dict(n_ctx=n + 8, n_batch=matmul_mod.F16_MIN_ROWS, kv_type="f32")
    with Engine(path, device="triton", **kw) as tri, Engine(path, **kw) as cpu:
        got = tri.eval(tokens, all_logits=True)
        cpu_logits = cpu.eval(tokens, all_logits=True)
        if CUDA:  # the 8-bit products of the same backend on the same chunks (the CPU engine's arithmetic)
            monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "q8")
            tri.reset()
            q8 = tri.eval(tokens, all_logits=True)
            assert rel(q8, cpu_logits) <= MAX_REL_CPU[outtype]
            print(f"rel of the 8-bit products: reference {rel(q8, ref):.3g}, CPU {rel(q8, cpu_logits):.3g}")
    print(f"rel: reference {rel(got, ref):.3g}, CPU {rel(got, cpu_logits):.3g}")
    assert rel(got, ref) <= MAX_REL_REFERENCE.get(outtype, MAX_REL_CPU[outtype])
    assert rel(got, cpu_logits) <= MAX_REL_CPU[outtype]
    assert rel(got[:matmul_mod.F16_MIN_ROWS], cpu_logits[:matmul_mod.F16_MIN_ROWS]) > 0  # other arithmetic ran


# the dequantize-once and the in-register float16 products multiply the same float16 operands into
# float32 sums: they differ by summation order only
SAME_OPERANDS_REL = 1e-4
# q8_0 full, q4_k_m sepllm (its 128-wide rows keep other types than K-quants), q4_0 sepllm-stream, and
# q4_k_m with 256-wide rows (Q4_K / Q6_K weights: the default route decodes those once)
DQ_CASES = [MODES[0], MODES[1], MODES[2], ("full", {}, "gqa-d128-llama31", "q4_k_m")]


@pytest.mark.parametrize("mode,sizes,spec,outtype", DQ_CASES, ids=[f"{m}-{s}-{o}" for m, _, s, o in DQ_CASES])
def test_dequantize_once_prefill(gguf_path, rng, monkeypatch, mode, sizes, spec, outtype):
    """Prompt chunks of kernels.matmul_mod.DQ_MIN_ROWS rows or more (lowered to the chunk size here) decode
    each repacked weight once into the context's float16 scratch and multiply plain float16
    (SEPEDGE_TRITON_PREFILL=dq): the prompt's logits against the CPU engine, and against the in-register
    float16 products (f16, the default) of the same chunks within summation order; the route ran, and
    with auto only for the K-quant weights; Q4_K / Q6_K's tile decoder 1 (SEPEDGE_TRITON_F16_DECODE) gives
    the default decoder 3's in-register logits."""
    from sepedge.kernels import matmul_mod
    n_batch = 8
    monkeypatch.setattr(matmul_mod, "F16_MIN_ROWS", n_batch)
    monkeypatch.setattr(matmul_mod, "DQ_MIN_ROWS", n_batch)
    calls = []
    dq = matmul_mod.matmul_dq
    monkeypatch.setattr(matmul_mod, "matmul_dq", lambda *a, **k: calls.append(a[0].qtype) or dq(*a, **k))
    path = gguf_path(spec, outtype)
    n = 2 * n_batch + 5  # two chunks of n_batch (dequantize once), one of 5 (the 8-bit products)
    kw = dict(kv_mode=mode, n_batch=n_batch, kv_type="f32", **sizes) if mode != "full" else dict(
        n_ctx=n + 8, n_batch=n_batch, kv_type="f32")
    with Engine(path, device="triton", **kw) as tri, Engine(path, **kw) as cpu:
        tokens = make_stream(rng, cpu, n)
        cpu_logits = cpu.eval_logits(tokens)
        monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "dq")
        got = tri.eval_logits(tokens)
        assert calls and tri._ctx.fwd.dq_scratch is not None
        n_calls = len(calls)
        monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "auto")
        tri.reset()
        auto = tri.eval_logits(tokens)
        # auto: the products of the K-quant weights (if any: tiny widths keep other types) decode once
        assert calls[n_calls:] == [q for q in calls[:n_calls] if q in matmul_mod.DQ_AUTO_TYPES]
        assert calls[n_calls:] or spec != "gqa-d128-llama31"
        assert rel(auto, cpu_logits) <= MAX_REL_CPU[outtype]
        n_calls = len(calls)
        monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "f16")
        tri.reset()
        f16 = tri.eval_logits(tokens)
        assert len(calls) == n_calls  # the in-register route took none
        print(f"rel: CPU {rel(got, cpu_logits):.3g}, in-register float16 products {rel(got, f16):.3g}")
        assert rel(got, cpu_logits) <= MAX_REL_CPU[outtype]
        assert rel(got, f16) <= SAME_OPERANDS_REL
        if spec == "gqa-d128-llama31":  # Q4_K / Q6_K weights: their other tile decoder gives the same tiles
            for decoder in ("1",):  # (the dq route's decoding: test_triton_kernels' dequantize tests)
                monkeypatch.setenv(matmul_mod.F16_DECODE_ENV, decoder)
                tri.reset()
                # the interpreter's fixed tiles: the same sums; a GPU tunes each decoder's tiles
                assert rel(tri.eval_logits(tokens), f16) <= (SAME_OPERANDS_REL if CUDA else 0.0)
            monkeypatch.delenv(matmul_mod.F16_DECODE_ENV)
        monkeypatch.setenv("SEPEDGE_TRITON_PREFILL", "dequantize")
        tri.reset()
        with pytest.raises(InvalidArgumentError):
            tri.eval_logits(tokens)


def test_f16_cache_and_generation(gguf_path):
    """The default f16 cache; greedy generation, stop strings and kv_stats through the Engine API."""
    path = gguf_path("qwen2-tied", "q8_0")
    kw = dict(kv_mode="sepllm-stream", n_init=2, n_sep=4, n_local=8, n_cache=20)
    with Engine(path, device="triton", **kw) as tri, Engine(path, kv_type="f32", **kw) as cpu:
        tokens = list(range(3, 27))  # past the cache of 20
        assert rel(tri.eval_logits(tokens), cpu.eval_logits(tokens)) <= MAX_REL_CPU_F16_CACHE + MAX_REL_CPU["q8_0"]
        tri.reset()
        cpu.reset()
        g = tri.generate("Hello", max_tokens=6, temperature=0, stream=True)
        text = "".join(g)
        assert g.finish_reason in ("length", "stop") and len(g.tokens) <= 6
        stats = tri.kv_stats()
        assert stats["mode"] == "sepllm-stream" and stats["capacity"] == 20 and stats["kv_bytes"] > 0
        assert stats["tokens_seen"] == len(tri.tokenize("Hello")) + g.n_fed
        if len(text) > 1:
            stop = text[len(text) // 2:]
            stopped = tri.generate("Hello", max_tokens=6, temperature=0, stop=stop)
            assert stopped == text[:text.find(stop)]


def test_cancel_keeps_the_cache(gguf_path):
    """cancel() stops a forward pass between layers; the cache is as it was and stays usable."""
    path = gguf_path("mha-d64", "f32")
    with Engine(path, device="triton", n_ctx=32, kv_type="f32") as tri, Engine(path, n_ctx=32, kv_type="f32") as cpu:
        tri.eval([1, 2, 3])
        tri._ctx.cancel()
        with pytest.raises(CancelledError, match="the cache is as it was"):
            tri._ctx.decode([4, 5])
        tri._ctx.uncancel()
        assert tri.kv_stats()["tokens_seen"] == 3
        cpu.eval([1, 2, 3])
        assert rel(tri.eval([4, 5]), cpu.eval([4, 5])) <= MAX_REL_CPU["f32"]


def test_spawn_shares_weights(gguf_path):
    path = gguf_path("mha-d64", "f16")
    with Engine(path, device="triton", n_ctx=16, kv_type="f32") as a:
        b = a.spawn()
        assert b._weights is a._weights and b._ctx is not a._ctx
        x = a.eval([5, 6, 7])
        np.testing.assert_allclose(b.eval([5, 6, 7]), x, rtol=0, atol=1e-5 * np.abs(x).max())
        b.close()
        assert a.eval([8]).shape == (a.n_vocab,)


def test_cli_device_triton(gguf_path):
    from click.testing import CliRunner

    from sepedge.cli import main
    path = gguf_path("mha-d64", "q8_0")
    r = CliRunner().invoke(main, ["generate", str(path), "-p", "Hi", "-n", "3", "--temperature", "0", "--device", "triton",
                                  "--kv-mode", "sepllm-stream", "--n-cache", "20", "--n-local", "8", "--n-sep", "4",
                                  "--n-init", "2"])
    assert r.exit_code == 0, r.output


def test_no_gpu_or_no_triton_is_a_backend_error(gguf_path, monkeypatch):
    path = gguf_path("mha-d64", "f16")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="GPU"):
        Engine(path, device="triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with pytest.raises(BackendError, match="triton"):
        Engine(path, device="triton")


@pytest.mark.parametrize("mode,sizes", [("full", {}), ("streamingllm", dict(n_init=2, n_local=10, n_cache=13))])
def test_fixed_shape_decode_equals_direct(gguf_path, rng, monkeypatch, mode, sizes):
    """The step a CUDA graph captures (inputs in one static buffer sized to the cache, the live count
    read from device memory, every split launched) run without the capture: the direct path's logits."""
    path = gguf_path("mha-d64", "q8_0")
    tokens = rng.integers(0, 1013, 17).tolist()  # past the cache of 13
    kw = dict(kv_mode=mode, kv_type="f32", **sizes) if mode != "full" else dict(n_ctx=24, kv_type="f32")
    monkeypatch.setenv("SEPEDGE_TRITON_GRAPHS", "0")
    with Engine(path, device="triton", **kw) as llm:
        direct = step_by_step(llm, tokens)
    monkeypatch.setenv("SEPEDGE_TRITON_GRAPHS", "static")
    with Engine(path, device="triton", **kw) as llm:
        static = step_by_step(llm, tokens)
        assert llm._ctx._graph is not None and llm._ctx._graph.graph is None
    np.testing.assert_allclose(static, direct, rtol=0, atol=1e-6 * np.abs(direct).max())


@pytest.mark.parametrize("mode,sizes", [("full", {}), ("sepllm-stream", dict(n_init=4, n_sep=8, n_local=24, n_cache=64))])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graphs_replay_direct_launches(gguf_path, rng, monkeypatch, mode, sizes):
    """Decode through the captured CUDA graph equals decode by direct launches, bit for bit."""
    path = gguf_path("gqa-d128-llama31", "q4_k_m")
    tokens = rng.integers(0, 777, 300).tolist()
    kw = dict(kv_mode=mode, **sizes) if mode != "full" else dict(n_ctx=512)
    with Engine(path, device="triton", **kw) as llm:
        graphs = step_by_step(llm, tokens)
        assert llm._ctx._graph is not None and llm._ctx._graph.graph is not None
    monkeypatch.setenv("SEPEDGE_TRITON_GRAPHS", "0")
    with Engine(path, device="triton", **kw) as llm:
        direct = step_by_step(llm, tokens)
        assert llm._ctx._graph is None
    np.testing.assert_array_equal(graphs, direct)


@pytest.mark.parametrize("outtype", ["q4_0", "q4_k_m", "q8_0"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_early_launches_change_nothing(gguf_path, rng, monkeypatch, outtype):
    """Decode kernels launched early (SEPEDGE_TRITON_PDL=1, the default on sm_90+) or one after the
    other (0), through the CUDA graph and a compressing cache: the same logits bit for bit (every
    kernel waits before it reads or writes)."""
    path = gguf_path("gqa-d128-llama31", outtype)
    tokens = rng.integers(0, 777, 200).tolist()
    kw = dict(kv_mode="sepllm-stream", n_init=4, n_sep=8, n_local=24, n_cache=64)
    steps = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("SEPEDGE_TRITON_PDL", pdl)
        with Engine(path, device="triton", **kw) as llm:
            steps[pdl] = step_by_step(llm, tokens)
            assert llm._ctx._graph is not None and llm._ctx._graph.graph is not None
    np.testing.assert_array_equal(steps["1"], steps["0"])
