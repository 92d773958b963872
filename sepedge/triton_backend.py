"""The forward pass on sepedge.kernels (Triton) for one context, in torch: the GGUF weights go to the
device once as their raw bytes, the KV cache is a pair of tensors (n_layer, n_cells, n_head_kv,
head_dim), and every op of the llama/qwen2 block is one kernel launch.

    fwd = TritonForward("model.gguf", n_cells=512)
    logits = fwd.decode(tokens)        # (len(tokens), n_vocab), appended to the cache

The cache here is the `full` kv_mode: token i lives in cell i, every earlier cell is live. The SepLLM
modes need the plans of the shared cache policy (which cells are live, which moved and by how much),
which this module will take from the cache-plan API once it exists; the kernels already take a live
cell list and per-cell RoPE deltas.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BackendError, InvalidArgumentError, ModelLoadError, UnsupportedError


def _imports():
    try:
        import torch

        from . import kernels
    except ImportError as e:
        raise BackendError(f"the Triton backend needs torch and triton (pip install sepedge[triton]): {e}") from None
    return torch, kernels


class TritonForward:
    def __init__(self, path: str | os.PathLike, n_cells: int = 512, device=None, kv_dtype=None):
        torch, K = _imports()
        import gguf

        self.torch, self.K = torch, K
        if device is None:
            if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
                raise BackendError("the Triton backend needs a GPU (or TRITON_INTERPRET=1 for the interpreter)")
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            r = gguf.GGUFReader(Path(path))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a readable GGUF file: {e}") from None
        arch = r.fields["general.architecture"].contents()
        if arch not in ("llama", "qwen2"):
            raise UnsupportedError(f"{path}: architecture {arch!r} is not supported by the Triton backend")

        def kv(key, default=None):
            f = r.fields.get(f"{arch}.{key}")
            return default if f is None else f.contents()

        self.n_layer, self.n_embd = kv("block_count"), kv("embedding_length")
        self.n_head = kv("attention.head_count")
        self.n_head_kv = kv("attention.head_count_kv", self.n_head)
        self.head_dim = kv("attention.key_length", self.n_embd // self.n_head)
        self.eps = kv("attention.layer_norm_rms_epsilon")
        linear = kv("rope.scaling.factor", 1.0) if kv("rope.scaling.type") == "linear" else 1.0
        self.rope_mode = K.NORM if arch == "llama" else K.NEOX  # GGUF.md §6: llama files are permuted for NORM

        self.w: dict[str, tuple] = {}  # name -> (uint8 bytes (rows, row_bytes) on the device, type, n_cols)
        factors = None
        for t in r.tensors:
            qtype = int(t.tensor_type)
            if qtype not in K.BLOCKS:
                raise UnsupportedError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the Triton "
                                       "backend does not read")
            n_cols = int(t.shape[0])
            data = np.ascontiguousarray(np.asarray(t.data)).view(np.uint8).reshape(-1, K.row_bytes(qtype, n_cols))
            if t.name == "rope_freqs.weight":
                factors = torch.from_numpy(data.view(np.float32).reshape(-1).copy())
                continue
            self.w[t.name] = (torch.from_numpy(data.copy()).to(self.device), qtype, n_cols)
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied embeddings
        self.n_vocab = self.w["output.weight"][0].shape[0]
        self.freqs = K.inv_freq(self.head_dim, kv("rope.freq_base", 10000.0), factors, linear).to(self.device)

        kv_dtype = kv_dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        shape = (self.n_layer, n_cells, self.n_head_kv, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype, device=self.device)
        self.n_cells, self.n_past = n_cells, 0

    def _vector(self, name: str):
        """A float32 vector (norm weight, bias) as float32, or None when the file has none."""
        if name not in self.w:
            return None
        w, qtype, n = self.w[name]
        return self.K.dequantize(w.reshape(1, -1), qtype, n)[0] if qtype != 0 else w.view(self.torch.float32)[0]

    def _project(self, x, name: str):
        w, qtype, _ = self.w[f"{name}.weight"]
        bias = self._vector(f"{name}.bias")
        # decode reads each weight byte once per token; prefill tiles on tensor cores
        return self.K.matvec(w, qtype, x, bias) if x.shape[0] <= 2 else self.K.matmul(w, qtype, x, bias)

    def clear(self) -> None:
        self.n_past = 0

    def decode(self, tokens) -> "torch.Tensor":
        """Feed tokens after those in the cache; returns their logits (len(tokens), n_vocab) float32."""
        torch, K = self.torch, self.K
        T = len(tokens)
        if T == 0:
            raise InvalidArgumentError("no tokens to evaluate")
        if self.n_past + T > self.n_cells:
            raise InvalidArgumentError(f"{self.n_past + T} tokens exceed the cache's {self.n_cells} cells")
        ids = torch.tensor(list(tokens), dtype=torch.int32, device=self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= self.w["token_embd.weight"][0].shape[0]:
            raise InvalidArgumentError("token id out of range")
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim
        positions = torch.arange(self.n_past, self.n_past + T, dtype=torch.int32, device=self.device)
        cells = torch.arange(0, self.n_past + T, dtype=torch.int32, device=self.device)  # full: cell i = token i
        emb, qtype, n = self.w["token_embd.weight"]
        x = K.get_rows(emb, qtype, n, ids)
        for i in range(self.n_layer):
            blk = f"blk.{i}"
            # attention
            h = K.rms_norm(x, self._vector(f"{blk}.attn_norm.weight"), self.eps)
            q = self._project(h, f"{blk}.attn_q").view(T, H, D)
            k = self._project(h, f"{blk}.attn_k").view(T, Hkv, D)
            v = self._project(h, f"{blk}.attn_v").view(T, Hkv, D)
            K.rope_(q, positions, self.freqs, self.rope_mode)
            K.rope_(k, positions, self.freqs, self.rope_mode)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[self.n_past:self.n_past + T] = k.to(kc.dtype)
            vc[self.n_past:self.n_past + T] = v.to(vc.dtype)
            if T == 1:
                att = K.attention_decode(q[0], kc, vc, cells)
            else:
                att = K.attention_prefill(q, kc, vc, cells, self.n_past)
            x = x + self._project(att.reshape(T, H * D), f"{blk}.attn_output")
            # SwiGLU feed-forward
            h = K.rms_norm(x, self._vector(f"{blk}.ffn_norm.weight"), self.eps)
            ff = K.swiglu(self._project(h, f"{blk}.ffn_gate"), self._project(h, f"{blk}.ffn_up"))
            x = x + self._project(ff, f"{blk}.ffn_down")
        self.n_past += T
        w, qtype, _ = self.w["output.weight"]
        if T <= 2:  # decode: the final norm fused into the vocabulary-wide product
            return K.head(w, qtype, x, self._vector("output_norm.weight"), self.eps)
        return K.matmul(w, qtype, K.rms_norm(x, self._vector("output_norm.weight"), self.eps))
