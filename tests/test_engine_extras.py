"""What the server and the llama-cpp-python drop-in need from the Engine and the C core: embeddings
(final hidden states, against the torch reference), cache state save/load (exact continuation in
every cache mode, corrupt states rejected with the cache untouched), logit_bias, penalties and
logprobs, slots sharing a model; `sepedge quantize` (byte for byte what `convert` writes) and
`sepedge tokenize`."""

import json
import secrets
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import fixtures
from sepedge import Engine, InvalidArgumentError, SepedgeError
from sepedge.convert import ConvertError, convert, requantize
from sepedge.reference import Transformer

SPEC = "mha-d64"
# native float32 hidden states against the float64 reference (f32 weights and KV cache)
MAX_REL_DIFF_EMBD = 3e-5
SMALL = dict(n_init=4, n_sep=8, n_local=16, n_cache=48)  # a sparse cache that a 100-token text overflows
MODES = [dict(kv_mode="full", n_ctx=256), dict(kv_mode="sepllm", **SMALL), dict(kv_mode="sepllm-stream", **SMALL),
         dict(kv_mode="streamingllm", **SMALL)]


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tiny(gguf_path):
    return gguf_path(SPEC, "f32")


def n_tokens(path) -> int:
    spec = fixtures.SPEC_BY_NAME[SPEC]
    return spec.n_tokens or spec.n_vocab


# --- embeddings


def reference_hidden(path, tokens) -> np.ndarray:
    """The reference model's final hidden states (after the output norm): its logits with the
    output head replaced by the identity."""
    m = Transformer.from_gguf(path, dtype=torch.float64)
    m.w["output.weight"] = torch.eye(m.args.n_embd, dtype=torch.float64)
    return m(torch.tensor(tokens)).numpy()


def test_embeddings_are_the_final_hidden_states(tiny, rng):
    tokens = rng.integers(0, n_tokens(tiny), 37).tolist()
    ref = reference_hidden(tiny, tokens)
    with Engine(tiny, n_ctx=64, n_batch=8, kv_type="f32") as e:  # n_batch 8: collected over several passes
        mean = e.embed(tokens, pooling="mean", normalize=False)
        last = e.embed(tokens, pooling="last", normalize=False)
        unit = e.embed(tokens)
        assert e.kv_stats()["tokens_seen"] == 0  # the cache is left empty
        logits = e.eval_logits(tokens)  # and works as before
    assert np.abs(mean - ref.mean(0)).max() / np.abs(ref.mean(0)).max() <= MAX_REL_DIFF_EMBD
    assert np.abs(last - ref[-1]).max() / np.abs(ref[-1]).max() <= MAX_REL_DIFF_EMBD
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(unit, mean / np.linalg.norm(mean), atol=1e-6)
    assert logits.shape == (37, fixtures.SPEC_BY_NAME[SPEC].n_vocab)


def test_embeddings_of_long_texts_in_a_sparse_cache(tiny, rng):
    tokens = rng.integers(0, n_tokens(tiny), 300).tolist()
    with Engine(tiny, kv_mode="sepllm-stream", **SMALL) as e:
        v = e.embed(tokens)
        assert v.shape == (128,) and np.isfinite(v).all()
    with Engine(tiny, n_ctx=64) as e, pytest.raises(SepedgeError, match="context window"):
        e.embed(tokens)
    with Engine(tiny, n_ctx=64) as e:
        with pytest.raises(InvalidArgumentError, match="empty"):
            e.embed([])
        with pytest.raises(InvalidArgumentError, match="pooling"):
            e.embed([1, 2], pooling="max")


# --- cache state

RESTORED_ATOL = 2e-5  # logits of order 1, float32 sums over at most 100 cells in another order


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m["kv_mode"])
def test_state_round_trip_continues_exactly(tiny, rng, mode):
    tokens = rng.integers(0, n_tokens(tiny), 100).tolist()
    after = rng.integers(0, n_tokens(tiny), 12).tolist()
    with Engine(tiny, kv_type="f32", **mode) as a:
        a.eval(tokens[:60])
        a.eval(tokens[60:])
        state = a.save_state()
        stats = a.kv_stats()
        expected = [a.eval([t]) for t in after]
        b = a.spawn()
        b.eval(tokens[:7])  # whatever the cache held is replaced
        b.load_state(state)
        assert b.kv_stats() == stats
        got = [b.eval([t]) for t in after]
        b.close()
    # A restored sparse cache holds the same cells, packed from cell 0; attention walks cells in
    # memory order, so the sums may run in another order: equal to float32 rounding, not bit for bit.
    for x, y in zip(expected, got):
        if mode["kv_mode"] == "full":
            assert np.array_equal(x, y)
        else:
            np.testing.assert_allclose(y, x, rtol=0, atol=RESTORED_ATOL)
    # the state holds the live cells only: header + per cell its record and n_layer K and V rows
    spec = fixtures.SPEC_BY_NAME[SPEC]
    row = spec.n_head_kv * spec.dim * 4
    header, cell = 20 * 8, 5 * 8
    assert state.nbytes == header + stats["live"] * (cell + 2 * spec.n_layer * row)
    if mode["kv_mode"] != "full":
        assert stats["live"] <= mode["n_cache"] < len(tokens)


