"""The Triton backend: `Engine(model, device="triton")` runs the whole forward pass on torch's current
GPU with sepedge.kernels, over the one SepLLM cache policy of the C core.

    TritonWeights     the GGUF weights on the device once, as their quantized bytes (Q4_0, Q8_0, Q4_K, Q6_K
                      repacked into aligned code and scale arrays: kernels.pack; norms and biases as float32)
    TritonContext     a KV cache: the native policy (sepedge.cache_plan.CachePolicy) says, per forward
                      pass, which cells the new tokens' keys and values go to, which cells are live
                      (with the extra rotation of each key) and what each query may see; this class
                      keeps K and V as torch tensors (n_layer, n_cells, n_head_kv, head_dim) and runs
                      the kernels. It has the shape of sepedge._native.Context, so Engine, the CLI and
                      the server use it as they use a native context.

Prompt chunks into repacked weights take half-precision rows and float16 products from 64 rows
(kernels.matmul_mod.F16_MIN_ROWS); from 256 rows (DQ_MIN_ROWS) each weight is first decoded once to a
float16 scratch owned by the context (the largest weight, at most DQ_SCRATCH_BYTES) and multiplied as a
plain float16 matrix, when SEPEDGE_TRITON_PREFILL asks for it: "f16" (the default: weight tiles decoded
in the GEMM's registers), "dq" (every repacked weight decoded once), "auto" ("dq" for Q4_K and Q6_K
weights, "f16" for the others), "q8" (the 8-bit products, as decode).

Decode steps (one token whose query sees every live cell, as every mode's plans do) run through a
captured CUDA graph where torch supports it: the token, its position and cell, the live-cell list and
the deltas are written into static buffers sized to the cache, the kernels read the live count from
device memory, and the graph replays. Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors:
how CI exercises this file) everything runs eagerly.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ._native import KV_MODES, Model, _int_arg, token_array
from .errors import (BackendError, CancelledError, InvalidArgumentError, ModelLoadError, NumericalError, SepedgeError,
                     UnsupportedError)

KV_DTYPES = ("f32", "f16")
GRAPHS_ENV = "SEPEDGE_TRITON_GRAPHS"  # "0": decode without CUDA graphs; "static": their fixed shapes, uncaptured
PACK_ENV = "SEPEDGE_TRITON_PACK"  # "0": keep the file's bytes, products through the byte-wise kernels
# the products of long prefill chunks into repacked weights: "dq": chunks of kernels.matmul_mod.DQ_MIN_ROWS
# rows or more decode each weight once to a float16 scratch and multiply plain float16
# (kernels.matmul_mod.matmul_dq), shorter ones of F16_MIN_ROWS or more decode weight tiles in the GEMM's
# registers; "f16" (the default): every chunk of F16_MIN_ROWS or more decodes in registers; "auto": "dq"
# for the weights of kernels.matmul_mod.DQ_AUTO_TYPES, "f16" for the others; "q8": the 8-bit products
# there too (A/B). dq is not the default: its wall time on the H200 exceeded its kernels' by up to 2x
# (triton_kernels.md), not yet explained
PREFILL_ENV = "SEPEDGE_TRITON_PREFILL"
PREFILL_MODES = ("auto", "dq", "f16", "q8")
# decode's 8-bit inputs made by the kernel before instead of by a launch of act_q8: "attn" (the
# default): the attention merge quantizes its output for the output projection; "1": also the fused
# gate/up product quantizes silu(gate) * up for the down product in its epilogue (kernels.matvec_glu:
# 8x fewer, wider programs) and the products into the residual stream (wo, down) make the next
# RMSNorm's 8-bit row from their last program (kernels.matvec_norm: a ticket per program); one act_q8
# launch is left in a step (the first layer's norm of the embedding row); measured against "attn"
# before it becomes the default; "0": neither
FUSE_ENV = "SEPEDGE_TRITON_FUSE"
FUSE_MODES = ("0", "attn", "1")


def _imports():
    try:
        import torch
        import triton  # noqa: F401

        from . import kernels
    except ImportError as e:
        raise BackendError(f"the Triton backend needs torch and triton (pip install sepedge[triton]): {e}") from None
    return torch, kernels


def _device(torch, device):
    """torch's current CUDA device, or the CPU under Triton's interpreter; BackendError otherwise."""
    interpret = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    if device is None:
        if torch.cuda.is_available() and not interpret:
            device = f"cuda:{torch.cuda.current_device()}"
        elif interpret:
            device = "cpu"
        else:
            raise BackendError("the Triton backend needs a GPU that torch can use (torch.cuda.is_available() is "
                               "False; or set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    dev = torch.device(device)
    if dev.type == "cpu" and not interpret:
        raise BackendError("the Triton backend runs on the CPU only under Triton's interpreter (TRITON_INTERPRET=1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r}: torch sees no CUDA GPU")
    return dev


class TritonWeights:
    """A model's weights on the device: every matrix as its GGUF bytes (rows, row_bytes) uint8, those
    of the types kernels.PACKED_TYPES repacked once (kernels.Packed: the same bytes in aligned code
    and scale arrays, which the products read 16 bytes at a time), except the token embedding, which
    the row gather reads as the file's bytes (a tied output head gets a repacked copy); norms, biases
    and rope factors as float32. Shared by every context of an Engine."""

    def __init__(self, path: str | os.PathLike, device=None):
        torch, K = _imports()
        import gguf

        self.torch, self.K = torch, K
        self.device = _device(torch, device)
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

        self.w: dict[str, tuple] = {}  # matrices: name -> (uint8 bytes (rows, row_bytes) on the device, type, n_cols)
        self.vec: dict[str, object] = {}  # vectors: name -> float32 tensor on the device
        factors = None
        for t in r.tensors:
            qtype = int(t.tensor_type)
            if qtype not in K.BLOCKS:
                raise UnsupportedError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the Triton "
                                       "backend does not read")
            n_cols = int(t.shape[0])
            data = np.ascontiguousarray(np.asarray(t.data)).view(np.uint8).reshape(-1, K.row_bytes(qtype, n_cols))
            if len(t.shape) == 1 or t.shape[1] == 1:  # norms, biases, rope factors: float32 once
                v = K.dequantize_ref(torch.from_numpy(data.copy()), qtype, n_cols)[0]
                if t.name == "rope_freqs.weight":
                    factors = v
                else:
                    self.vec[t.name] = v.to(self.device)
                continue
            self.w[t.name] = (torch.from_numpy(data.copy()).to(self.device), qtype, n_cols)
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied embeddings
        for i in range(self.n_layer):  # one product (one launch, one pass over x) where the types agree
            self._fuse(f"blk.{i}", ("attn_q", "attn_k", "attn_v"), "attn_qkv")
            # a Q4_K_M file gives V Q6_K in some layers: Q and K still share one launch (the K product
            # alone is 1024 rows of the 8B model, too few programs to reach the bandwidth)
            self._fuse(f"blk.{i}", ("attn_q", "attn_k"), "attn_qk")
            self._fuse(f"blk.{i}", ("ffn_gate", "ffn_up"), "ffn_gateup")
        for name, (w, qtype, n_cols) in self.w.items():
            if qtype in K.PACKED_TYPES and name != "token_embd.weight" and os.environ.get(PACK_ENV) != "0":
                self.w[name] = (K.pack(w, qtype, n_cols), qtype, n_cols)
        self.n_vocab = self.w["token_embd.weight"][0].shape[0]
        self.n_out = self.w["output.weight"][0].shape[0]
        self.freqs = K.inv_freq(self.head_dim, kv("rope.freq_base", 10000.0), factors, linear).to(self.device)
        self.nbytes = sum(w.nbytes if isinstance(w, K.Packed) else w.numel() for w, _, _ in self.w.values())

    def _fuse(self, blk: str, parts: tuple, name: str) -> None:
        """Stack the rows of matrices that read the same input (Q, K, V; gate, up) into one, when
        they share a type and a row length (a Q4_K_M file often gives V another type: then not)."""
        ws = [self.w.get(f"{blk}.{p}.weight") for p in parts]
        if any(w is None for w in ws) or len({(q, n) for _, q, n in ws}) != 1:
            return
        biases = [self.vec.get(f"{blk}.{p}.bias") for p in parts]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return
        self.w[f"{blk}.{name}.weight"] = (self.torch.cat([w for w, _, _ in ws]), ws[0][1], ws[0][2])
        for p in parts:
            del self.w[f"{blk}.{p}.weight"]
        if biases[0] is not None:
            self.vec[f"{blk}.{name}.bias"] = self.torch.cat(biases)


class _Forward:
    """The llama/qwen2 forward pass over a cache plan, one kernel launch per op."""

    def __init__(self, weights: TritonWeights, n_cells: int, kv_dtype):
        torch = weights.torch
        self.W, self.K, self.torch = weights, weights.K, torch
        W = weights
        shape = (W.n_layer, n_cells, W.n_head_kv, W.head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype, device=W.device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype, device=W.device)
        self.n_cells = n_cells
        self.cancel_event = threading.Event()
        fuse = os.environ.get(FUSE_ENV, "attn")
        if fuse not in FUSE_MODES:
            raise InvalidArgumentError(f"{FUSE_ENV} must be one of {list(FUSE_MODES)}, got {fuse!r}")
        self.fuse_attn, self.fuse_glu = fuse != "0", fuse == "1"
        self.tickets = torch.zeros(2, dtype=torch.int32, device=W.device)  # kernels.matvec_norm's counters
        self.dq_scratch = None  # the float16 weight of the dequantize-once products, made at the first long chunk
        self._prefill_mode()  # a wrong value fails here, not at the first long prompt (it is read again per pass)

    def _prefill_mode(self) -> str:
        mode = os.environ.get(PREFILL_ENV, "") or "f16"
        if mode not in PREFILL_MODES:
            raise InvalidArgumentError(f"{PREFILL_ENV} must be one of {list(PREFILL_MODES)}, got {mode!r}")
        return mode

    def _scratch(self):
        """The float16 buffer every dequantize-once product of this context decodes its weight into:
        as large as the largest repacked weight, at most kernels.matmul_mod.DQ_SCRATCH_BYTES."""
        if self.dq_scratch is None:
            mm = self.K.matmul_mod
            n = mm.dq_scratch_values(w for w, q, _ in self.W.w.values()
                                     if isinstance(w, self.K.Packed) and q in mm.F16_TYPES)
            self.dq_scratch = self.torch.empty(n, dtype=self.torch.float16, device=self.W.device)
        return self.dq_scratch

    def _quantized(self, name: str) -> bool:
        return name in self.W.w and self.W.w[name][1] not in self.K.FLOAT_TYPES

    def inputs(self, x, names: tuple, norm=None, up=None):
        """The input of the products `names` from x: rms_norm(x) * norm, silu(x) * up, or x itself; in
        8 bits (kernels.act_q8, one launch with the norm or SwiGLU) when a weight is quantized, as the
        CPU core makes it, with the float rows as well when a weight is float; for chunks of
        F16_MIN_ROWS rows or more into repacked weights, in half precision with a scale per row
        (kernels.act_f16: the float16 products, bound by the tensor cores rather than by the 8-bit
        path's rescale per 32 values; as llama.cpp takes large batches to a float16 GEMM)."""
        K, W = self.K, self.W
        ws = [W.w[f"{n}.weight"] for n in names if f"{n}.weight" in W.w]
        if (x.shape[0] >= K.matmul_mod.F16_MIN_ROWS and self._prefill_mode() != "q8"
                and all(isinstance(w, K.Packed) and q in K.matmul_mod.F16_TYPES for w, q, _ in ws)):
            # a long chunk: half-precision rows into the float16 product (kernels/act_f16.py)
            return K.act_f16(x, norm, W.eps, up)
        floats = [q in K.FLOAT_TYPES for _, q, _ in ws]
        if not all(floats):
            return K.act_q8(x, norm, W.eps, up, keep_float=any(floats))
        if norm is not None:
            return K.rms_norm(x, norm, W.eps)
        return x if up is None else K.swiglu(x, up)

    def _attn_inputs(self, i: int) -> tuple:
        return tuple(f"blk.{i}.{p}" for p in ("attn_qkv", "attn_qk", "attn_q", "attn_k", "attn_v"))

    def _residual(self, h, name: str, x, norm, consumers: tuple):
        """x + h W^T, the residual stream after the product `name`, and (FUSE 1, decode) the 8-bit
        rms_norm(x + h W^T) * norm that the products `consumers` read, made by the product's last program
        (kernels.matvec_norm); else None and the consumers' input is made by act_q8 as before."""
        w, qtype, _ = self.W.w[f"{name}.weight"]
        ws = [self.W.w[f"{n}.weight"] for n in consumers if f"{n}.weight" in self.W.w]
        if (self.fuse_glu and x.shape[0] <= 2 and isinstance(h, self.K.Act) and isinstance(w, self.K.Packed)
                and w.shape[0] % 32 == 0 and f"{name}.bias" not in self.W.vec and ws
                and all(q not in self.K.FLOAT_TYPES for _, q, _ in ws)):
            return self.K.matvec_norm(w, qtype, h, x, norm, self.W.eps, self.tickets)
        return self.project(h, name, res=x), None

    def project(self, x, name: str, res=None):
        """x W^T (+ bias) (+ res: the residual stream, added in the product's epilogue); x: float rows
        or their kernels.act_q8 form."""
        w, qtype, _ = self.W.w[f"{name}.weight"]
        bias = self.W.vec.get(f"{name}.bias")
        # decode reads each weight byte once per token; prefill tiles on tensor cores
        packed = isinstance(w, self.K.Packed)  # else the file's bytes, read by the byte-wise kernels
        if x.shape[0] <= 2:
            return self.K.matvec(w, qtype, x, bias, res=res, packed=packed)
        mode = self._prefill_mode() if isinstance(x, self.K.ActF16) else "q8"
        if (x.shape[0] >= self.K.matmul_mod.DQ_MIN_ROWS
                and (mode == "dq" or mode == "auto" and qtype in self.K.matmul_mod.DQ_AUTO_TYPES)):
            # a long chunk: the weight decoded once into the context's float16 scratch, then a plain
            # float16 GEMM (kernels.matmul_mod.matmul_dq)
            return self.K.matmul(w, qtype, x, bias, res=res, packed=packed, scratch=self._scratch())
        return self.K.matmul(w, qtype, x, bias, res=res, packed=packed)

    def run(self, ids, positions, cells, live, deltas, mask, n_live_t, n_out: int, hidden: bool = False,
            check_cancel: bool = True):
        """One forward pass. ids, positions, cells (T,) int32: the new tokens, their positions and cells;
        live (L,) int32 and deltas (L,) int32 or None: the cells attended and their further rotations;
        mask (T, L) uint8 or None (None: T = 1 sees every live cell, or the chunk is causal after the
        live cells before it); n_live_t: None or a (1,) int32 device tensor (fixed shapes: the count of
        leading live entries). Returns the logits of the last n_out tokens (or, hidden, the normalized
        final hidden states of all tokens)."""
        K, W = self.K, self.W
        T = ids.shape[0]
        H, Hkv, D = W.n_head, W.n_head_kv, W.head_dim
        emb, qtype, n = W.w["token_embd.weight"]
        x = K.get_rows(emb, qtype, n, ids)
        pre = None  # the next products' 8-bit input, made by the product before them (FUSE 1), or None
        for i in range(W.n_layer):
            if check_cancel and self.cancel_event.is_set():
                raise CancelledError("cancelled")
            blk = f"blk.{i}"
            h = pre if pre is not None else self.inputs(x, self._attn_inputs(i), norm=W.vec[f"{blk}.attn_norm.weight"])
            if f"{blk}.attn_qkv.weight" in W.w:
                qkv = self.project(h, f"{blk}.attn_qkv")
                q = qkv[:, :H * D].view(T, H, D)
                k = qkv[:, H * D:(H + Hkv) * D].view(T, Hkv, D)
                v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
            elif f"{blk}.attn_qk.weight" in W.w:
                qk = self.project(h, f"{blk}.attn_qk")
                q = qk[:, :H * D].view(T, H, D)
                k = qk[:, H * D:].view(T, Hkv, D)
                v = self.project(h, f"{blk}.attn_v").view(T, Hkv, D)
            else:
                q = self.project(h, f"{blk}.attn_q").view(T, H, D)
                k = self.project(h, f"{blk}.attn_k").view(T, Hkv, D)
                v = self.project(h, f"{blk}.attn_v").view(T, Hkv, D)
            kc, vc = self.k_cache[i], self.v_cache[i]
            # rotated keys and values -> their cells, the queries rotated in place: one launch
            K.rope_store(k, v, positions, cells, kc, vc, W.freqs, W.rope_mode, q=q)
            if T == 1 and mask is None:
                # the output projection's 8-bit input made by the merge (no act_q8 launch)
                quant = (self.fuse_attn and self._quantized(f"{blk}.attn_output.weight")
                         and D % 32 == 0 and D & (D - 1) == 0)
                att = K.attention_decode(q[0], kc, vc, live, deltas=deltas, freqs=W.freqs, rope_mode=W.rope_mode,
                                         n_live=n_live_t, quant=quant)
                h = att if quant else self.inputs(att.reshape(T, H * D), (f"{blk}.attn_output",))
            else:
                att = K.attention_prefill(q, kc, vc, live, live.shape[0] - T, mask=mask, deltas=deltas,
                                          freqs=W.freqs, rope_mode=W.rope_mode)
                h = self.inputs(att.reshape(T, H * D), (f"{blk}.attn_output",))
            ffn = (f"{blk}.ffn_gateup", f"{blk}.ffn_gate", f"{blk}.ffn_up")
            x, pre = self._residual(h, f"{blk}.attn_output", x, W.vec[f"{blk}.ffn_norm.weight"], ffn)
            h = pre if pre is not None else self.inputs(x, ffn, norm=W.vec[f"{blk}.ffn_norm.weight"])
            # the consumers of the down product's residual: the next layer's Q, K, V, or the head
            last = i == W.n_layer - 1
            nxt = ((("output",) if n_out == T and not hidden else ()) if last else self._attn_inputs(i + 1))
            nxt_norm = W.vec["output_norm.weight" if last else f"blk.{i + 1}.attn_norm.weight"]
            gu_w = W.w.get(f"{blk}.ffn_gateup.weight")
            if (self.fuse_glu and T <= 2 and isinstance(h, K.Act) and gu_w is not None and isinstance(gu_w[0], K.Packed)
                    and gu_w[0].shape[0] % 64 == 0 and self._quantized(f"{blk}.ffn_down.weight")):
                # decode: the down product's 8-bit input made in the gate/up product's epilogue
                hq, _ = K.matvec_glu(gu_w[0], gu_w[1], h, W.vec.get(f"{blk}.ffn_gateup.bias"))
                x, pre = self._residual(hq, f"{blk}.ffn_down", x, nxt_norm, nxt)
                continue
            if f"{blk}.ffn_gateup.weight" in W.w:
                gu = self.project(h, f"{blk}.ffn_gateup")
                n_ff = gu.shape[1] // 2
                gate, up = gu[:, :n_ff], gu[:, n_ff:]
            else:
                gate, up = self.project(h, f"{blk}.ffn_gate"), self.project(h, f"{blk}.ffn_up")
            x, pre = self._residual(self.inputs(gate, (f"{blk}.ffn_down",), up=up), f"{blk}.ffn_down", x, nxt_norm, nxt)
        norm = W.vec["output_norm.weight"]
        if hidden:
            return K.rms_norm(x, norm, W.eps)
        x = x[T - n_out:]
        if n_out == 0:
            return x.new_empty(0, W.n_out)
        w, qtype, _ = W.w["output.weight"]
        if qtype in K.FLOAT_TYPES:
            if n_out <= 2:
                return K.head(w, qtype, x, norm, W.eps)  # the final norm fused into the product
            return K.matmul(w, qtype, K.rms_norm(x, norm, W.eps))
        # the norm and the 8-bit activations in one launch, or made by the last down product (FUSE 1)
        h = pre if pre is not None else K.act_q8(x, norm, W.eps)
        packed = isinstance(w, K.Packed)
        return K.matvec(w, qtype, h, packed=packed) if n_out <= 2 else K.matmul(w, qtype, h, packed=packed)


class _DecodeGraph:
    """One decode step captured in a CUDA graph. Inputs go through one pinned int32 buffer copied
    to the device before each replay: [token, position, cell, n_live, live cells (n_cells), deltas
    (n_cells)]; the live count is read by the attention kernel from device memory, so one graph
    serves every step of the cache."""

    def __init__(self, fwd: _Forward, use_deltas: bool, capture: bool = True):
        torch = fwd.torch
        self.fwd, self.torch, self.use_deltas, self.capture = fwd, torch, use_deltas, capture
        n = fwd.n_cells
        dev = fwd.W.device
        self.host = torch.zeros(4 + 2 * n, dtype=torch.int32, pin_memory=dev.type == "cuda")
        self.buf = torch.zeros(4 + 2 * n, dtype=torch.int32, device=dev)
        self.graph = None
        self.logits = None

    def _step(self):
        b, n = self.buf, self.fwd.n_cells
        return self.fwd.run(b[0:1], b[1:2], b[2:3], b[4:4 + n], b[4 + n:4 + 2 * n] if self.use_deltas else None,
                            None, b[3:4], 1, check_cancel=False)

    def __call__(self, token: int, position: int, cell: int, live: np.ndarray, deltas: np.ndarray):
        torch, n_live = self.torch, len(live)
        h = self.host.numpy()
        h[0:4] = (token, position, cell, n_live)
        h[4:4 + n_live] = live
        h[4 + self.fwd.n_cells:4 + self.fwd.n_cells + n_live] = deltas
        self.buf.copy_(self.host, non_blocking=True)
        if not self.capture:  # the same fixed-shape step, launched directly (tests it without a GPU)
            return self._step()
        if self.graph is None:
            # the first step runs eagerly (it compiles the kernels and is the warm-up torch asks for
            # before a capture); the capture records the same step without running it
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                out = self._step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.logits = self._step()
            self.graph = g
            return out
        self.graph.replay()
        return self.logits


class TritonContext:
    """A KV cache on the Triton backend, with the interface of sepedge._native.Context."""

    _kind = "context"

    def __init__(self, model: Model, weights: TritonWeights, *, n_ctx: int = 0, n_batch: int = 512,
                 n_threads: int = 0, kv_type: str = "f16", kv_mode: str = "full", n_init: int | None = None,
                 n_sep: int | None = None, n_local: int | None = None, n_cache: int | None = None):
        from .cache_plan import CachePolicy

        if kv_type not in KV_DTYPES:
            raise InvalidArgumentError(f"kv_type must be one of {sorted(KV_DTYPES)}, got {kv_type!r}")
        if kv_mode not in KV_MODES:
            raise InvalidArgumentError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
        _int_arg("n_threads", n_threads, 0)  # accepted for the Engine's signature; the GPU needs none
        torch = weights.torch
        self.model, self.weights, self.torch = model, weights, torch
        self.kv_mode = kv_mode
        self.policy = CachePolicy(kv_mode, model=model, n_init=n_init, n_sep=n_sep, n_local=n_local, n_cache=n_cache,
                                  n_ctx=n_ctx, n_batch=n_batch, mask=True)
        self.n_cells = self.policy.n_cells
        dtype = torch.float16 if kv_type == "f16" else torch.float32
        self.fwd = _Forward(weights, self.n_cells, dtype)
        self.kv_bytes = 2 * self.fwd.k_cache.numel() * self.fwd.k_cache.element_size()
        self._lock = threading.Lock()
        self._closed = False
        # deltas only exist where the policy moves tokens (streaming modes); full and sepllm keep
        # original positions, and their kernels skip the rotation on read
        self._graph = None
        # "static": the graph's fixed-shape step without the capture (any device; for tests)
        graphs = os.environ.get(GRAPHS_ENV, "1")
        self._use_graphs = graphs == "static" or (weights.device.type == "cuda" and graphs != "0"
                                                  and hasattr(torch.cuda, "CUDAGraph"))
        self._capture = graphs != "static"
        self._graph_deltas = kv_mode in ("streamingllm", "sepllm-stream")
        self._embeddings = False

    # --- lifetime and cancellation (as Context)

    @property
    def ptr(self):
        if self._closed:
            raise SepedgeError("the context is closed")
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self.cancel()
        with self._lock:
            self._closed = True
            self._graph = None
            self.fwd.k_cache = self.fwd.v_cache = self.fwd.dq_scratch = None
            self.policy.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cancel(self) -> None:
        self.fwd.cancel_event.set()

    def uncancel(self) -> None:
        self.fwd.cancel_event.clear()

    @property
    def cancelled(self) -> bool:
        return self.fwd.cancel_event.is_set()

    # --- evaluation

    def _tensor(self, a: np.ndarray, dtype=None):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.weights.device, dtype=dtype, non_blocking=True) if dtype else t.to(self.weights.device)

    def _pass(self, toks: np.ndarray, plan, n_out: int, hidden: bool):
        torch = self.torch
        T = plan.n_tokens
        mask = plan.mask
        if T == 1 and mask.all():
            mask = None  # decode: the query sees every live cell
        elif mask.shape[1] >= T and np.array_equal(mask, np.tri(T, mask.shape[1], mask.shape[1] - T, dtype=bool)) \
                and np.array_equal(plan.live_cells[-T:], plan.cells):
            mask = None  # causal after the live cells before the chunk: the kernel's own rule, no mask read
        # the streaming modes always take the rotation on read (by 0 until a cell moves), as their
        # captured decode step does: one set of kernels, the same rounding whichever path runs
        use_deltas = self._graph_deltas or bool(plan.live_deltas.any())
        if (T == 1 and mask is None and not hidden and self._use_graphs
                and (self._graph_deltas or not use_deltas)):
            if self._graph is None:
                self._graph = _DecodeGraph(self.fwd, self._graph_deltas, self._capture)
            if self.fwd.cancel_event.is_set():
                raise CancelledError("cancelled")
            return self._graph(int(toks[0]), int(plan.positions[0]), int(plan.cells[0]), plan.live_cells,
                               plan.live_deltas)
        return self.fwd.run(self._tensor(toks, torch.int32), self._tensor(plan.positions), self._tensor(plan.cells),
                            self._tensor(plan.live_cells), self._tensor(plan.live_deltas) if use_deltas else None,
                            None if mask is None else self._tensor(mask.view(np.uint8)), None, n_out, hidden)

    def _forward(self, toks: np.ndarray, n_logits: int, hidden: bool = False) -> list:
        """Every pass the policy plans for `toks`; the outputs on the host. On failure the policy is
        put back as se_decode leaves a native cache: as before the call when nothing was evicted
        during it, else cleared (the message says which)."""
        before = self.policy.info()
        outs, s = [], 0
        try:
            while s < len(toks):
                plan = self.policy.step(toks[s:])
                T = plan.n_tokens
                # logits wanted from this pass: those of the last n_logits tokens of the call
                first_wanted = len(toks) - n_logits
                n_out = max(0, s + T - max(first_wanted, s))
                s += T
                if n_out == 0 and not hidden:
                    self._pass(toks[s - T:s], plan, 0, False)  # only the cache is wanted from this pass
                    continue
                out = self._pass(toks[s - T:s], plan, n_out, hidden)
                out = out.float().cpu().numpy()
                if not np.isfinite(out).all():
                    raise NumericalError("a logit or hidden state is not finite (NaN or infinite)")
                outs.append(out)
        except BaseException as e:
            self._restore(before)
            if isinstance(e, SepedgeError):
                where = "the cache is as it was" if self.policy.info()["n_seen"] == before["n_seen"] else "the cache was cleared"
                raise type(e)(f"{e}; {where}") from None
            raise
        return outs

    def _restore(self, before: dict) -> None:
        info = self.policy.info()
        try:
            if info["n_evicted"] == before["n_evicted"]:
                self.policy.truncate(before["n_seen"])  # the cells it held were never overwritten
                return
        except SepedgeError:
            pass
        self.policy.clear()

    def decode(self, tokens, n_logits: int = 1) -> np.ndarray:
        """Feed tokens after those in the cache; the logits of the last n_logits, (n_logits, n_vocab)."""
        toks = token_array(tokens, self.model.n_vocab)
        n_logits = min(_int_arg("n_logits", n_logits, 0), len(toks))
        if len(toks) == 0:
            raise InvalidArgumentError("no tokens to evaluate")
        with self._lock:
            self.ptr
            if self.fwd.cancel_event.is_set():
                raise CancelledError("cancelled before the call; the cache is as it was")
            outs = self._forward(toks, n_logits)
        logits = np.concatenate(outs, axis=0) if outs else np.empty((0, self.weights.n_out), np.float32)
        return np.ascontiguousarray(logits[len(logits) - n_logits:], dtype=np.float32)

    def embeddings(self, tokens, pooling: str = "mean") -> np.ndarray:
        """The final hidden states (after the output norm) of `tokens`, pooled: (n_embd,) float32."""
        if pooling not in ("mean", "last"):
            raise InvalidArgumentError(f"pooling must be one of ['last', 'mean'], got {pooling!r}")
        toks = token_array(tokens, self.model.n_vocab)
        if len(toks) == 0:
            raise InvalidArgumentError("no tokens to evaluate")
        with self._lock:
            self.ptr
            h = np.concatenate(self._forward(toks, 0, hidden=True), axis=0).astype(np.float64)
        return (h.mean(0) if pooling == "mean" else h[-1]).astype(np.float32)

    # --- the cache (the policy's view; K and V stay where the plans put them)

    def clear(self) -> None:
        with self._lock:
            self.policy.clear()

    def truncate(self, n_keep: int) -> None:
        with self._lock:
            self.policy.truncate(n_keep)

    def keep(self, n_keep: int) -> None:
        with self._lock:
            self.policy.keep(n_keep)

    def info(self) -> dict:
        with self._lock:
            return self._info()

    def _info(self) -> dict:
        i = self.policy.info()
        i["kv_bytes"] = self.kv_bytes
        return i

    def cells(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        with self._lock:
            return self.policy.cells()

    def snapshot(self):
        with self._lock:
            return self._info(), self.policy.cells()

    def state_save(self) -> bytes:
        raise UnsupportedError("saving the cache state is not supported by the Triton backend")

    def state_load(self, data: bytes) -> None:
        raise UnsupportedError("loading a cache state is not supported by the Triton backend")


def load_model(path: str | os.PathLike) -> tuple[Model, TritonWeights]:
    """The native model (metadata, vocabulary, separators: no backend of the library) and the weights
    on the device. BackendError first when torch, triton or a GPU is missing."""
    _device(_imports()[0], None)
    model = Model(path, "none")
    try:
        weights = TritonWeights(path)
    except BaseException:
        model.close()
        raise
    return model, weights
