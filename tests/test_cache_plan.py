"""The public cache policy (se_cache_policy, sepedge.cache_plan) against the test-only Python oracle
(policy_oracle.py) and against the reference code's own bookkeeping: plan by plan over long random
streams with separators, every kv_mode, odd sizes, one token or random chunks per call. Then: a
context and a standalone policy fed the same tokens hold the same cells and statistics; the torch
reference following the native plans computes the logits of the oracle's caches and of the engine;
bad arguments give clear errors and change nothing."""

import re
import secrets

import numpy as np
import pytest
import torch

import policy_oracle
from sepedge import ContextFullError, Engine, InvalidArgumentError
from sepedge._ffi import ffi, lib
from sepedge._native import Context, Model
from sepedge.cache_plan import REGION_NAMES, CachePolicy
from sepedge.convert import convert
from sepedge.reference import CellCache, Transformer

N_VOCAB = 1000
SEP_RATE = 0.2               # separators in the random streams, about as often as in English text
MAX_REL_DIFF = 5e-5          # float64 reference vs the native engine's float32, f32 KV cache
MAX_REL_DIFF_REFERENCE = 1e-9  # the torch reference along two routes, both float64

# (kv_mode, n_init, n_sep, n_local, n_cache or n_ctx): odd sizes, regions overflowing all the time
CONFIGS = [
    ("full", 3, 0, 1, 2711),
    ("streamingllm", 3, 0, 13, 16),
    ("streamingllm", 0, 0, 1, 1),          # the window is the current token alone
    ("sepllm", 3, 0, 17, 1400),            # every separator kept (fits this stream)
    ("sepllm", 5, 7, 11, 29),              # the separator region overflows constantly
    ("sepllm", 0, 1, 1, 2),
    ("sepllm-stream", 3, 7, 13, 29),
    ("sepllm-stream", 0, 5, 2, 9),
    ("sepllm-stream", 4, 0, 9, 900),       # every separator kept (fits this stream)
    ("sepllm-stream", 1, 31, 5, 40),
    ("sepllm-slide", 3, 7, 13, 23),        # every cell in use: 3 + 7 + 13
    ("sepllm-slide", 0, 1, 1, 5),          # the window is the current token alone
    ("sepllm-slide", 4, 64, 200, 300),
    ("sepllm-runs", 3, 7, 13, 24),
    ("sepllm-runs", 2, 5, 2, 9),
    ("sepllm-runs", 0, 3, 1, 4),
]
N_TOKENS = 2700
SLIDING = ("streamingllm", "sepllm-slide", "sepllm-runs")  # modes whose window may slide inside a pass


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


def make_stream(rng, n: int, separators, n_vocab: int = N_VOCAB) -> list[int]:
    seps = np.asarray(sorted(separators))
    others = np.setdiff1d(np.arange(n_vocab), seps)
    return np.where(rng.random(n) < SEP_RATE, rng.choice(seps, n), rng.choice(others, n)).tolist()


def policy_for(mode, n_init, n_sep, n_local, n_cells, separators, **kw) -> CachePolicy:
    size = dict(n_ctx=n_cells) if mode == "full" else dict(n_cache=n_cells)
    return CachePolicy(mode, separators=separators, n_vocab=N_VOCAB, n_init=n_init, n_sep=n_sep, n_local=n_local,
                       **size, **kw)


def chunks(rng, n: int, most: int) -> list[int]:
    """Random lengths (1 .. most) that add up to n."""
    out = []
    while n > 0:
        out.append(int(min(n, rng.integers(1, most + 1))))
        n -= out[-1]
    return out


def attended(plan, t: int, tokens) -> list[tuple]:
    """What new token t of the plan attends to: (token, position, region, distance) in cache order,
    distance as RoPE sees it (the query at its position, the key at position + delta + t * step)."""
    q = int(plan.positions[t])
    return [(tokens[p], int(p), REGION_NAMES[int(r)], q - int(p) - int(d) - t * int(k))
            for p, d, k, r, m in zip(plan.live_positions, plan.live_deltas, plan.live_steps, plan.live_regions,
                                     plan.mask[t]) if m]