def test_state_rejected_without_change(tiny, rng, gguf_path):
    tokens = rng.integers(0, n_tokens(tiny), 30).tolist()
    with Engine(tiny, kv_mode="sepllm-stream", kv_type="f32", **SMALL) as e:
        e.eval(tokens)
        good = e.save_state()
        e.eval(tokens[:5])
        stats = e.kv_stats()
        data = bytearray(good.cache)
        bad_states = {
            "magic": bytes(8) + bytes(data[8:]),
            "truncated": bytes(data[:-3]),
            "short": bytes(data[:10]),
            "too many cells": bytes(data[:17 * 8]) + (10 ** 6).to_bytes(8, "little") + bytes(data[18 * 8:]),
            "token id": bytes(data[:20 * 8]) + (10 ** 7).to_bytes(8, "little") + bytes(data[21 * 8:]),
            "region": bytes(data[:20 * 8 + 24]) + (2).to_bytes(8, "little") + bytes(data[20 * 8 + 32:]),
        }
        for name, cache in bad_states.items():
            state = type(good)(cache, good.n_tokens, good.tokens, good.chat_text, good.kv_mode)
            with pytest.raises(InvalidArgumentError):
                e.load_state(state)
            assert e.kv_stats() == stats, name
        with pytest.raises(InvalidArgumentError):
            e.load_state(b"not a state")
    with Engine(tiny, kv_mode="sepllm-stream", kv_type="f32", n_init=4, n_sep=8, n_local=16, n_cache=64) as other:
        with pytest.raises(InvalidArgumentError, match="another model or cache configuration"):
            other._ctx.state_load(good.cache)
    with Engine(gguf_path("gqa3-sharded-padded", "f32"), kv_mode="sepllm-stream", kv_type="f32", **SMALL) as other:
        with pytest.raises(InvalidArgumentError, match="another model"):
            other._ctx.state_load(good.cache)


# --- logit options


def test_logit_bias_penalties_and_logprobs(tiny):
    with Engine(tiny, n_ctx=256, seed=0) as e:
        prompt = list(range(10, 20))
        g = e._start(prompt, 12, None, dict(temperature=0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0), 0,
                     options=dict(logit_bias={"77": 100}))
        "".join(g)
        assert g.tokens == [77] * 12
        for name in ("presence_penalty", "frequency_penalty"):  # greedy, a huge penalty: no token twice
            g = e._start(prompt, 30, None, dict(temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1.0), 0,
                         options={name: 1000.0, "logit_bias": {t: -1000 for t in e.tokenizer.eog_ids}})
            "".join(g)
            assert len(g.tokens) == 30 and len(set(g.tokens)) == 30
        n_vocab = e.n_vocab
        g = e._start(prompt, 6, None, dict(temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1.0), 0,
                     options=dict(logprobs=n_vocab))
        "".join(g)
        for token, lp, top in g.logprobs:
            assert top[0] == (token, lp)  # greedy picks the most likely token
            probs = np.exp([v for _, v in top])
            assert probs.sum() == pytest.approx(1.0, abs=1e-9) and len(top) == n_vocab
            assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
        for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {10 ** 6: 1}}, {"logit_bias": {1: float("nan")}},
                    {"presence_penalty": "a"}, {"logprobs": -1}):
            with pytest.raises(InvalidArgumentError):
                e._start(prompt, 2, None, dict(temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1.0), 0,
                         options=bad)


def test_spawned_slots_share_the_model(tiny, rng):
    tokens = rng.integers(0, n_tokens(tiny), 20).tolist()
    with Engine(tiny, n_ctx=64) as a:
        b = a.spawn()
        assert b._model is a._model and b.tokenizer is a.tokenizer
        la = a.eval_logits(tokens)
        b.eval(tokens[:5])
        assert np.array_equal(a.eval_logits(tokens), la)  # b's cache is its own
        assert np.array_equal(b.eval_logits(tokens), la)
        b.close()
        assert np.array_equal(a.eval_logits(tokens), la)  # closing a slot leaves the model open
    assert b._ctx.closed


# --- quantize and tokenize


def tensors(path) -> dict:
    r = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors}


@pytest.mark.parametrize("spec", ["mha-d64", "gqa-d128-llama31"])
@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_requantize_equals_convert(tiny_dirs, gguf_path, tmp_path, spec, outtype):
    """An f32 GGUF requantized is byte for byte what the converter writes from the checkpoint."""
    src = gguf_path(spec, "f32")
    out = requantize(src, tmp_path / "re.gguf", outtype, progress=False)
    direct = convert(tiny_dirs(spec), tmp_path / "direct.gguf", outtype=outtype, progress=False)
    assert tensors(out) == tensors(direct)
    fields = fixtures.gguf_fields(out)
    assert fields["general.file_type"] == fixtures.gguf_fields(direct)["general.file_type"]
    assert fields["tokenizer.ggml.tokens"] == fixtures.gguf_fields(src)["tokenizer.ggml.tokens"]
    with Engine(out, n_ctx=32) as e:
        assert np.isfinite(e.eval_logits([1, 2, 3])).all()


