"""`sepedge.Llama` against llama-cpp-python's documented behaviour: the examples of its README run
with `from sepedge import Llama` in place of `from llama_cpp import Llama` (and a local model path),
and the methods people use return what llama-cpp-python's do."""

import json
import textwrap

import numpy as np
import pytest

import fixtures
from sepedge import ContextFullError, InvalidArgumentError, Llama
from sepedge.jsonmode import JSONPrefix

# llama-cpp-python's README (abetlen/llama-cpp-python), "High-level API", "Pulling models from
# Hugging Face Hub", "Chat Completion", "JSON Mode", "Embeddings", "Adjusting the Context Window":
# only the import line and the model paths differ.
README_EXAMPLES = {
    "completion": '''
        from sepedge import Llama

        llm = Llama(
              model_path="./models/7B/llama-model.gguf",
              # n_gpu_layers=-1, # Uncomment to use GPU acceleration
              # seed=1337, # Uncomment to set a specific seed
              # n_ctx=2048, # Uncomment to increase the context window
        )
        output = llm(
              "Q: Name the planets in the solar system? A: ", # Prompt
              max_tokens=32, # Generate up to 32 tokens, set to None to generate up to the end of the context window
              stop=["Q:", "\\n"], # Stop generating just before the model would generate a new question
              echo=True # Echo the prompt back in the output
        ) # Generate a completion, can also call create_completion
        print(output)
    ''',
    "from_pretrained": '''
        llm = Llama.from_pretrained(
            repo_id="Qwen/Qwen2-0.5B-Instruct-GGUF",
            filename="*q8_0.gguf",
            verbose=False
        )
    ''',
    "chat": '''
        from sepedge import Llama
        llm = Llama(
              model_path="path/to/llama-2/llama-model.gguf",
              chat_format="llama-2"
        )
        llm.create_chat_completion(
              messages = [
                  {"role": "system", "content": "You are an assistant who perfectly describes images."},
                  {
                      "role": "user",
                      "content": "Describe this image in detail please."
                  }
              ]
        )
    ''',
    "json_mode": '''
        from sepedge import Llama
        llm = Llama(model_path="path/to/model.gguf", chat_format="chatml")
        llm.create_chat_completion(
            messages=[
                {
                    "role": "system",
                    "content": "You are a helpful assistant that outputs in JSON.",
                },
                {"role": "user", "content": "Who won the world series in 2020"},
            ],
            response_format={
                "type": "json_object",
            },
            temperature=0.7,
        )
    ''',
    "embeddings": '''
        import sepedge as llama_cpp

        llm = llama_cpp.Llama(model_path="path/to/model.gguf", embedding=True)

        embeddings = llm.create_embedding("Hello, world!")

        # or create multiple embeddings at once

        embeddings = llm.create_embedding(["Hello, world!", "Goodbye, world!"])
    ''',
    "n_ctx": '''
        llm = Llama(model_path="./models/7B/llama-model.gguf", n_ctx=2048)
    ''',
}
PATHS = ["./models/7B/llama-model.gguf", "path/to/llama-2/llama-model.gguf", "path/to/model.gguf"]