def run_and_check(policy: CachePolicy, tokens, calls, mode, separators, n_init, oracle):
    """Feed `tokens` in calls of the given lengths and check every plan against the oracle's views.
    Returns the tokens evicted, the compressions and the passes."""
    seps = set(separators)
    where: dict[int, int] = {}  # position -> cell, as the plans said
    n_evicted = n_visible = n_compressions = seen = n_passes = 0
    for n_call in calls:
        call = tokens[seen:seen + n_call]
        done = 0
        while done < n_call:
            before = {int(p) for p in policy.cells()[1]}
            plan = policy.step(call[done:])
            n, first = plan.n_tokens, seen + done
            assert 1 <= n <= min(n_call - done, policy.n_batch)
            assert plan.positions.tolist() == list(range(first, first + n))
            # new tokens take cells nothing live holds, and are live themselves
            still = {int(c) for c, p in zip(plan.live_cells, plan.live_positions) if p < first}
            assert len(set(plan.cells.tolist())) == n and not still & set(plan.cells.tolist())
            assert all(0 <= c < policy.n_cells + policy.n_spare for c in plan.live_cells)
            assert plan.n_live <= policy.n_cells + n - 1  # spare cells: only while a pass slides the window
            assert not plan.live_steps.any() or n > 1 and mode in SLIDING
            for c, p in zip(plan.live_cells, plan.live_positions):
                assert where.get(int(p), int(c)) == c  # a live token stays in its cell
            where.update(zip(plan.positions.tolist(), plan.cells.tolist()))
            # per query: the oracle's view, token by token
            compressed = False
            for t in range(n):
                view, comp = next(oracle)
                got = attended(plan, t, tokens)
                if mode == "sepllm" and n > 1:
                    # within a chunk, separators that leave the window mid-chunk are seen through
                    # the separator floor while still in the recent ring: compare as sets
                    assert sorted((a, b, d) for a, b, _, d in got) == sorted((a, b, d) for a, b, _, d in view)
                else:
                    assert got == view, f"token {first + t}"
                compressed |= comp
                assert comp is False or t == 0  # compressions happen only before a pass
            assert plan.n_compressions == int(compressed)
            assert plan.n_visible == int(plan.mask.sum())
            # evictions: exactly the tokens that were live (or came) and are gone, as they were
            now = {int(p) for p in policy.cells()[1]}
            gone = (before | set(range(first, first + n))) - now
            ev = plan.evicted_positions.tolist()
            assert len(ev) == len(set(ev)) and set(ev) == gone
            for c, tok, p, r in zip(plan.evicted_cells, plan.evicted_tokens, plan.evicted_positions,
                                    plan.evicted_regions):
                assert where.pop(int(p)) == c and tok == tokens[p]
                assert r == lib.SE_REGION_RECENT or (r == lib.SE_REGION_SEP and tok in seps and p >= n_init)
            n_evicted += len(ev)
            n_visible += plan.n_visible
            n_compressions += plan.n_compressions
            n_passes += 1
            done += n
        seen += n_call
        info = policy.info()
        assert info["n_seen"] == seen and info["n_evicted"] == n_evicted and info["sum_visible"] == n_visible
        assert info["n_live"] == info["n_live_init"] + info["n_live_sep"] + info["n_live_recent"] <= policy.n_cells
    return n_evicted, n_compressions, n_passes


