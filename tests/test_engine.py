"""The Engine API: tokens, sampling, streaming, stop strings, OpenAI-shaped results, the context
window, lifetimes. Runs on the SmolLM2 package GGUF (made by llama.cpp's converter, so it also
checks that such files work: separators are derived at load)."""

import gc

import numpy as np
import pytest

import fixtures
from sepedge import ContextFullError, Engine, InvalidArgumentError, SepedgeError
from sepedge import vocab as V
from sepedge._native import Sampler

TEXTS = ["Hello, world!", "ünïcödé: Äpfel, 日本語のテキスト, emoji 🦙🚀👍🏽", "  spaces\tand\nnewlines\n\n",
         "code: def f(x):\n    return x ** 2", "digits 1234567890 and 3.14159", ""]


@pytest.fixture(scope="module")
def llm():
    with Engine(fixtures.smollm2_gguf(), n_ctx=256, seed=0) as e:
        yield e


def test_separators_derived_for_llama_cpp_files(llm):
    assert "sepllm.separator_token_ids" not in (llm.metadata("general.architecture") and [])
    assert llm.metadata("sepllm.separator_token_ids") is None  # the package file has none...
    t = llm.tokenizer
    assert llm.info["separators"] == V.derive_separator_ids(t.tokens, t.token_types, t.model, t.bos_id)  # ...so derived
    assert {30, 28, 198} <= set(llm.info["separators"])  # ".", ",", "\n"


