"""SmolLM2-135M-Instruct: GGUF (package) -> HF directory (rebuilt) -> GGUF (ours) loses nothing."""

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

import fixtures
from sepedge.convert import convert
from sepedge.tokenizer import build_tokenizer

TEXTS = ["The capital of France is 12345!", "plain ASCII text, with punctuation; and: more.",
         "ünïcödé Äpfel — “quotes” 日本語のテキスト 中文 한국어 🦙🚀👍🏽", "digits 0 12 345 6789 3.14159 1e-10 ½",
         "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n\tpass\n",
         "whitespace runs:   \t\t  \n\n\n    \r\n  end", "<|im_start|>user\nHi!<|im_end|>\n"]


@pytest.fixture(scope="module")
def ours(smollm2_dir, tmp_path_factory):
    return convert(smollm2_dir, tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf", outtype="f32", progress=False)


def test_tensors_equal_original(ours):
    a, b = gguf.GGUFReader(fixtures.smollm2_gguf()), gguf.GGUFReader(ours)
    orig = {t.name: t for t in a.tensors}
    assert sorted(orig) == sorted(t.name for t in b.tensors)
    for t in b.tensors:
        o = orig[t.name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.shape.tolist() == o.shape.tolist()
        expected = gguf.quants.dequantize(np.asarray(o.data), o.tensor_type)
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), t.name


def test_metadata_equals_original(ours):
    a, b = fixtures.smollm2_fields(), fixtures.gguf_fields(ours)
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert b[key] == a[key], key


def test_tokenizer_ids(ours, smollm2_dir):
    hf = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    f = fixtures.gguf_fields(ours)
    rebuilt = build_tokenizer(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.model"],
                              f["tokenizer.ggml.pre"], f["tokenizer.ggml.merges"])
    for text in TEXTS:
        ids = hf.encode(text).ids
        assert rebuilt.encode(text).ids == ids, repr(text)
        assert rebuilt.decode(ids, skip_special_tokens=False) == text