@pytest.mark.parametrize("mode,n_init,n_sep,n_local,n_cells", CONFIGS)
@pytest.mark.parametrize("chunked", [False, True, "slide"], ids=["token-by-token", "chunked", "slide-in-pass"])
def test_plans_equal_the_oracle(rng, mode, n_init, n_sep, n_local, n_cells, chunked):
    separators = rng.choice(N_VOCAB, 23, replace=False).tolist()
    tokens = make_stream(rng, N_TOKENS, separators)
    n_batch = int(rng.choice([2, 7, 64] if chunked == "slide" else [1, 2, 7, 64])) if chunked else 1
    policy = policy_for(mode, n_init, n_sep, n_local, n_cells, separators, n_batch=n_batch,
                        slide_in_pass=chunked == "slide")
    assert policy.n_spare == (min(n_batch, n_cells, 64) - 1 if chunked == "slide" and mode in SLIDING else 0)
    calls = chunks(rng, len(tokens), 97) if chunked else [1] * len(tokens)
    oracle = policy_oracle.views(mode, tokens, separators, n_init, n_sep, n_local, n_cells)
    n_evicted, n_compressions, n_passes = run_and_check(policy, tokens, calls, mode, separators, n_init, oracle)
    if mode != "full" and n_cells < N_TOKENS // 2:
        assert n_evicted > N_TOKENS // 2  # the stream went far past the cache
    if mode == "sepllm-stream" and n_cells < 100:
        assert n_compressions > 20
    if chunked == "slide" and mode == "streamingllm" and n_local > 2:
        # the window slides inside passes: calls cut them, nothing else does once the window is full
        assert n_passes < 2 * len(calls) + N_TOKENS / min(n_batch, n_local - 1) + n_init + n_local


# ---------------------------------------------------------------------------------------------
# the reference code's own bookkeeping: the (n_cache, n_local) mapping of the header


def reference_manager(tokens, separators, a, s, w, c, streamingllm=False):
    """Streaming-SepLLM's kv_cache_manager (and StreamingLLM's) as the reference code runs it: a
    token attends to the cache and itself, is appended, and then, when the cache holds more than
    c entries, the past window compresses into its separators (the newest s kept, 0 = all) and the
    local window keeps the newest w; StreamingLLM keeps [0, a) and the newest w after every token.
    Yields, per token, the positions it attends and their slot distances."""
    seps = set(separators)
    cache, sep_end = [], a  # positions; end of the separator block
    for i, _ in enumerate(tokens):
        row = cache + [i]
        yield [(p, len(row) - 1 - slot) for slot, p in enumerate(row)]
        cache.append(i)
        if streamingllm:
            if len(cache) > a + w:
                cache = cache[:a] + cache[len(cache) - w:]
        elif len(cache) > c:
            init, old, past, local = cache[:a], cache[a:sep_end], cache[sep_end:len(cache) - w], cache[len(cache) - w:]
            kept = old + [p for p in past if tokens[p] in seps]
            kept = kept[len(kept) - s:] if s and len(kept) > s else kept
            cache, sep_end = init + kept + local, a + len(kept)


@pytest.mark.parametrize("a,s,w,c", [(4, 8, 24, 64), (3, 5, 7, 19), (0, 3, 4, 11)])
def test_sizes_map_to_the_reference_code(rng, a, s, w, c):
    """The reference's cache_size c and local_size w are sepedge's n_cache - 1 and n_local - 1."""
    separators = rng.choice(N_VOCAB, 17, replace=False).tolist()
    tokens = make_stream(rng, 1500, separators)
    for mode, ref in (("sepllm-stream", reference_manager(tokens, separators, a, s, w, c)),
                      ("streamingllm", reference_manager(tokens, separators, a, s, w, c, streamingllm=True))):
        n_cache = c + 1 if mode == "sepllm-stream" else a + w + 1
        policy = policy_for(mode, a, s, w + 1, n_cache, separators, n_batch=1)
        for i, expected in zip(range(len(tokens)), ref):
            plan = policy.step(tokens[i:i + 1])
            got = [(p, d) for _, p, _, d in attended(plan, 0, tokens)]
            assert got == expected, (mode, i)


# ---------------------------------------------------------------------------------------------
# a context and a standalone policy: the same code, so the same cells and statistics


@pytest.fixture(scope="module")
def model_path(tiny_dirs, tmp_path_factory):
    """A tiny llama with SmolLM2's vocabulary (so, real separator ids); f16 weights."""
    return convert(tiny_dirs("gqa3-sharded-padded"), tmp_path_factory.mktemp("plan") / "m.gguf", outtype="f16",
                   progress=False)


@pytest.fixture(scope="module")
def model(model_path):
    with Model(model_path) as m:
        yield m


