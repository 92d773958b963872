"""The SepLLM KV cache against the test-only Python oracle of the policy (policy_oracle.py):
training-free `sepllm` equals full attention under the SepLLM mask; `sepllm-stream` and
`streamingllm` equal the streaming references (physical caches of pre-RoPE keys re-rotated at cache
positions every step). Step by step through thousands of tokens with many compression events, and
in chunked prefill."""

import secrets

import numpy as np
import pytest
import torch

import fixtures
from sepedge import ContextFullError, Engine, InvalidArgumentError
from sepedge.convert import convert
from sepedge.reference import Transformer

from policy_oracle import StreamingCache, sepllm_mask
from policy_oracle import stream as oracle_stream

MAX_REL_DIFF = 5e-5          # native float32 vs the float64 reference, f32 KV cache
MAX_REL_DIFF_SMOLLM2 = 2e-4  # 30 layers, float32 reference
SEP_RATE = 0.2               # separators in the random streams, about as often as in English text


@pytest.fixture(scope="module")
def model(tiny_dirs, tmp_path_factory):
    """A tiny llama with SmolLM2's vocabulary (so, real separator ids); f16 weights, whose float
    activations keep the comparison with the reference at rounding level."""
    return convert(tiny_dirs("gqa3-sharded-padded"), tmp_path_factory.mktemp("sep") / "m.gguf", outtype="f16",
                   progress=False)


@pytest.fixture(scope="module")
def reference(model):
    return Transformer.from_gguf(model, dtype=torch.float64)


@pytest.fixture(scope="module")
def separators(model):
    with Engine(model, n_ctx=8) as e:
        return e.info["separators"]


@pytest.fixture
def stream(separators):
    """Random token streams in which about SEP_RATE of the tokens are separators."""
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    seps = np.array([s for s in separators if s < 990])
    others = np.setdiff1d(np.arange(990), seps)

    def make(n: int) -> list[int]:
        return np.where(rng.random(n) < SEP_RATE, rng.choice(seps, n), rng.choice(others, n)).tolist()

    return make


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def engine(model, **kw):
    return Engine(model, kv_type="f32", n_threads=2, **kw)


def step_by_step(llm, tokens) -> np.ndarray:
    llm.reset()
    return np.stack([llm.eval([t]) for t in tokens])


def is_sep(tokens, separators) -> torch.Tensor:
    return torch.tensor([t in set(separators) for t in tokens])


# ---------------------------------------------------------------------------------------------
# training-free sepllm


@pytest.mark.parametrize("n_init,n_sep,n_local,n_cache", [
    (3, 0, 32, 2048),     # the paper's rule: every separator kept
    (4, 8, 24, 64),       # capped separator region: overflows constantly
    (0, 16, 40, 100),     # no initial tokens
])
def test_sepllm_equals_masked_full_attention(model, reference, separators, stream, n_init, n_sep, n_local, n_cache):
    tokens = stream(1500 if n_sep else 600)
    mask = sepllm_mask(is_sep(tokens, separators), n_init, n_sep, n_local)
    ref = reference(torch.tensor(tokens), mask=mask).numpy()
    with engine(model, kv_mode="sepllm", n_init=n_init, n_sep=n_sep, n_local=n_local, n_cache=n_cache,
                n_batch=64) as llm:
        chunked = llm.eval_logits(tokens)  # prefill in chunks, evicting between them
        assert rel(chunked, ref) <= MAX_REL_DIFF
        stats = llm.kv_stats()
        assert stats["live"] <= n_cache and stats["tokens_seen"] == len(tokens)
        # what the next token would see, and nothing more, is what the cache holds
        nxt = len(tokens)
        seps_left = [j for j in range(n_init, nxt - n_local + 1) if tokens[j] in set(separators)]
        keep = set(range(min(n_init, nxt))) | set(range(max(0, nxt - n_local + 1), nxt))
        keep |= set(seps_left[-n_sep:] if n_sep else seps_left)
        _, positions, regions = llm._ctx.cells()
        assert sorted(positions.tolist()) == sorted(keep)
        assert stats["live_sep"] == min(len(seps_left), n_sep or len(seps_left))
        assert rel(step_by_step(llm, tokens), ref) <= MAX_REL_DIFF


