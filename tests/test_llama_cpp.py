"""Our GGUF files in llama.cpp itself: it loads them, tokenizes like the original tokenizer, and
computes the same logits as the torch reference on the same weights."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import fixtures
import llama_cpp
from fixtures import SPECS
from sepedge.convert import convert
from sepedge.reference import Transformer

# llama.cpp vs the torch reference on the same dequantized weights, max |diff| / max |logit|.
# f32: only summation order differs. f16/bf16 weights: llama.cpp rounds activations to the weight
# type for the dot products. Quantized weights: activations are quantized to 8 bits.
MAX_REL_DIFF = {"f32": 1e-4, "f16": 5e-3, "bf16": 2e-2, "q8_0": 2e-2, "q4_0": 3e-2, "q4_1": 3e-2, "q4_k_m": 3e-2}

TEXTS = ["The capital of France is 12345!", "Hello, world!  How's it going?\n\n\tIndented\r\n",
         "ünïcödé: Äpfel, 日本語, emoji 🦙🚀 and ½", "def f(x):\n    return x ** 2  # square\n",
         "    leading spaces and trailing   ", "numbers 3.14159 1,000,000 and 2024-11-22"]


def compile_llama_logits(llama_cpp_bin, out_dir):
    """tests/peer/llama_logits.c built against the llama.cpp build."""
    src = llama_cpp.source_dir()
    exe = out_dir / "llama-logits"
    subprocess.run(["gcc", "-O2", "-std=c11", str(fixtures.ROOT / "tests/peer/llama_logits.c"),
                    f"-I{src / 'include'}", f"-I{src / 'ggml/include'}", f"-L{llama_cpp_bin}",
                    "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{llama_cpp_bin}", "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="session")
def llama_logits(llama_cpp_bin, tmp_path_factory):
    """llama.cpp's logits for a token list, as a function."""
    exe = compile_llama_logits(llama_cpp_bin, tmp_path_factory.mktemp("peer"))

    def run(model, tokens: list[int]) -> np.ndarray:
        out = exe.with_suffix(".f32")
        done = subprocess.run([str(exe), str(model), str(out)], input=" ".join(map(str, tokens)),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return np.fromfile(out, dtype=np.float32).reshape(len(tokens), -1)

    return run


def llama_tokenize(bin_dir, model, text: str) -> list[int]:
    done = subprocess.run([str(bin_dir / "llama-tokenize"), "-m", str(model), "-p", text, "--ids", "--log-disable",
                           "--no-bos"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(x) for x in done.stdout.strip().strip("[]").split(",") if x.strip()]


@pytest.mark.parametrize("outtype", list(MAX_REL_DIFF))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_logits_match_reference(llama_logits, tiny_dirs, tmp_path, spec, outtype):
    path = convert(tiny_dirs(spec.name), tmp_path / "m.gguf", outtype=outtype, progress=False)
    tokens = np.random.default_rng().integers(0, spec.n_tokens or spec.n_vocab, 40).tolist()
    ours = Transformer.from_gguf(path, dtype=torch.float64)(torch.tensor(tokens)).numpy()
    theirs = llama_logits(path, tokens)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= MAX_REL_DIFF[outtype], tokens


def test_smollm2_logits_and_generation(llama_logits, llama_cpp_bin, smollm2_dir, tmp_path):
    path = convert(smollm2_dir, tmp_path / "smol-f32.gguf", outtype="f32", progress=False)
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = tok.encode("The capital of France is").ids
    ref = Transformer.from_gguf(path, dtype=torch.float32)
    greedy = ref.greedy(ids, 12)
    logits = llama_logits(path, ids + greedy)
    assert logits[len(ids) - 1:-1].argmax(axis=1).tolist() == greedy  # llama.cpp's greedy choices are ours
    done = subprocess.run([str(llama_cpp_bin / "llama-simple"), "-m", str(path), "-n", "12", "The capital of France is"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("The capital of France is" + tok.decode(greedy)).strip()
    assert " Paris" in done.stdout


# (q4_0 is left out: the weights were Q4_1 before the rebuild, and re-quantizing them to Q4_0 loses
# enough that this greedy continuation changes, in llama.cpp and in the reference alike)
@pytest.mark.parametrize("outtype", ["q8_0", "q4_1"])
def test_smollm2_quantized_generates_paris(llama_cpp_bin, smollm2_dir, tmp_path, outtype):
    path = convert(smollm2_dir, tmp_path / f"smol-{outtype}.gguf", outtype=outtype, progress=False)
    done = subprocess.run([str(llama_cpp_bin / "llama-simple"), "-m", str(path), "-n", "4", "The capital of France is"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_smollm2_tokenization(llama_cpp_bin, smollm2_dir, tmp_path):
    path = convert(smollm2_dir, tmp_path / "smol.gguf", outtype="q8_0", progress=False)
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in TEXTS:
        assert llama_tokenize(llama_cpp_bin, path, text) == tok.encode(text).ids, repr(text)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_real_vocabularies_tokenize_like_llama_cpp(llama_cpp_bin, tmp_path, name):
    """A tiny model with a real Llama-3 / Qwen2 tokenizer.json, converted: llama.cpp must reproduce
    its own tokenization test vectors with our GGUF."""
    vocab = llama_cpp.vocab_file(name)
    f = fixtures.vocab_fields(name)
    spec = fixtures.TinySpec(name, n_embd=64, n_layer=1, n_head=2, n_head_kv=1, n_ff=96,
                             n_vocab=len(f["tokenizer.ggml.tokens"]))
    d = tmp_path / "hf"
    d.mkdir()
    fixtures.save_weights(fixtures.random_weights(spec), d, "F16", 1)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": spec.n_vocab, "rms_norm_eps": 1e-5}))
    fixtures.write_tokenizer(d, f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"],
                             f["tokenizer.ggml.merges"], name, None, None, None, 8192)
    path = convert(d, tmp_path / "m.gguf", outtype="f16", progress=False)
    g = fixtures.gguf_fields(path)
    assert g["tokenizer.ggml.pre"] == name
    assert g["tokenizer.ggml.tokens"] == f["tokenizer.ggml.tokens"]
    assert g["tokenizer.ggml.merges"] == f["tokenizer.ggml.merges"]
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = vocab.with_suffix(".gguf.out").read_text().split("\n")
    for text, ids in list(zip(texts, expected))[:12]:  # llama-tokenize is a process per text: a sample
        if text.strip():
            assert llama_tokenize(llama_cpp_bin, path, text) == [int(x) for x in ids.split()], repr(text)


def test_sentencepiece_checkpoint(llama_cpp_bin, tmp_path):
    """tokenizer.model (Llama-2 style SentencePiece) -> `llama` vocabulary that llama.cpp reads."""
    vocab = llama_cpp.vocab_file("llama-spm")
    f = fixtures.vocab_fields("llama-spm")
    d = fixtures.make_spm_checkpoint(vocab, tmp_path / "hf")
    path = convert(d, tmp_path / "spm.gguf", outtype="q8_0", progress=False)
    g = fixtures.gguf_fields(path)
    assert (g["tokenizer.ggml.model"], g["tokenizer.ggml.pre"]) == ("llama", "default")
    assert g["tokenizer.ggml.tokens"] == f["tokenizer.ggml.tokens"]
    assert g["tokenizer.ggml.token_type"] == f["tokenizer.ggml.token_type"]
    assert g["tokenizer.ggml.add_space_prefix"] is f.get("tokenizer.ggml.add_space_prefix", True)
    np.testing.assert_array_equal(np.float32(g["tokenizer.ggml.scores"]), np.float32(f["tokenizer.ggml.scores"]))
    assert (g["tokenizer.ggml.bos_token_id"], g["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert 13 in g["sepllm.separator_token_ids"]  # <0x0A>: the newline byte is a separator
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = vocab.with_suffix(".gguf.out").read_text().split("\n")
    for text, ids in list(zip(texts, expected))[:12]:
        if text.strip():
            assert llama_tokenize(llama_cpp_bin, path, text) == [int(x) for x in ids.split()], repr(text)


def llama3_vocab_checkpoint(d, dtype="BF16", n_layer=2):
    """A tiny random llama with the real Llama-3 tokenizer, as meta-llama ships it (BOS added by a
    TemplateProcessing post-processor)."""
    from tokenizers import processors

    from sepedge.tokenizer import build_tokenizer
    f = fixtures.vocab_fields("llama-bpe")
    spec = fixtures.TinySpec("l3", n_embd=64, n_layer=n_layer, n_head=4, n_head_kv=2, n_ff=96,
                             n_vocab=len(f["tokenizer.ggml.tokens"]), rope_theta=500000.0, dtype=dtype)
    d.mkdir(parents=True)
    fixtures.save_weights(fixtures.random_weights(spec), d, dtype, 2)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": n_layer, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": spec.n_vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "bos_token_id": 128000, "eos_token_id": 128001}))
    tok = build_tokenizer(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], "gpt2", "llama-bpe",
                          f["tokenizer.ggml.merges"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                        "eos_token": "<|end_of_text|>"}))
    return d


def run_peer_converter(src, out, outtype):
    done = subprocess.run([sys.executable, str(llama_cpp.source_dir() / "convert_hf_to_gguf.py"), str(src),
                           "--outtype", outtype, "--outfile", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# metadata only one side writes: llama.cpp adds size labels and derived names, we add sepllm.*
PEER_ONLY_KEYS = ("general.size_label", "general.name", "general.basename", "general.finetune")


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    return llama3_vocab_checkpoint(tmp_path_factory.mktemp("llama3") / "hf")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])  # f32 is the f16 path without rounding
def test_same_file_as_llama_cpp_converter(llama3_checkpoint, tmp_path, outtype):
    """Tensor for tensor and key for key, our GGUF equals the one llama.cpp's convert_hf_to_gguf.py
    writes for the same checkpoint (which cannot write q4_0/q4_1)."""
    ours = gguf.GGUFReader(convert(llama3_checkpoint, tmp_path / "ours.gguf", outtype=outtype, progress=False))
    theirs = gguf.GGUFReader(run_peer_converter(llama3_checkpoint, tmp_path / "theirs.gguf", outtype))
    a = {k: f.contents() for k, f in ours.fields.items() if not k.startswith(("GGUF.", "sepllm.", *PEER_ONLY_KEYS))}
    b = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith(("GGUF.", *PEER_ONLY_KEYS))}
    assert a == b
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in theirs.tensors)
    theirs_by_name = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        o = theirs_by_name[t.name]
        assert t.tensor_type == o.tensor_type and t.shape.tolist() == o.shape.tolist(), t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(o.data)), t.name