@pytest.mark.parametrize("mode,n_init,n_sep,n_local,n_cells", [c for c in CONFIGS if c[4] < 1500])
@pytest.mark.parametrize("slide_in_pass", [False, True], ids=["", "slide-in-pass"])
def test_context_and_policy_agree(model, rng, mode, n_init, n_sep, n_local, n_cells, slide_in_pass):
    separators = model.separators
    tokens = make_stream(rng, 1200, [t for t in separators if t < model.n_vocab], model.n_vocab)
    n_batch = int(rng.choice([3, 16, 50]))
    sizes = dict(kv_mode=mode, n_init=n_init, n_sep=n_sep, n_local=n_local, n_batch=n_batch, slide_in_pass=slide_in_pass)
    sizes.update(n_ctx=n_cells) if mode == "full" else sizes.update(n_cache=n_cells)
    with Context(model, n_threads=2, kv_type="f32", **sizes) as ctx:
        policy = CachePolicy(model=model, mask=False, **sizes)  # the model's separators and vocabulary
        if n_init:  # a pinned prefix, as a chat's system prompt: taken or refused alike
            assert outcome(ctx.keep, n_init + 2) == outcome(policy.keep, n_init + 2)
        s = 0
        for n in chunks(rng, len(tokens), 130):
            ctx.decode(tokens[s:s + n], n_logits=0)
            plans = policy.plan(tokens[s:s + n])
            assert sum(p.n_tokens for p in plans) == n
            s += n
            info, pinfo = ctx.info(), policy.info()
            assert pinfo.pop("kv_bytes") == 0 and info.pop("kv_bytes") > 0
            assert pinfo == info
            for a, b in zip(ctx.cells(), policy.cells()):
                assert np.array_equal(a, b)
        for n_keep in (s - 1, s - 5, 0):  # rewinding works, and fails, the same way
            assert outcome(ctx.truncate, n_keep) == outcome(policy.truncate, n_keep)
            pinfo, info = policy.info(), ctx.info()
            pinfo.pop("kv_bytes"), info.pop("kv_bytes")
            assert pinfo == info
            for a, b in zip(ctx.cells(), policy.cells()):
                assert np.array_equal(a, b)


def outcome(f, *args) -> str:
    try:
        f(*args)
        return "ok"
    except InvalidArgumentError as e:
        return str(e)


def test_policy_with_a_model_takes_its_defaults(model):
    policy = CachePolicy("sepllm-stream", model=model)
    info = policy.info()
    assert (info["n_init"], info["n_sep"], info["n_local"], info["n_cells"]) == (4, 64, 256, 800)
    full = CachePolicy("full", model=model)
    assert full.info()["n_cells"] == model.info["n_ctx_train"]
    # the model's separators: a separator leaving the window is kept, another token is not
    sep, other = model.separators[0], next(t for t in range(model.n_vocab) if t not in set(model.separators))
    p = CachePolicy("sepllm", model=model, n_init=0, n_sep=4, n_local=2, n_cache=8)
    p.plan([sep, other, other, other])
    assert p.cells()[2] == ["sep", "recent"]



def test_a_model_without_a_backend_serves_a_policy(model, model_path):
    """SE_DEVICE_NONE (the Triton backend's load): metadata, separators and policies as a CPU model's,
    nothing repacked, and no context."""
    with Model(model_path, "none") as bare:
        assert bare.info["n_bytes_packed"] == 0
        assert bare.separators == model.separators and bare.meta_keys() == model.meta_keys()
        toks = np.random.default_rng(0).integers(0, bare.n_vocab, 300)
        a = CachePolicy("sepllm-stream", model=bare, n_cache=64, n_local=24, n_sep=8).plan(toks)
        b = CachePolicy("sepllm-stream", model=model, n_cache=64, n_local=24, n_sep=8).plan(toks)
        assert [p.live_cells.tolist() for p in a] == [p.live_cells.tolist() for p in b]
        with pytest.raises(InvalidArgumentError, match="without a backend"):
            Context(bare)

# ---------------------------------------------------------------------------------------------
# the torch reference over the native plans


