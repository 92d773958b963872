"""Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors, QKV biases, untied head,
NEOX RoPE), as shipped on PyPI: native logits against the torch reference and against llama.cpp."""

import subprocess

import numpy as np
import pytest
import torch

import fixtures
from sepedge import Engine
from sepedge.reference import Transformer

# 8-bit activations on a 24-layer model (measured: NMSE 1.2e-3); llama.cpp is compared the same way
MAX_NMSE, MAX_REL_DIFF = 4e-3, 8e-2

CODE = "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n    if len(items) <= 1:\n        return items\n"


@pytest.fixture(scope="module")
def qwen():
    return fixtures.qwen_gguf()


def nmse(a, b):
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def test_logits_match_reference(qwen):
    with Engine(qwen, n_ctx=256, kv_type="f32") as llm:
        tokens = llm.tokenize(CODE)
        native = llm.eval_logits(tokens)
        assert llm.info["arch"] == "qwen2" and llm.n_vocab == 151936
    ref = Transformer.from_gguf(qwen, dtype=torch.float32)(torch.tensor(tokens)).numpy()
    assert nmse(native, ref) <= MAX_NMSE
    assert np.abs(native - ref).max() / np.abs(ref).max() <= MAX_REL_DIFF
    assert (native.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_sensible_answers(qwen):
    with Engine(qwen, n_ctx=512) as llm:
        reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                           max_tokens=20, temperature=0)
        assert "Paris" in reply["choices"][0]["message"]["content"]
        code = llm.generate("def fibonacci(n):", max_tokens=40, temperature=0)
        assert "return" in code and "n" in code


def test_logits_match_llama_cpp(qwen, llama_cpp_bin, tmp_path):
    from test_llama_cpp import compile_llama_logits
    exe = compile_llama_logits(llama_cpp_bin, tmp_path)
    with Engine(qwen, n_ctx=256, kv_type="f32") as llm:
        tokens = llm.tokenize(CODE)
        native = llm.eval_logits(tokens)
    out = tmp_path / "l.f32"
    subprocess.run([str(exe), str(qwen), str(out)], input=" ".join(map(str, tokens)), text=True, check=True)
    theirs = np.fromfile(out, dtype=np.float32).reshape(len(tokens), -1)
    assert nmse(native, theirs) <= MAX_NMSE
