"""Owning wrappers over the C handles: each frees its native memory exactly once, on close(), at
the end of a with-block, or when it is garbage collected."""

from __future__ import annotations

import os
import weakref

import numpy as np

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, ModelLoadError, SepedgeError, check

DEVICES = {"cpu": lib.SE_DEVICE_CPU, "cuda": lib.SE_DEVICE_CUDA}
KV_TYPES = {"f32": lib.SE_KV_F32, "f16": lib.SE_KV_F16}
KV_MODES = {"full": lib.SE_KV_MODE_FULL, "streamingllm": lib.SE_KV_MODE_STREAMINGLLM,
            "sepllm": lib.SE_KV_MODE_SEPLLM, "sepllm-stream": lib.SE_KV_MODE_SEPLLM_STREAM}
REGIONS = {1: "init", 2: "sep", 3: "recent"}


class _Handle:
    _kind = "handle"

    def __init__(self, ptr, free):
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, free, ptr)

    @property
    def ptr(self):
        if self._ptr is None:
            raise SepedgeError(f"the {self._kind} is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        self._finalizer()
        self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _int_arg(name: str, value, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise InvalidArgumentError(f"{name} must be >= {lo}, got {value}")
    return int(value)


class Model(_Handle):
    """A GGUF model file, mapped and validated by the C core."""
    _kind = "model"

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        if device not in DEVICES:
            raise InvalidArgumentError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
        self.path = os.fspath(path)
        params = ffi.new("se_model_params *", lib.se_model_default_params())
        params.device = DEVICES[device]
        out = ffi.new("se_model **")
        check(lib.se_model_load(os.fsencode(self.path), params, out))
        super().__init__(out[0], lib.se_model_free)
        self._contexts: weakref.WeakSet = weakref.WeakSet()
        info = ffi.new("se_model_info *")
        check(lib.se_model_get_info(self.ptr, info))
        self.info = {k: getattr(info, k) for k in ("n_vocab", "n_ctx_train", "n_embd", "n_layer", "n_head",
                                                   "n_head_kv", "n_ff", "head_dim", "file_type", "n_params", "n_bytes",
                                                   "n_bytes_packed")}
        self.info["arch"] = ffi.string(info.arch).decode()

    def close(self) -> None:
        for ctx in list(self._contexts):  # a context must not outlive its model
            ctx.close()
        super().close()

    @property
    def n_vocab(self) -> int:
        return self.info["n_vocab"]

    # --- metadata

    def meta(self, key: str, default=None):
        """A GGUF metadata value as Python (int, float, bool, str, or a list of them)."""
        i = lib.se_model_meta_find(self.ptr, key.encode())
        if i < 0:
            return default
        typ, elem, count = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("uint64_t *")
        check(lib.se_model_meta_type(self.ptr, i, typ, elem, count))
        is_array = typ[0] == lib.SE_META_ARRAY
        kind, n = elem[0], count[0]
        if kind == lib.SE_META_STRING:
            values = self._strings(i, n, key)
        elif kind in (lib.SE_META_FLOAT32, lib.SE_META_FLOAT64):
            out = np.empty(n, dtype=np.float64)
            check(lib.se_model_meta_floats(self.ptr, i, 0, ffi.from_buffer("double[]", out), n))
            values = out.tolist()
        else:
            out = np.empty(n, dtype=np.int64)
            check(lib.se_model_meta_ints(self.ptr, i, 0, ffi.from_buffer("int64_t[]", out), n))
            values = [bool(v) for v in out] if kind == lib.SE_META_BOOL else out.tolist()
        return values if is_array else values[0]

    def _strings(self, i: int, n: int, key: str) -> list[str]:
        lens = np.zeros(max(n, 1), dtype=np.uint64)
        check(lib.se_model_meta_strings(self.ptr, i, ffi.NULL, 0, ffi.from_buffer("uint64_t[]", lens), n))
        total = int(lens[:n].sum())
        buf = ffi.new("char[]", max(total, 1))
        check(lib.se_model_meta_strings(self.ptr, i, buf, total, ffi.from_buffer("uint64_t[]", lens), n))
        raw = ffi.buffer(buf, total)[:]
        ends = np.cumsum(lens[:n]).tolist()
        out, start = [], 0
        try:
            for end in ends:
                out.append(raw[start:end].decode("utf-8"))
                start = end
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path}: string {len(out)} of '{key}' is not valid UTF-8") from None
        return out

    # --- separators

    @property
    def separators(self) -> list[int]:
        n = lib.se_model_n_separators(self.ptr)
        ids = np.empty(max(n, 1), dtype=np.int32)
        check(lib.se_model_get_separators(self.ptr, ffi.from_buffer("int32_t[]", ids), n))
        return ids[:n].tolist()

    @separators.setter
    def separators(self, ids) -> None:
        arr = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
        check(lib.se_model_set_separators(self.ptr, ffi.from_buffer("int32_t[]", arr), len(arr)))


class Context(_Handle):
    """A KV cache and the buffers to run a model over it."""
    _kind = "context"

    def __init__(self, model: Model, *, n_ctx: int = 0, n_batch: int = 512, n_threads: int = 0, kv_type: str = "f16",
                 kv_mode: str = "full", n_init: int | None = None, n_sep: int | None = None,
                 n_local: int | None = None, n_cache: int | None = None):
        if kv_type not in KV_TYPES:
            raise InvalidArgumentError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if kv_mode not in KV_MODES:
            raise InvalidArgumentError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
        params = ffi.new("se_context_params *", lib.se_context_default_params())
        params.n_ctx = _int_arg("n_ctx", n_ctx, 0)
        params.n_batch = _int_arg("n_batch", n_batch, 1)
        params.n_threads = _int_arg("n_threads", n_threads, 0)
        params.kv_type = KV_TYPES[kv_type]
        params.kv_mode = KV_MODES[kv_mode]
        for name, value in (("n_init", n_init), ("n_sep", n_sep), ("n_local", n_local), ("n_cache", n_cache)):
            setattr(params, name, -1 if value is None else _int_arg(name, value, 0))
        out = ffi.new("se_context **")
        check(lib.se_context_new(model.ptr, params, out))
        super().__init__(out[0], lib.se_context_free)
        self.model = model
        model._contexts.add(self)

    def decode(self, tokens, n_logits: int = 1) -> np.ndarray:
        """Feed tokens after those in the cache; the logits of the last n_logits, (n_logits, n_vocab)."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n_logits = min(n_logits, len(toks))
        logits = np.empty((n_logits, self.model.n_vocab), dtype=np.float32)
        check(lib.se_decode(self.ptr, ffi.from_buffer("int32_t[]", toks), len(toks),
                            ffi.from_buffer("float[]", logits) if n_logits else ffi.NULL, n_logits))
        return logits

    def clear(self) -> None:
        check(lib.se_cache_clear(self.ptr))

    def truncate(self, n_keep: int) -> None:
        check(lib.se_cache_truncate(self.ptr, n_keep))

    def keep(self, n_keep: int) -> None:
        """Make the first n_keep tokens initial ones (never evicted)."""
        check(lib.se_cache_keep(self.ptr, _int_arg("n_keep", n_keep, 0)))

    def info(self) -> dict:
        out = ffi.new("se_cache_info *")
        check(lib.se_cache_get_info(self.ptr, out))
        info = {k: getattr(out, k) for k in ("n_cells", "n_init", "n_sep", "n_local", "n_live", "n_live_init",
                                             "n_live_sep", "n_live_recent", "n_seen", "n_evicted", "sum_visible",
                                             "kv_bytes")}
        info["kv_mode"] = next(k for k, v in KV_MODES.items() if v == out.kv_mode)
        return info

    def cells(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Token ids, original positions and regions of the live cells, in cache order
        [initial | separators | recent]."""
        n = self.info()["n_live"]
        tokens, positions, regions = (np.empty(max(n, 1), np.int32) for _ in range(3))
        check(lib.se_cache_get_cells(self.ptr, ffi.from_buffer("int32_t[]", tokens), ffi.from_buffer("int32_t[]", positions),
                                     ffi.from_buffer("int32_t[]", regions), n))
        return tokens[:n], positions[:n], [REGIONS[r] for r in regions[:n]]


class Sampler(_Handle):
    """Next-token sampling with llama.cpp's defaults; invalid parameters raise InvalidArgumentError."""
    _kind = "sampler"

    def __init__(self, n_vocab: int, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 repeat_penalty: float, repeat_last_n: int = 64, seed: int = 0):
        params = ffi.new("se_sampler_params *", lib.se_sampler_default_params())
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("repeat_penalty", repeat_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
            setattr(params, name, float(value))
        params.top_k = _int_arg("top_k", top_k)
        params.repeat_last_n = _int_arg("repeat_last_n", repeat_last_n)
        params.seed = _int_arg("seed", seed, 0) & 0xFFFFFFFFFFFFFFFF
        out = ffi.new("se_sampler **")
        check(lib.se_sampler_new(params, n_vocab, out))
        super().__init__(out[0], lib.se_sampler_free)

    def accept(self, token: int) -> None:
        check(lib.se_sampler_accept(self.ptr, int(token)))

    def sample(self, logits: np.ndarray) -> int:
        row = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
        out = ffi.new("int32_t *")
        check(lib.se_sampler_sample(self.ptr, ffi.from_buffer("float[]", row), out))
        return int(out[0])