@pytest.fixture(scope="module")
def reference(model_path):
    return Transformer.from_gguf(model_path, dtype=torch.float64)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("mode,n_init,n_sep,n_local,n_cells,n_batch", [
    ("sepllm-stream", 4, 8, 24, 64, 16),
    ("streamingllm", 3, 0, 21, 24, 8),
    ("sepllm", 4, 8, 24, 64, 32),
    ("full", 4, 0, 1, 400, 64),
    ("sepllm-slide", 4, 8, 24, 40, 16),
    ("sepllm-runs", 3, 6, 20, 30, 8),
    # passes that slide the window (slide_in_pass): odd sizes, batches longer and shorter than the window
    ("streamingllm", 3, 0, 21, 24, "slide 16"),
    ("streamingllm", 0, 0, 37, 41, "slide 64"),
    ("sepllm-slide", 4, 8, 24, 40, "slide 16"),
    ("sepllm-slide", 1, 3, 9, 13, "slide 7"),
    ("sepllm-runs", 3, 6, 20, 30, "slide 64"),
    ("sepllm-runs", 2, 5, 31, 41, "slide 5"),
])
def test_reference_follows_the_native_plans(model, model_path, reference, rng, mode, n_init, n_sep, n_local, n_cells,
                                              n_batch):
    separators = model.separators
    slide = isinstance(n_batch, str)
    n_batch = int(n_batch.split()[1]) if slide else n_batch
    tokens = make_stream(rng, 300 if slide else 150, [t for t in separators if t < model.n_vocab], model.n_vocab)
    sizes = dict(n_init=n_init, n_sep=n_sep, n_local=n_local, n_batch=n_batch, slide_in_pass=slide)
    sizes.update(n_ctx=n_cells) if mode == "full" else sizes.update(n_cache=n_cells)
    policy = CachePolicy(mode, model=model, **sizes)
    plans = CachePolicy(mode, model=model, **sizes).plan(tokens)
    if slide:  # the window did slide inside passes: the last query no longer sees what the first saw
        assert sum(bool((p.mask[0] & ~p.mask[-1]).any()) for p in plans) >= 5
    got = reference.forward_plan(tokens, policy, CellCache(reference.args, policy.n_cells + policy.n_spare,
                                                           torch.float64)).numpy()
    # the oracle's route: physical caches re-rotated at their slots, or full attention under a mask
    if mode in ("sepllm-stream", "streamingllm", "sepllm-slide", "sepllm-runs"):
        cache = policy_oracle.StreamingCache(mode, separators, n_init, n_sep, n_local, n_cells)
        expected = policy_oracle.stream(reference, tokens, cache).numpy()
    else:
        is_sep = torch.tensor([t in set(separators) for t in tokens])
        mask = policy_oracle.sepllm_mask(is_sep, n_init, n_sep, n_local) if mode == "sepllm" else None
        expected = reference(torch.tensor(tokens), mask=mask).numpy()
    assert rel(got, expected) <= MAX_REL_DIFF_REFERENCE
    with Engine(model_path, kv_type="f32", n_threads=2, kv_mode=mode, **sizes) as llm:
        batched = llm.eval_logits(tokens)
        assert rel(batched, got) <= MAX_REL_DIFF
        if slide:  # and the native engine one token per pass, the same logits
            assert llm.kv_stats()["spare_cells"] == min(n_batch, n_cells, 64) - 1
            llm.reset()
            one = np.stack([llm.eval([t]) for t in tokens])
            assert rel(batched, one) <= MAX_REL_DIFF


# ---------------------------------------------------------------------------------------------
# bad arguments: clear errors, nothing changed


