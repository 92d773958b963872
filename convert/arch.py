"""Per-architecture knowledge: HF config -> hyperparameters, GGUF keys, and the tensor plan.

An architecture is a handful of facts (GGUF name, HF class names, whether Q/K rows are permuted
for adjacent-pair RoPE, whether Q/K/V carry biases); everything else is shared by the llama family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import ConvertError


@dataclass
class HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF rope_scaling / rope_parameters, None when absent or "default"
    tied: bool                 # tie_word_embeddings: no output.weight in the GGUF
    name: str


@dataclass
class TensorPlan:
    name: str                        # GGUF tensor name
    shape: tuple[int, ...]           # PyTorch order (rows, cols)
    hf_name: str | None = None       # source tensor; None for generated tensors
    permute_heads: int = 0           # apply the Q/K row permutation with this many heads
    generate: Callable[[], np.ndarray] | None = None


INT32_MAX = 2 ** 31 - 1


def _number(where: str, key: str, v, lo: float, hi: float, lo_open: bool = True) -> float:
    """A finite float config value in (lo, hi) (or [lo, hi) with lo_open=False), else ConvertError
    naming the key: the loader would reject the file, so it must not be written."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConvertError(f"{where}: {key!r} must be a number, got {v!r}")
    x = float(v)
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x < hi):
        raise ConvertError(f"{where}: {key!r} = {v!r} is out of range: must be a finite number in "
                           f"{'(' if lo_open else '['}{lo:g}, {hi:g})")
    return x


def _count(where: str, key: str, v, hi: int = INT32_MAX) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= hi:
        raise ConvertError(f"{where}: {key!r} must be a positive integer (at most {hi}), got {v!r}")
    return v