def test_tokenize_round_trip(llm):
    for text in TEXTS:
        ids = llm.tokenize(text)
        assert llm.detokenize(ids) == text.encode()
        assert llm.tokenize(text.encode()) == ids
    assert llm.tokenize("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_special_tokens(llm):
    text = "<|im_start|>user\nHi<|im_end|>"
    assert llm.tokenize(text, special=True)[0] == 1 and llm.tokenize(text, special=True)[-1] == 2
    plain = llm.tokenize(text, special=False)
    assert 1 not in plain and 2 not in plain
    assert llm.detokenize(llm.tokenize(text, special=True)) == b"user\nHi"
    assert llm.detokenize(llm.tokenize(text, special=True), special=True) == text.encode()


def test_tokenize_rejects_bad_input(llm):
    with pytest.raises(InvalidArgumentError):
        llm.tokenize(123)
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        llm.detokenize([10 ** 6])
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        llm.eval_logits([1, -5])


class ScriptedSampler:
    """Stands in for the native sampler: returns a fixed token sequence."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def accept(self, token):
        pass

    def sample(self, logits):
        return self.tokens.pop(0)


def scripted(llm, monkeypatch, tokens):
    monkeypatch.setattr(llm, "_sampler", lambda *a, **k: ScriptedSampler(tokens))


def test_streaming_never_splits_utf8(llm, monkeypatch):
    text = "Olá 🦙 naïve 日本 — ok"
    # byte tokens spell multi-byte characters across several tokens
    tokens = [llm.tokenizer.token_bytes.index(bytes([b])) for b in text.encode()]
    scripted(llm, monkeypatch, tokens + [2])
    chunks = list(llm.generate("x", max_tokens=100, stream=True))
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks) and len(chunks) > 5


def test_stop_strings(llm, monkeypatch):
    ids = llm.tokenize("one two three. four five")
    for stop, expected in (("three", "one two "), ([".", "four"], "one two three"), ("ee. f", "one two thr"),
                           (" fo", "one two three."), ("absent", "one two three. four five")):
        scripted(llm, monkeypatch, ids + [2])
        g = llm.generate("x", max_tokens=50, stop=stop, stream=True)
        chunks = list(g)
        assert "".join(chunks) == expected == g.text, (stop, chunks)
        assert g.finish_reason == "stop"


def test_finish_reasons(llm, monkeypatch):
    scripted(llm, monkeypatch, llm.tokenize(" a b c d e f g"))
    g = llm.generate("x", max_tokens=3, stream=True)
    assert "".join(g) == " a b c" and g.finish_reason == "length" and len(g.tokens) == 3
    scripted(llm, monkeypatch, llm.tokenize(" a b") + [2])  # <|im_end|> ends the turn
    g = llm.generate("x", max_tokens=30, stream=True)
    assert "".join(g) == " a b" and g.finish_reason == "stop"


def test_sampling_parameters_are_validated(llm):
    for bad, match in ((dict(temperature=-1), "temperature"), (dict(temperature="hot"), "temperature"),
                       (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=2), "min_p"),
                       (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(repeat_penalty=0), "repeat_penalty"),
                       (dict(temperature=float("nan")), "temperature"), (dict(max_tokens="9"), "max_tokens"),
                       (dict(stop=[""]), "stop"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            llm.generate("Hi", **bad)


def sampler(**kw):
    p = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=7) | kw
    return Sampler(5, **p)


def draws(s, logits, n=20000):
    return np.bincount([s.sample(logits) for _ in range(n)], minlength=len(logits)) / n


def test_sampler_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(draws(sampler(), logits) - p).max() < 0.015
    p2 = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    assert np.abs(draws(sampler(temperature=0.5), logits) - p2).max() < 0.015


def test_sampler_filters():
    logits = np.array([2.0, 1.0, 0.5, -1.0, -3.0], np.float32)
    assert set(np.nonzero(draws(sampler(top_k=2), logits, 3000))[0]) == {0, 1}
    p = np.exp(logits) / np.exp(logits).sum()  # 0.61, 0.22, 0.14, 0.03, 0.004
    assert set(np.nonzero(draws(sampler(top_p=0.8), logits, 3000))[0]) == {0, 1}
    assert set(np.nonzero(draws(sampler(min_p=0.2), logits, 3000))[0]) == {0, 1, 2} and p[2] / p[0] > 0.2
    assert draws(sampler(temperature=0), logits, 10)[0] == 1.0
    s = sampler(temperature=0, repeat_penalty=10.0)
    s.accept(0)  # logit 2 -> 0.2: token 1 (logit 1) wins
    assert s.sample(logits) == 1


def test_seeds(llm):
    a = llm.generate("Once upon a time", max_tokens=12, seed=42)
    assert llm.generate("Once upon a time", max_tokens=12, seed=42) == a
    assert len({llm.generate("Once upon a time", max_tokens=12, seed=s) for s in range(4)}) > 1


def test_completion_shapes(llm):
    r = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == llm.model_path
    (c,) = r["choices"]
    assert c["text"].startswith(" Paris") and c["finish_reason"] == "length" and c["index"] == 0
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert llm("The capital of France is", max_tokens=4, temperature=0, echo=True)["choices"][0]["text"] \
        == "The capital of France is" + c["text"]
    chunks = list(llm.create_completion("The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])


def test_chat_completion_shapes(llm):
    msgs = [{"role": "user", "content": "Name the capital city of France."}]
    r = llm.create_chat_completion(msgs, max_tokens=24, temperature=0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (c,) = r["choices"]
    assert c["message"]["role"] == "assistant" and "Paris" in c["message"]["content"]
    assert c["finish_reason"] in ("stop", "length")
    chunks = list(llm.create_chat_completion(msgs, max_tokens=24, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == c["message"]["content"]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == c["finish_reason"]
    with pytest.raises(InvalidArgumentError, match="role"):
        llm.create_chat_completion([{"role": "wizard", "content": "hi"}])


def test_chat_template(llm):
    ids = llm.format_chat([{"role": "user", "content": "Hi"}])
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert llm.detokenize(ids, special=True).decode() == expected


def test_context_window(monkeypatch):
    with Engine(fixtures.smollm2_gguf(), n_ctx=32) as small:
        with pytest.raises(ContextFullError, match="exceed the context window of 32"):
            small.generate("word " * 40)
        with pytest.raises(ContextFullError):
            small.eval_logits(list(range(33)))
        g = small.generate("Tell me a long story about a dragon.", max_tokens=None, temperature=0.8, stream=True)
        "".join(g)
        assert g.finish_reason in ("length", "stop")
        if g.finish_reason == "length":
            assert len(g.prompt_tokens) + len(g.tokens) == 32 + 1  # the last token sampled was not fed


def test_prefix_reuse_gives_the_same_logits(llm):
    a = llm.tokenize("The quick brown fox jumps over the lazy dog. The capital of France")
    b = llm.tokenize("The quick brown fox jumps over the lazy cat and the capital")
    fresh = llm.eval_logits(b)[-1]
    llm.eval_logits(a)
    reused = llm._feed(b)  # evaluates only the tokens after the common prefix
    np.testing.assert_allclose(reused, fresh, rtol=0, atol=1e-4 * np.abs(fresh).max())
    assert llm._ctx.info()["n_seen"] == len(b)


def test_close_and_reuse_errors():
    e = Engine(fixtures.smollm2_gguf(), n_ctx=64)
    e.close()
    e.close()  # idempotent
    with pytest.raises(SepedgeError, match="closed"):
        e.eval_logits([1, 2])
    with Engine(fixtures.smollm2_gguf(), n_ctx=64) as e2:
        e2.generate("hi", max_tokens=2)
    del e2
    gc.collect()  # finalizers run without crashing, contexts before models
    Engine(fixtures.smollm2_gguf(), n_ctx=64)  # dropped without close(): freed on collection
    gc.collect()


def test_bad_model_paths(tmp_path):
    from sepedge import ModelLoadError
    with pytest.raises(ModelLoadError, match="cannot open"):
        Engine(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        Engine(tmp_path)
    (tmp_path / "x.gguf").write_text("hello, this is not a model")
    with pytest.raises(ModelLoadError, match="bad magic"):
        Engine(tmp_path / "x.gguf")
    with pytest.raises(InvalidArgumentError, match="device"):
        Engine(fixtures.smollm2_gguf(), device="tpu")
    with pytest.raises(InvalidArgumentError, match="kv_type"):
        Engine(fixtures.smollm2_gguf(), kv_type="q3")
    with pytest.raises(InvalidArgumentError, match="n_ctx"):
        Engine(fixtures.smollm2_gguf(), n_ctx=-1)