def test_bad_arguments_in_python():
    with pytest.raises(InvalidArgumentError, match="kv_mode"):
        CachePolicy("h2o", separators=[1], n_vocab=10)
    with pytest.raises(InvalidArgumentError, match="n_vocab"):
        CachePolicy("sepllm", separators=[1])  # no model: the vocabulary must be given
    with pytest.raises(InvalidArgumentError, match="separators"):
        CachePolicy("sepllm", n_vocab=10)  # no model: the separators must be given
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        CachePolicy("sepllm", separators=[10], n_vocab=10)
    with pytest.raises(InvalidArgumentError, match="n_local >= 1"):
        CachePolicy("sepllm", separators=[1], n_vocab=10, n_local=0)
    with pytest.raises(InvalidArgumentError, match="< n_cache"):
        CachePolicy("sepllm-stream", separators=[1], n_vocab=10, n_init=4, n_sep=4, n_local=8, n_cache=16)
    with pytest.raises(InvalidArgumentError, match="<= n_cache"):
        CachePolicy("streamingllm", separators=[], n_vocab=10, n_init=4, n_local=13, n_cache=16)
    with pytest.raises(InvalidArgumentError, match="n_ctx"):
        CachePolicy("full", separators=[], n_vocab=10)  # no model: no training context to default to
    with pytest.raises(InvalidArgumentError, match="integer"):
        CachePolicy("sepllm", separators=[1], n_vocab=10, n_batch=2.5)
    with pytest.raises(InvalidArgumentError, match="model"):
        CachePolicy("sepllm", model="m.gguf")
    p = CachePolicy("sepllm-stream", separators=[1, 2], n_vocab=10, n_init=1, n_sep=2, n_local=3, n_cache=8)
    p.plan([1, 3, 4, 2, 5, 6, 7, 8, 9, 1, 1, 1])
    before = (p.info(), [a.tolist() if hasattr(a, "tolist") else a for a in p.cells()])
    for bad, match in (([10], "outside the vocabulary"), ([-1], "outside the vocabulary"), ([], "at least one"),
                       ([1.5], "integers"), ([2 ** 40], "32 bits"), ([[1, 2], [3, 4000]], "outside")):
        with pytest.raises(InvalidArgumentError, match=match):
            p.step(bad)
    with pytest.raises(InvalidArgumentError, match="evicted"):
        p.truncate(2)
    with pytest.raises(InvalidArgumentError, match=r"n_keep must be in \[0"):
        p.keep(-1)
    with pytest.raises(InvalidArgumentError, match="initial region"):
        p.keep(3)
    assert (p.info(), [a.tolist() if hasattr(a, "tolist") else a for a in p.cells()]) == before
    p.close()
    with pytest.raises(Exception, match="closed"):
        p.step([1])


def test_a_full_cache_is_refused_whole():
    full = CachePolicy("full", separators=[], n_vocab=10, n_ctx=8, n_batch=3)
    full.plan([1, 2, 3, 4, 5])
    before = full.info()
    with pytest.raises(ContextFullError, match="do not fit"):
        full.step([1, 2, 3, 4])
    assert full.info() == before
    seps = CachePolicy("sepllm", separators=[1], n_vocab=10, n_init=2, n_sep=0, n_local=3, n_cache=12, n_batch=4)
    seps.plan([1] * 8)
    before = seps.info()
    with pytest.raises(ContextFullError, match="KV cache is full"):
        seps.step([1] * 10)  # the first chunks would fit, the whole does not: nothing planned
    assert seps.info() == before
    assert seps.step([0]).n_tokens == 1


def new_policy_raw(params, model=ffi.NULL, ids=(1, 2), n_ids=None):
    arr = ffi.new("int32_t[]", list(ids) or [0])
    out = ffi.new("se_cache_policy **")
    status = lib.se_cache_policy_new(model, params, arr, len(ids) if n_ids is None else n_ids, out)
    return status, out[0], ffi.string(lib.se_last_error()).decode()


def raw_params(**kw):
    p = ffi.new("se_cache_policy_params *", lib.se_cache_policy_default_params())
    for k, v in {**dict(kv_mode=lib.SE_KV_MODE_SEPLLM_STREAM, n_init=2, n_sep=3, n_local=4, n_cache=16, n_vocab=10,
                        n_batch=4), **kw}.items():
        setattr(p, k, v)
    return p


