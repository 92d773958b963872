"""Torch reference model for the llama family: the definition of correct logits.

Loads an HF checkpoint directory (rotate-half RoPE on HF-ordered Q/K rows) or a GGUF file
(dequantized with `gguf`; adjacent-pair RoPE on the permuted Q/K rows of `llama` files). Short on
purpose: every runtime path is tested against this file. SepLLM's cache is not re-implemented
here: `forward_plan` follows the plans of the native cache policy (sepedge.cache_plan); the
independent Python oracle of the policy that tests check the C core with is tests/policy_oracle.py.

    model = Transformer.from_pretrained("model.gguf", dtype=torch.float64)
    logits = model(torch.tensor(tokens))        # (len(tokens), n_vocab)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_pairs: str = "half"            # "half": (i, i + d/2) as HF rotate_half; "adjacent": (2i, 2i+1) as ggml NORM
    rope_linear_factor: float = 1.0     # linear RoPE scaling: positions are divided by this
    qkv_bias: bool = False


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, weights: dict[str, Tensor], rope_freq_factors: Tensor | None = None):
        super().__init__()
        self.args = args
        self.w = weights  # GGUF tensor names -> tensors in PyTorch layout (out_features, in_features)
        self.w.setdefault("output.weight", weights["token_embd.weight"])  # tied embeddings
        i = torch.arange(0, args.head_dim, 2, dtype=torch.float64)
        inv_freq = 1.0 / args.rope_theta ** (i / args.head_dim)
        if rope_freq_factors is not None:
            inv_freq = inv_freq / rope_freq_factors.to(torch.float64)  # Llama 3.1 (rope_freqs.weight)
        self.inv_freq = inv_freq

    @property
    def dtype(self) -> torch.dtype:
        return self.w["token_embd.weight"].dtype

    # --- building blocks -----------------------------------------------------------------------

    def rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.args.rms_eps) * weight

    def rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (T, n_heads, head_dim), positions: (T,) -> x rotated by position * inv_freq."""
        angles = positions.to(torch.float64)[:, None] / self.args.rope_linear_factor * self.inv_freq[None, :]
        cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
        if self.args.rope_pairs == "adjacent":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q: (T, n_head, d), k/v: (S, n_head_kv, d), mask: (T, S) bool, True = may attend; k may
        also be (T, S, n_head_kv, d): keys as each query reads them.

        The only place where queries meet keys: SepLLM policies are masks over this step.
        """
        rep = self.args.n_head // self.args.n_head_kv
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=1)  # GQA: head h reads kv head h // rep
        scores = torch.einsum("thd,shd->hts" if k.dim() == 3 else "thd,tshd->hts", q, k) / math.sqrt(self.args.head_dim)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        return torch.einsum("hts,shd->thd", F.softmax(scores, dim=-1), v)

    def project(self, x: Tensor, name: str) -> Tensor:
        out = x @ self.w[f"{name}.weight"].T
        if (bias := self.w.get(f"{name}.bias")) is not None:
            out = out + bias
        return out

    # --- the model -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """tokens: (T,) -> logits (T, n_vocab). Default: positions 0..T-1 and a causal mask."""
        a, T = self.args, tokens.shape[0]
        positions = torch.arange(T) if positions is None else positions
        mask = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
        x = self.w["token_embd.weight"][tokens]
        for i in range(a.n_layer):
            blk = f"blk.{i}"
            # attention
            h = self.rms_norm(x, self.w[f"{blk}.attn_norm.weight"])
            q = self.project(h, f"{blk}.attn_q").view(T, a.n_head, a.head_dim)
            k = self.project(h, f"{blk}.attn_k").view(T, a.n_head_kv, a.head_dim)
            v = self.project(h, f"{blk}.attn_v").view(T, a.n_head_kv, a.head_dim)
            q, k = self.rope(q, positions), self.rope(k, positions)
            att = self.attention(q, k, v, mask).reshape(T, a.n_head * a.head_dim)
            x = x + self.project(att, f"{blk}.attn_output")
            # SwiGLU feed-forward
            h = self.rms_norm(x, self.w[f"{blk}.ffn_norm.weight"])
            ff = F.silu(self.project(h, f"{blk}.ffn_gate")) * self.project(h, f"{blk}.ffn_up")
            x = x + self.project(ff, f"{blk}.ffn_down")
        x = self.rms_norm(x, self.w["output_norm.weight"])
        return self.project(x, "output")

    # --- SepLLM: the native cache policy's plans ----------------------------------------------

    @torch.no_grad()
    def forward_plan(self, tokens: list[int], policy, cache: CellCache) -> Tensor:
        """Tokens after those `policy` has seen, one forward pass per plan of the native cache policy
        (sepedge.cache_plan.CachePolicy, the C core's one implementation): new keys are rotated at
        their original positions and written to their cells, every live key is read with its cell's
        extra rotation (delta; for new token t of a pass that slides the window, delta + t * step),
        and each query attends the cells its row of the plan's mask allows.
        Returns the logits of every token, (len(tokens), n_vocab)."""
        a, out, s = self.args, [], 0
        while s < len(tokens):
            plan = policy.step(tokens[s:])
            if plan.mask is None:
                raise ValueError("forward_plan needs a policy that returns masks (CachePolicy(mask=True))")
            n, s = plan.n_tokens, s + plan.n_tokens
            positions = torch.from_numpy(plan.positions.astype(np.int64))
            cells = torch.from_numpy(plan.cells.astype(np.int64))
            live = torch.from_numpy(plan.live_cells.astype(np.int64))
            deltas = torch.from_numpy(plan.live_deltas.astype(np.int64))
            if plan.live_steps.any():  # per query: (n, n_live)
                deltas = deltas[None, :] + torch.arange(n)[:, None] * torch.from_numpy(plan.live_steps.astype(np.int64))
            mask = torch.from_numpy(plan.mask)
            x = self.w["token_embd.weight"][torch.tensor(tokens[s - n:s])]
            for i in range(a.n_layer):
                blk = f"blk.{i}"
                h = self.rms_norm(x, self.w[f"{blk}.attn_norm.weight"])
                q = self.rope(self.project(h, f"{blk}.attn_q").view(n, a.n_head, a.head_dim), positions)
                k = self.rope(self.project(h, f"{blk}.attn_k").view(n, a.n_head_kv, a.head_dim), positions)
                v = self.project(h, f"{blk}.attn_v").view(n, a.n_head_kv, a.head_dim)
                cache.k[i][cells], cache.v[i][cells] = k, v
                # rotated once more on read, never written back
                keys = (self.rope(cache.k[i][live], deltas) if deltas.dim() == 1 else
                        torch.stack([self.rope(cache.k[i][live], d) for d in deltas]))
                att = self.attention(q, keys, cache.v[i][live], mask).reshape(n, a.n_head * a.head_dim)
                x = x + self.project(att, f"{blk}.attn_output")
                h = self.rms_norm(x, self.w[f"{blk}.ffn_norm.weight"])
                x = x + self.project(F.silu(self.project(h, f"{blk}.ffn_gate")) * self.project(h, f"{blk}.ffn_up"),
                                     f"{blk}.ffn_down")
            out.append(self.project(self.rms_norm(x, self.w["output_norm.weight"]), "output"))
        return torch.cat(out)

    @torch.no_grad()
    def greedy(self, tokens: list[int], n: int) -> list[int]:
        """n greedily generated tokens after `tokens` (recomputes the whole sequence each step)."""
        seq = list(tokens)
        for _ in range(n):
            seq.append(int(self(torch.tensor(seq))[-1].argmax()))
        return seq[len(tokens):]

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
        path = Path(path)
        return cls.from_gguf(path, dtype) if path.is_file() else cls.from_hf(path, dtype)

    @classmethod
    def from_hf(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        c = json.loads((model_dir / "config.json").read_text())
        rope = dict(c.get("rope_parameters") or {})
        scaling = c.get("rope_scaling") or rope
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        args = ModelArgs(
            n_vocab=c["vocab_size"], n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"],
            n_head=c["num_attention_heads"], n_head_kv=c.get("num_key_value_heads") or c["num_attention_heads"],
            n_ff=c["intermediate_size"], head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            rms_eps=c.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            rope_pairs="half", rope_linear_factor=float(scaling["factor"]) if kind == "linear" else 1.0,
            qkv_bias=c.get("model_type") == "qwen2")
        hf: dict[str, Tensor] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            hf.update(load_file(f))
        w = {_GGUF_NAME.get(n) or _layer_name(n): t.to(dtype) for n, t in hf.items() if "rotary_emb" not in n}
        if c.get("tie_word_embeddings"):
            w.pop("output.weight", None)
        # computed here independently of the converter; float32 as in transformers and in GGUF's rope_freqs
        factors = torch.from_numpy(_llama3_factors(args, scaling).astype(np.float32)) if kind == "llama3" else None
        return cls(args, w, factors)

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
        import gguf

        r = gguf.GGUFReader(path)
        arch = r.fields["general.architecture"].contents()

        def kv(key, default=None):
            f = r.fields.get(f"{arch}.{key}")
            return default if f is None else f.contents()

        n_head = kv("attention.head_count")
        n_embd = kv("embedding_length")
        scaling = kv("rope.scaling.type")
        args = ModelArgs(
            n_vocab=len(r.fields["tokenizer.ggml.tokens"].contents()), n_embd=n_embd, n_layer=kv("block_count"),
            n_head=n_head, n_head_kv=kv("attention.head_count_kv", n_head), n_ff=kv("feed_forward_length"),
            head_dim=kv("attention.key_length", n_embd // n_head), rms_eps=kv("attention.layer_norm_rms_epsilon"),
            rope_theta=kv("rope.freq_base", 10000.0), rope_pairs="adjacent" if arch == "llama" else "half",
            rope_linear_factor=kv("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
            qkv_bias=arch == "qwen2")
        w = {}
        for t in r.tensors:
            x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            w[t.name] = torch.from_numpy(np.array(x.reshape(tuple(reversed(t.shape.tolist()))))).to(dtype)
        return cls(args, w, w.pop("rope_freqs.weight", None))


class CellCache:
    """Keys and values of every cache cell for `Transformer.forward_plan`, as the C backends keep
    them: a key is stored rotated with its token's original position, and any further rotation the
    policy asks for (a delta, SEPLLM.md §6.4) is applied when it is read."""

    def __init__(self, args: ModelArgs, n_cells: int, dtype: torch.dtype = torch.float32):
        shape = (n_cells, args.n_head_kv, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(args.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(args.n_layer)]


_GGUF_NAME = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _layer_name(hf_name: str) -> str:
    # model.layers.{i}.{module}.{weight|bias} -> blk.{i}.{gguf module}.{weight|bias}
    _, _, i, rest = hf_name.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{i}.{_LAYER[module]}.{kind}"


def _llama3_factors(args: ModelArgs, s: dict) -> np.ndarray:
    factor, low, high = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / args.rope_theta ** (np.arange(0, args.head_dim, 2) / args.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