def test_requantize_refuses_quantized_sources_and_bad_arguments(gguf_path, tmp_path):
    src = gguf_path(SPEC, "q8_0")
    with pytest.raises(ConvertError, match="quantized already"):
        requantize(src, tmp_path / "x.gguf", "q4_0", progress=False)
    out = requantize(src, tmp_path / "x.gguf", "q4_0", allow_requantize=True, progress=False)
    with Engine(out, n_ctx=32) as e:
        assert np.isfinite(e.eval_logits([1, 2, 3])).all()
    with pytest.raises(ConvertError, match="unknown type"):
        requantize(src, tmp_path / "y.gguf", "q3_k", progress=False)
    with pytest.raises(ConvertError, match="overwrite"):
        requantize(src, src, "q4_0", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ConvertError, match="not a readable GGUF"):
        requantize(bad, tmp_path / "z.gguf", "q4_0", progress=False)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sepedge.cli", *args], capture_output=True, text=True, timeout=300)


def test_quantize_and_tokenize_commands(gguf_path, tmp_path):
    src = gguf_path(SPEC, "f32")
    done = cli("quantize", str(src), str(tmp_path / "q.gguf"), "q4_0", "-q")
    assert done.returncode == 0, done.stderr
    assert fixtures.gguf_fields(tmp_path / "q.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    done = cli("quantize", str(src), str(tmp_path / "q.gguf"), "q9_9")
    assert done.returncode != 0 and "q9_9" in done.stderr
    text = "Hello, world! <|im_start|>user"
    with Engine(src, n_ctx=8) as e:
        expected = e.tokenize(text, special=True)
        plain = e.tokenize(text, special=False)
    done = cli("tokenize", str(src), "-p", text, "--ids")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
    done = cli("tokenize", str(src), "-p", text, "--ids", "--no-parse-special")
    assert json.loads(done.stdout) == plain
    done = cli("tokenize", str(src), "-p", text, "--show-count")
    lines = done.stdout.splitlines()
    assert len(lines) == len(expected) + 1 and lines[-1] == f"Total number of tokens: {len(expected)}"
    assert lines[0].split(" -> ")[0].strip() == str(expected[0])


# --- JSON mode


def random_json(rng, depth=0):
    kind = rng.integers(0, 7 if depth < 3 else 4)
    if kind == 0:
        return int(rng.integers(-10 ** 6, 10 ** 6))
    if kind == 1:
        return float(rng.normal() * 10.0 ** int(rng.integers(-5, 6)))
    if kind == 2:
        return "".join(rng.choice(list('ab "\\\n\té日\u0001/'), rng.integers(0, 8)))
    if kind == 3:
        return [None, True, False][rng.integers(0, 3)]
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {f"k{i}": random_json(rng, depth + 1) for i in range(rng.integers(0, 4))}


def test_json_prefix_recognizer(rng):
    import json

    from sepedge.jsonmode import JSONPrefix
    for _ in range(300):
        doc = {f"key{i}": random_json(rng) for i in range(rng.integers(0, 4))}
        text = json.dumps(doc, indent=int(rng.integers(0, 3)) or None, ensure_ascii=bool(rng.integers(0, 2)))
        p = JSONPrefix()
        for i, ch in enumerate(text):
            assert p.feed(ch), (text, i)
            assert p.complete == (i == len(text) - 1)
        # a random edit: what the recognizer reads completely must be what json accepts
        chars = list(text)
        pos = int(rng.integers(0, len(chars)))
        op = rng.integers(0, 3)
        if op == 0:
            del chars[pos]
        elif op == 1:
            chars.insert(pos, rng.choice(list('{}[]:,"\\ 0-e.atfn')))
        else:
            chars[pos] = rng.choice(list('{}[]:,"\\ 0-e.atfn'))
        edited = "".join(chars)
        q = JSONPrefix()
        whole = all(q.feed(ch) for ch in edited) and q.complete
        try:
            ok = isinstance(json.loads(edited), dict) and not edited[0].isspace() and not edited[-1].isspace()
        except json.JSONDecodeError:
            ok = False
        if ok:
            assert whole, edited
        if whole:
            assert isinstance(json.loads(edited), dict), edited
    for bad in ("[1]", "1", '"x"', "{1:2}", "{'a':1}", '{"a" 1}', '{"a":01}', '{"a":tru}', '{"a":1,}', "{} {}"):
        p = JSONPrefix()
        assert not (all(p.feed(ch) for ch in bad) and p.complete), bad


def test_json_mode_generation(tiny):
    import json

    from sepedge.jsonmode import JSONPrefix
    with Engine(tiny, n_ctx=512) as e:
        for seed in range(4):
            g = e.stream_chat([{"role": "user", "content": "JSON"}], 120, temperature=1.0, seed=seed,
                              response_format={"type": "json_object"})
            text = "".join(g)
            assert text.lstrip().startswith("{") and JSONPrefix().accepts(text)
            if g.finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