def test_bad_arguments_in_c():
    """The C API checks what the Python wrapper would never send."""
    cases = [
        (raw_params(n_init=-1), "give a model or a size"),
        (raw_params(n_sep=-2), "n_sep must be >= 0"),
        (raw_params(n_vocab=0), "give a model or n_vocab"),
        (raw_params(kv_mode=7), "unknown kv_mode 7"),
        (raw_params(n_batch=0), "n_batch must be >= 1"),
        (raw_params(kv_mode=lib.SE_KV_MODE_FULL, n_ctx=0), "give a model or n_ctx"),
    ]
    for params, match in cases:
        status, ptr, msg = new_policy_raw(params)
        assert status == lib.SE_ERR_INVALID_ARGUMENT and ptr == ffi.NULL, msg
        assert re.search(match, msg), msg
    status, ptr, msg = new_policy_raw(raw_params(), n_ids=-1)
    assert status == lib.SE_ERR_INVALID_ARGUMENT and "give a model or the ids" in msg
    assert lib.se_cache_policy_new(ffi.NULL, raw_params(), ffi.NULL, 3, ffi.new("se_cache_policy **")) == \
        lib.SE_ERR_INVALID_ARGUMENT
    assert lib.se_cache_policy_new(ffi.NULL, raw_params(), ffi.NULL, 0, ffi.NULL) == lib.SE_ERR_INVALID_ARGUMENT
    status, pol, _ = new_policy_raw(raw_params())
    assert status == lib.SE_OK
    try:
        toks = ffi.new("int32_t[]", [1, 3, 4, 5, 6])
        bufs = {k: ffi.new("int32_t[]", 16) for k in ("c", "p", "lc", "lp", "ld", "lr")}
        mask = ffi.new("uint8_t[]", 4 * 16)

        def plan(**kw):
            p = ffi.new("se_cache_plan *")
            p.cells, p.positions, p.max_tokens = bufs["c"], bufs["p"], 4
            p.live_cells, p.live_positions = bufs["lc"], bufs["lp"]
            p.live_deltas, p.live_regions = bufs["ld"], bufs["lr"]
            p.max_live, p.mask, p.mask_size = 16, mask, 4 * 16
            for k, v in kw.items():
                setattr(p, k, v)
            return p

        info0 = ffi.new("se_cache_info *")
        lib.se_cache_policy_get_info(pol, info0)
        for p, n, match in ((plan(max_tokens=3), 5, "room for 4 tokens"), (plan(max_tokens=1), 1, None),
                            (plan(max_live=15), 1, "room for 16 cells"), (plan(live_deltas=ffi.NULL), 1, "live arrays"),
                            (plan(cells=ffi.NULL), 1, "cells and positions"), (plan(mask_size=63), 5, "mask needs 64"),
                            (plan(), 0, "at least one token"), (ffi.NULL, 1, "NULL")):
            status = lib.se_cache_policy_step(pol, toks, n, p)
            if match is None:  # a buffer of one token is enough for one token
                assert status == lib.SE_OK
                lib.se_cache_policy_clear(pol)
                continue
            assert status == lib.SE_ERR_INVALID_ARGUMENT, match
            assert match in ffi.string(lib.se_last_error()).decode()
        info = ffi.new("se_cache_info *")
        lib.se_cache_policy_get_info(pol, info)
        assert info.n_seen == info0.n_seen == 0 and info.n_live == 0
        p = plan()
        for _ in range(5):
            assert lib.se_cache_policy_step(pol, toks, 4, p) == lib.SE_OK
        assert p.n_evicted > 0
        small = ffi.new("int32_t[]", 16)
        assert lib.se_cache_policy_get_evicted(pol, small, ffi.NULL, ffi.NULL, ffi.NULL, p.n_evicted - 1) == \
            lib.SE_ERR_INVALID_ARGUMENT
        assert lib.se_cache_policy_get_evicted(pol, small, ffi.NULL, ffi.NULL, ffi.NULL, p.n_evicted) == lib.SE_OK
        assert lib.se_cache_policy_get_cells(pol, small, small, small, 2) == lib.SE_ERR_INVALID_ARGUMENT
        assert lib.se_cache_policy_get_info(pol, ffi.NULL) == lib.SE_ERR_INVALID_ARGUMENT
    finally:
        lib.se_cache_policy_free(pol)
    lib.se_cache_policy_free(ffi.NULL)
    for f in (lib.se_cache_policy_clear, lambda p: lib.se_cache_policy_truncate(p, 0),
              lambda p: lib.se_cache_policy_keep(p, 0)):
        assert f(ffi.NULL) == lib.SE_ERR_INVALID_ARGUMENT