def run_example(name: str, model_path: str, **scope) -> dict:
    code = textwrap.dedent(README_EXAMPLES[name])
    for p in PATHS:
        code = code.replace(p, model_path)
    scope = {"Llama": Llama, **scope}
    exec(compile(code, f"<README {name}>", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def model_path():
    return str(fixtures.smollm2_gguf())


@pytest.fixture(scope="module")
def llm(model_path):
    with Llama(model_path=model_path, n_ctx=1024, seed=1, verbose=False) as m:
        yield m


def test_readme_completion(model_path, capsys):
    scope = run_example("completion", model_path)
    out = scope["output"]
    assert capsys.readouterr().out.strip() == str(out)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == model_path
    c = out["choices"][0]
    assert c["text"].startswith("Q: Name the planets in the solar system? A: ")  # echo
    assert "\n" not in c["text"] and c["finish_reason"] in ("stop", "length") and c["logprobs"] is None
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 32
    assert scope["llm"].n_ctx() == 512  # llama-cpp-python's default window


def test_readme_chat_and_n_ctx(model_path, gguf_path):
    # the example generates until the end of the reply or of the 512-token window: the tiny random
    # model does that in a moment
    scope = run_example("chat", str(gguf_path("mha-d64", "q8_0")))
    llm = scope["llm"]
    assert llm.chat_format == "llama-2"
    r = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] <= 8
    assert run_example("n_ctx", model_path)["llm"].n_ctx() == 2048


def test_readme_json_mode(gguf_path):
    # generates until the object closes or the 512-token window is full: the tiny random model is quick
    llm = run_example("json_mode", str(gguf_path("mha-d64", "q8_0")))["llm"]
    for seed in range(3):
        r = llm.create_chat_completion(messages=[{"role": "user", "content": "JSON please"}], temperature=0.7,
                                       seed=seed, max_tokens=80, response_format={"type": "json_object"})
        text = r["choices"][0]["message"]["content"]
        assert JSONPrefix().accepts(text) and text.lstrip().startswith("{")
        if r["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    with pytest.raises(InvalidArgumentError, match="schema"):
        llm.create_chat_completion(messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_object", "schema": {"type": "object"}})


def test_readme_embeddings(model_path):
    scope = run_example("embeddings", model_path)
    e = scope["embeddings"]
    assert e["object"] == "list" and [d["index"] for d in e["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 576 for d in e["data"]) and e["usage"]["prompt_tokens"] > 0
    llm = scope["llm"]
    one = llm.embed("Hello, world!")
    assert isinstance(one, list) and isinstance(one[0], float) and one == e["data"][0]["embedding"]
    unit = np.array(llm.embed("Hello, world!", normalize=True))
    assert np.linalg.norm(unit) == pytest.approx(1, abs=1e-6)
    pair, count = llm.embed(["Hello, world!", "Goodbye, world!"], return_count=True)
    assert len(pair) == 2 and count == e["usage"]["prompt_tokens"]


def test_readme_from_pretrained(model_path, monkeypatch, tmp_path):
    import huggingface_hub
    calls = []
    files = ["README.md", "qwen2-0_5b-instruct-q4_0.gguf", "qwen2-0_5b-instruct-q8_0.gguf"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: files)

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return model_path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    scope = run_example("from_pretrained", model_path)
    assert calls == [("Qwen/Qwen2-0.5B-Instruct-GGUF", "qwen2-0_5b-instruct-q8_0.gguf")]
    assert scope["llm"].model_path == model_path
    with pytest.raises(InvalidArgumentError, match="several files"):
        Llama.from_pretrained(repo_id="x/y", filename="*.gguf")
    with pytest.raises(InvalidArgumentError, match="no file"):
        Llama.from_pretrained(repo_id="x/y", filename="*q2_k.gguf")


def test_model_facts_and_tokens(llm):
    assert llm.n_ctx() == 1024 and llm.n_vocab() == 49152 and llm.n_embd() == 576
    assert llm.token_bos() == 1 and llm.token_eos() == 2
    assert llm.metadata["general.architecture"] == "llama"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in llm.metadata.items())
    assert llm.metadata["llama.context_length"] == "8192"
    ids = llm.tokenize(b"Hello world")
    assert ids == [19556, 905] and llm.detokenize(ids) == b"Hello world"
    assert llm.tokenize(b"<|im_start|>", special=True) == [1]
    assert 1 not in llm.tokenize(b"<|im_start|>", special=False)
    assert llm.token_nl() == 198


def test_completion_options(llm):
    prompt = "The capital of France is"
    out = llm(prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"].startswith(" Paris") and lp["tokens"][0] == " Paris"
    assert len(lp["top_logprobs"][0]) == 3 and max(lp["top_logprobs"][0].values()) == lp["token_logprobs"][0]
    paris = llm.tokenize(b" Paris", add_bos=False)[0]
    banned = llm(prompt, max_tokens=4, temperature=0, logit_bias={paris: -100})
    assert not banned["choices"][0]["text"].startswith(" Paris")
    plain = llm("List: apple, apple, apple,", max_tokens=8, temperature=0)["choices"][0]["text"]
    penalized = llm("List: apple, apple, apple,", max_tokens=8, temperature=0, presence_penalty=2.0,
                    frequency_penalty=2.0)["choices"][0]["text"]
    assert plain.count("apple") > penalized.count("apple")
    chunks = list(llm(prompt, max_tokens=4, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    a = llm(prompt, max_tokens=8, temperature=1.0, seed=5)["choices"][0]["text"]
    assert llm(prompt, max_tokens=8, temperature=1.0, seed=5)["choices"][0]["text"] == a


def test_chat_options(llm):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "What is 2+2?"}]}]
    r = llm.create_chat_completion(messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    assert "4" in r["choices"][0]["message"]["content"]
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == r["choices"][0]["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 for t in content)
    stream = list(llm.create_chat_completion(messages=messages, max_tokens=10, temperature=0, stream=True))
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in stream) == r["choices"][0]["message"]["content"]
    with pytest.raises(InvalidArgumentError, match="not supported"):
        llm.create_chat_completion(messages=messages, tools=[{"type": "function"}])


def test_state_save_load(model_path):
    cache = dict(n_init=4, n_sep=16, n_local=32, n_cache=96)  # small, so that a short chat overflows it
    with Llama(model_path=model_path, kv_mode="sepllm-stream", verbose=False, **cache) as llm:
        history = [{"role": "user", "content": "Tell me about the sea."}]
        for turn in range(3):
            r = llm.create_chat_completion(messages=history, max_tokens=24, temperature=0)
            history += [r["choices"][0]["message"], {"role": "user", "content": f"And then {turn}?"}]
        stats = llm.engine.kv_stats()
        state = llm.save_state()
        after = llm.create_chat_completion(messages=history, max_tokens=8, temperature=0)
        llm.reset()
        llm.load_state(state)
        assert llm.engine.kv_stats() == stats and llm.n_tokens == state.n_tokens
        again = llm.create_chat_completion(messages=history, max_tokens=8, temperature=0)
    assert again["choices"][0]["message"] == after["choices"][0]["message"]
    assert again["usage"] == after["usage"]
    # bounded by the cache, not by the conversation: at most n_cache cells of 23 KiB (SmolLM2, f16)
    assert stats["tokens_seen"] > stats["capacity"] == 96
    assert state.llama_state_size <= 160 + 96 * (40 + 30 * 2 * 192 * 2)


def test_low_level_generate_and_errors(model_path, llm):
    tokens = llm.tokenize(b"The capital of France is")
    out = []
    for t in llm.generate(tokens, temp=0):
        out.append(t)
        if len(out) == 3:
            break
    assert llm.detokenize(out).startswith(b" Paris")
    llm.reset()
    llm.eval(tokens)
    assert llm.detokenize([llm.sample(temp=0)]) == b" Paris"
    with pytest.raises(ValueError, match="not supported"):
        Llama(model_path=model_path, n_gpu_layers=5, verbose=False)
    from sepedge.llama import _cuda_devices
    if _cuda_devices() == 0:  # as llama-cpp-python's CPU builds: all layers "on the GPU" runs on the CPU
        with pytest.warns(UserWarning, match="no CUDA GPU"), Llama(model_path=model_path, n_gpu_layers=-1,
                                                                  verbose=False) as gpu:
            assert gpu.engine.device == "cpu"
    with pytest.raises(ValueError, match="chat_format"):
        Llama(model_path=model_path, chat_format="no-such-format", verbose=False)
    with Llama(model_path=model_path, verbose=False) as plain, pytest.raises(ValueError, match="embedding=True"):
        plain.embed("x")
    with Llama(model_path=model_path, n_ctx=16, verbose=False) as small:
        with pytest.raises(ValueError, match="context window") as e:
            small("word " * 40)
        assert isinstance(e.value, ContextFullError)  # also a sepedge error