def test_sepllm_window_covering_everything_is_full_attention(model, stream):
    tokens = stream(300)
    with engine(model, n_ctx=512) as full, engine(model, kv_mode="sepllm", n_local=400, n_cache=512) as sep:
        assert rel(sep.eval_logits(tokens), full.eval_logits(tokens)) <= 1e-6
        assert sep.kv_stats()["tokens_evicted"] == 0


def test_sepllm_unlimited_separators_fill_up(model, separators, stream):
    """With every separator kept the cache can fill: a clear error, and the cache untouched."""
    with engine(model, kv_mode="sepllm", n_init=4, n_sep=0, n_local=16, n_cache=60) as llm:
        tokens = stream(40)
        llm.eval_logits(tokens)
        before = llm.kv_stats()
        with pytest.raises(ContextFullError, match="KV cache is full"):
            llm.eval([separators[0]] * 200)
        assert llm.kv_stats() == before


# ---------------------------------------------------------------------------------------------
# streaming modes


def reference_stream(reference, tokens, separators, mode, n_init, n_sep, n_local, n_cache):
    cache = StreamingCache(mode, separators, n_init, n_sep, n_local, n_cache)
    return oracle_stream(reference, tokens, cache).numpy(), cache


@pytest.mark.parametrize("mode,n_init,n_sep,n_local,n_cache", [
    ("sepllm-stream", 4, 8, 24, 64),      # a compression every few tokens, separator overflow
    ("sepllm-stream", 0, 16, 32, 80),     # no initial tokens
    ("sepllm-stream", 4, 0, 24, 400),     # every separator kept (fits for this length)
    ("streamingllm", 4, 0, 28, 32),       # the baseline: n_local = n_cache - n_init
    ("streamingllm", 0, 0, 40, 40),
])
def test_streaming_modes_equal_reference(model, reference, separators, stream, mode, n_init, n_sep, n_local, n_cache):
    tokens = stream(1200)
    ref, cache = reference_stream(reference, tokens, separators, mode, n_init, n_sep, n_local, n_cache)
    with engine(model, kv_mode=mode, n_init=n_init, n_sep=n_sep, n_local=n_local, n_cache=n_cache) as llm:
        steps = step_by_step(llm, tokens)
        assert rel(steps, ref) <= MAX_REL_DIFF
        # the same cells, in the same order, as the reference's physical cache (streamingllm evicts
        # a token as soon as it leaves the window, the reference when the next token comes)
        entries = [e for e in cache.entries if mode != "streamingllm" or e[2] == "init" or e[1] > len(tokens) - n_local]
        toks, positions, regions = llm._ctx.cells()
        assert [(int(t), int(p)) for t, p in zip(toks, positions)] == [(t, p) for t, p, _ in entries]
        assert regions == [r for _, _, r in entries]
        stats = llm.kv_stats()
        assert stats["live"] <= n_cache and stats["tokens_evicted"] == len(tokens) - stats["live"]
        assert stats["live"] == stats["live_init"] + stats["live_sep"] + stats["live_recent"]
        # a prompt processed in chunks (cut at compressions) gives the same logits
        assert rel(llm.eval_logits(tokens), ref) <= MAX_REL_DIFF


def test_streaming_window_covering_everything_is_full_attention(model, stream):
    tokens = stream(200)
    with engine(model, n_ctx=256) as full:
        expected = full.eval_logits(tokens)
    for mode in ("sepllm-stream", "streamingllm"):
        with engine(model, kv_mode=mode, n_init=4, n_sep=8, n_local=240, n_cache=256) as llm:
            assert rel(llm.eval_logits(tokens), expected) <= 1e-6, mode


def test_kv_memory_is_constant(model, stream):
    with engine(model, kv_mode="sepllm-stream", n_init=4, n_sep=16, n_local=48, n_cache=96) as llm:
        first = llm.kv_stats()["kv_bytes"]
        for _ in range(6):
            llm.eval(stream(700))
            s = llm.kv_stats()
            assert s["kv_bytes"] == first and s["live"] <= 96 and s["capacity"] == 96
        assert s["tokens_seen"] == 4200 and s["tokens_evicted"] == 4200 - s["live"]
        assert s["avg_attended"] <= 96