@dataclass(frozen=True)
class Arch:
    name: str                       # general.architecture
    hf_classes: tuple[str, ...]
    permute_qk: bool                # adjacent-pair (NORM) RoPE in the GGUF: permute HF's Q/K rows
    qkv_bias: bool                  # Q/K/V projections carry biases

    def hparams(self, config: dict, where: str) -> HParams:
        def need(key, hi=INT32_MAX):
            if key not in config:
                raise ConvertError(f"{where}: missing required key {key!r}")
            return _count(where, key, config[key], hi)

        # the loader's ranges (se-model.c), so that every file written also loads
        n_embd, n_head = need("hidden_size", 1 << 20), need("num_attention_heads", 4096)
        head_dim = _count(where, "head_dim", config.get("head_dim") or n_embd // n_head or 0, 1 << 16)
        n_head_kv = _count(where, "num_key_value_heads", config.get("num_key_value_heads") or n_head, n_head)
        if n_head % n_head_kv:
            raise ConvertError(f"{where}: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
        if head_dim % 2:
            raise ConvertError(f"{where}: head_dim {head_dim} must be even for RoPE")
        if config.get("hidden_act", "silu") != "silu":
            raise ConvertError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (llama uses 'silu')")
        if (not self.qkv_bias and config.get("attention_bias")) or config.get("mlp_bias"):
            raise ConvertError(f"{where}: attention_bias / mlp_bias are not supported for {self.name}")
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConvertError(f"{where}: 'rope_parameters' must be an object, got {rope!r}")
        rope = dict(rope)  # transformers >= 5 nests the RoPE settings
        theta_key = "rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta"
        rope_theta = _number(where, theta_key, rope.get("rope_theta", config.get("rope_theta", 10000.0)), 1, math.inf)
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None and not isinstance(scaling, dict):
            raise ConvertError(f"{where}: 'rope_scaling' must be an object, got {scaling!r}")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind not in ("linear", "llama3"):
                raise ConvertError(f"{where}: rope scaling type {kind!r} is not supported (supported: linear, llama3)")
            else:
                _number(where, "rope_scaling.factor", scaling.get("factor"), 0, math.inf)
                if kind == "llama3":
                    for k in ("low_freq_factor", "high_freq_factor"):
                        _number(where, f"rope_scaling.{k}", scaling.get(k, 1.0), 0, math.inf)
                    _count(where, "rope_scaling.original_max_position_embeddings",
                           scaling.get("original_max_position_embeddings", 8192))
        return HParams(
            n_vocab=need("vocab_size"), n_embd=n_embd, n_layer=need("num_hidden_layers", 4096), n_head=n_head,
            n_head_kv=n_head_kv, n_ff=need("intermediate_size", 1 << 22), head_dim=head_dim,
            n_ctx_train=_count(where, "max_position_embeddings", config.get("max_position_embeddings", 2048)),
            rms_eps=_number(where, "rms_norm_eps", config.get("rms_norm_eps", 1e-6), 0, 1),
            rope_theta=rope_theta, rope_scaling=scaling,
            tied=bool(config.get("tie_word_embeddings", False)), name=str(config.get("_name_or_path") or ""))

    def add_keys(self, w: gguf.GGUFWriter, hp: HParams) -> None:
        w.add_context_length(hp.n_ctx_train)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_vocab_size(hp.n_vocab)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        if hp.rope_scaling and hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))

    def tensor_plan(self, hp: HParams) -> list[TensorPlan]:
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        plan = [TensorPlan("token_embd.weight", (hp.n_vocab, hp.n_embd), "model.embed_tokens.weight")]
        if self.rope_freqs_needed(hp):
            plan.append(TensorPlan("rope_freqs.weight", (hp.head_dim // 2,), generate=lambda: llama3_rope_factors(hp)))
        for i in range(hp.n_layer):
            hf = f"model.layers.{i}."
            layer = [
                ("attn_norm.weight", (hp.n_embd,), "input_layernorm.weight", 0),
                ("attn_q.weight", (q_dim, hp.n_embd), "self_attn.q_proj.weight", hp.n_head),
                ("attn_k.weight", (kv_dim, hp.n_embd), "self_attn.k_proj.weight", hp.n_head_kv),
                ("attn_v.weight", (kv_dim, hp.n_embd), "self_attn.v_proj.weight", 0),
                ("attn_output.weight", (hp.n_embd, q_dim), "self_attn.o_proj.weight", 0),
                ("ffn_norm.weight", (hp.n_embd,), "post_attention_layernorm.weight", 0),
                ("ffn_gate.weight", (hp.n_ff, hp.n_embd), "mlp.gate_proj.weight", 0),
                ("ffn_up.weight", (hp.n_ff, hp.n_embd), "mlp.up_proj.weight", 0),
                ("ffn_down.weight", (hp.n_embd, hp.n_ff), "mlp.down_proj.weight", 0),
            ]
            if self.qkv_bias:
                layer += [("attn_q.bias", (q_dim,), "self_attn.q_proj.bias", hp.n_head),
                          ("attn_k.bias", (kv_dim,), "self_attn.k_proj.bias", hp.n_head_kv),
                          ("attn_v.bias", (kv_dim,), "self_attn.v_proj.bias", 0)]
            for name, shape, hf_name, heads in layer:
                plan.append(TensorPlan(f"blk.{i}.{name}", shape, hf + hf_name, heads if self.permute_qk else 0))
        plan.append(TensorPlan("output_norm.weight", (hp.n_embd,), "model.norm.weight"))
        if not hp.tied:
            plan.append(TensorPlan("output.weight", (hp.n_vocab, hp.n_embd), "lm_head.weight"))
        return plan

    def rope_freqs_needed(self, hp: HParams) -> bool:
        return bool(hp.rope_scaling) and hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) == "llama3"

    def ignored_source_tensors(self, hp: HParams) -> set[str]:
        """Source tensors that may be present but are not part of the GGUF."""
        ignored = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(hp.n_layer)}
        if hp.tied:
            ignored.add("lm_head.weight")  # some tied checkpoints store the head anyway
        return ignored


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Llama-3.1 frequency factors: RoPE frequency i is divided by factor i (GGUF.md §5)."""
    s = hp.rope_scaling
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute_rows(rows: np.ndarray, n_heads_in_chunk: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF adjacent-pair order, per head: row 2j <- j, 2j+1 <- j + D/2."""
    n_rows, n_cols = rows.shape
    d = n_rows // n_heads_in_chunk
    return rows.reshape(n_heads_in_chunk, 2, d // 2, n_cols).swapaxes(1, 2).reshape(n_rows, n_cols)


LLAMA = Arch("llama", ("LlamaForCausalLM",), permute_qk=True, qkv_bias=False)
# Qwen2 / Qwen2.5: llama plus Q/K/V biases; rotate-half (NEOX) RoPE, so rows stay in HF order
QWEN2 = Arch("qwen2", ("Qwen2ForCausalLM",), permute_qk=False, qkv_bias=True)
ARCHES = [LLAMA, QWEN2]


def find_arch(config: dict, where: str) -> Arch:
    classes = config.get("architectures") or []
    for arch in ARCHES:
        if any(c in arch.hf_classes for c in classes) or (not classes and config.get("model_type") == arch.name):
            return arch
    got = ", ".join(map(str, classes)) or f"model_type {config.get('model_type')!r}"
    supported = ", ".join(c for a in ARCHES for c in a.hf_classes)
    raise ConvertError(f"{where}: unsupported architecture {got} (supported: {supported})")