def test_rewinding_stops_at_the_last_eviction(model, stream):
    with engine(model, kv_mode="sepllm-stream", n_init=4, n_sep=8, n_local=24, n_cache=64) as llm:
        tokens = stream(300)
        llm.eval_logits(tokens)
        with pytest.raises(InvalidArgumentError, match="evicted"):
            llm._ctx.truncate(10)
        floor = 300 - (llm.kv_stats()["live_recent"] - 23)  # tokens since the last compression
        llm._ctx.truncate(floor)
        assert llm._ctx.info()["n_seen"] == floor


@pytest.mark.parametrize("mode,sizes,match", [
    ("sepllm-stream", dict(n_init=4, n_sep=64, n_local=256, n_cache=324), "< n_cache"),
    ("sepllm-stream", dict(n_init=4, n_sep=0, n_local=320, n_cache=324), "< n_cache"),
    ("streamingllm", dict(n_init=4, n_local=400, n_cache=324), "<= n_cache"),
    ("sepllm", dict(n_init=4, n_sep=64, n_local=256, n_cache=300), "<= n_cache"),
    ("sepllm", dict(n_local=0), "n_local >= 1"),
])
def test_invalid_sizes_are_rejected(model, mode, sizes, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Engine(model, kv_mode=mode, **sizes)
    with pytest.raises(InvalidArgumentError, match="kv_mode"):
        Engine(model, kv_mode="h2o")


def test_defaults_come_from_the_file(model):
    with Engine(model, kv_mode="sepllm-stream") as llm:
        s = llm.kv_stats()
        assert (s["n_init"], s["n_sep"], s["n_local"], s["capacity"]) == (4, 64, 256, 800)


# ---------------------------------------------------------------------------------------------
# a real model and real text


def test_smollm2_sepllm_stream(smollm2_dir, tmp_path):
    # f16 weights (converted from the rebuilt checkpoint): float activations, a tight comparison
    path = convert(smollm2_dir, tmp_path / "smollm2-f16.gguf", outtype="f16", progress=False)
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness; it was the epoch of belief, it was the epoch of incredulity. ") * 12
    with Engine(path, kv_type="f32", kv_mode="sepllm-stream", n_init=4, n_sep=16, n_local=48, n_cache=96) as llm:
        tokens = llm.tokenize(text)[:360]
        steps = step_by_step(llm, tokens)
        seps = llm.info["separators"]
        assert llm.kv_stats()["tokens_evicted"] > 200
    ref = Transformer.from_gguf(path, dtype=torch.float32)
    expected, _ = reference_stream(ref, tokens, seps, "sepllm-stream", 4, 16, 48, 96)
    assert rel(steps, expected) <= MAX_REL_DIFF_SMOLLM2


def test_chat_keeps_its_system_prompt_forever():
    system = "You are a pirate. Always answer like a pirate, whatever happens."
    with Engine(fixtures.smollm2_gguf(), kv_mode="sepllm-stream", n_init=4, n_sep=16, n_local=64, n_cache=160,
                seed=0) as llm:
        history = [{"role": "system", "content": system}]
        pinned = None
        for turn in range(8):
            history.append({"role": "user", "content": f"Tell me something about ship number {turn}, in detail."})
            g = llm.stream_chat(history, max_tokens=60, temperature=0.7)
            history.append({"role": "assistant", "content": "".join(g)})
            s = llm.kv_stats()
            pinned = pinned or s["n_init"]
            assert s["n_init"] == pinned > 4 and s["live_init"] == pinned
        assert s["tokens_seen"] > 2 * 160 and s["tokens_evicted"] > 160  # far past the cache, still chatting
        tokens, positions, regions = llm._ctx.cells()
        head = llm.format_chat(history[:1] + [{"role": "user", "content": "x"}], add_generation_prompt=False)
        assert tokens[:pinned].tolist() == head[:pinned] and positions[:pinned].tolist() == list(range(pinned))
        assert "You are a pirate" in llm.detokenize(tokens[:pinned].tolist()).decode()
