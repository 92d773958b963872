"""Owning wrappers over the C handles: each frees its native memory exactly once, on close(), at
the end of a with-block, or when it is garbage collected.

Threads: every native call on a Context runs under the context's lock, so calls from several
threads are serialized, never concurrent (the C core's one-caller rule). close() and the finalizer
cancel a running call and wait for it to return before freeing; a call that does not return in
time leaks its memory rather than freeing it under the call. Calls made from the main thread run
on a helper thread while the main thread waits, so that Ctrl-C (KeyboardInterrupt) cancels them
within a layer's time instead of waiting for a long prefill to end."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref

import numpy as np

from ._ffi import ffi, lib
from .errors import InvalidArgumentError, ModelLoadError, SepedgeError, check, check_with_message

# "none": the file's metadata, vocabulary and separators only, for a backend outside the library (Triton)
DEVICES = {"cpu": lib.SE_DEVICE_CPU, "cuda": lib.SE_DEVICE_CUDA, "none": lib.SE_DEVICE_NONE}
KV_TYPES = {"f32": lib.SE_KV_F32, "f16": lib.SE_KV_F16}
KV_MODES = {"full": lib.SE_KV_MODE_FULL, "streamingllm": lib.SE_KV_MODE_STREAMINGLLM,
            "sepllm": lib.SE_KV_MODE_SEPLLM, "sepllm-stream": lib.SE_KV_MODE_SEPLLM_STREAM,
            "sepllm-slide": lib.SE_KV_MODE_SEPLLM_SLIDE, "sepllm-runs": lib.SE_KV_MODE_SEPLLM_RUNS}
REGIONS = {1: "init", 2: "sep", 3: "recent"}


INT32_MAX = 2 ** 31 - 1
MAX_THREADS = 256       # se_context_params.n_threads: explicit counts above this are refused
CLOSE_WAIT_SECONDS = 30  # how long close() and the finalizer wait for a cancelled call to return


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


def _int_arg(name: str, value, lo: int | None = None, hi: int = INT32_MAX) -> int:
    """An integer parameter in [lo, hi] (hi defaults to the C int32 range), else InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    lo = -INT32_MAX - 1 if lo is None else lo
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def token_array(tokens, n_vocab: int) -> np.ndarray:
    """Token ids as int32, each an integer in [0, n_vocab): floats, bools and out-of-range values are
    refused with InvalidArgumentError (never truncated or wrapped)."""
    if isinstance(tokens, (str, bytes)):
        raise InvalidArgumentError("tokens must be a sequence of integer token ids, not text")
    try:
        items = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
    except TypeError:
        raise InvalidArgumentError(f"tokens must be a sequence of integer token ids, got {tokens!r}") from None
    for i, t in enumerate(items):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InvalidArgumentError(f"token {i} must be an integer token id, got {t!r}")
        if not 0 <= t < n_vocab:
            raise InvalidArgumentError(f"token id {t} (index {i}) is outside the vocabulary (0..{n_vocab - 1})")
    return np.asarray(items, dtype=np.int32).reshape(-1)


def _wait_idle(lock: threading.Lock, cancel, ptr) -> bool:
    """Cancel the call running on a context (if any) and take its lock; False if it did not return."""
    cancel(ptr)
    return lock.acquire(timeout=CLOSE_WAIT_SECONDS)


def _free_context(ptr, lock: threading.Lock, pool_box: list) -> None:
    # the finalizer: never frees under a running call (at interpreter exit, daemon threads may be
    # inside se_decode); if the call does not return, the memory is leaked instead
    if not _wait_idle(lock, lib.se_context_cancel, ptr):
        return
    try:
        lib.se_context_free(ptr)
    finally:
        lock.release()
    if pool_box:
        pool_box.pop().shutdown(wait=False)


def _free_model(ptr, context_locks: list) -> None:
    # contexts go first (Model.close, or their own finalizers); this waits for any still running
    held = []
    try:
        for lock in context_locks:
            if not lock.acquire(timeout=CLOSE_WAIT_SECONDS):
                return  # a call still runs on this model: leak rather than free under it
            held.append(lock)
        lib.se_model_free(ptr)
    finally:
        for lock in held:
            lock.release()


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
        try:
            check(lib.se_model_load(os.fsencode(self.path), params, out))
        except ValueError:  # a NUL byte in the path
            raise InvalidArgumentError(f"model path {self.path!r} contains a NUL byte") from None
        self._context_locks: list[threading.Lock] = []
        self._ptr = out[0]
        self._finalizer = weakref.finalize(self, _free_model, out[0], self._context_locks)
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

    def meta_keys(self) -> list[str]:
        """Every GGUF metadata key, in file order."""
        return [ffi.string(lib.se_model_meta_key(self.ptr, i)).decode("utf-8", "replace")
                for i in range(lib.se_model_meta_count(self.ptr))]

    def meta_is_array(self, key: str) -> bool:
        i = lib.se_model_meta_find(self.ptr, key.encode())
        typ = ffi.new("int32_t *")
        check(lib.se_model_meta_type(self.ptr, i, typ, ffi.NULL, ffi.NULL))
        return typ[0] == lib.SE_META_ARRAY

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
                 n_local: int | None = None, n_cache: int | None = None, slide_in_pass: bool = False):
        if kv_type not in KV_TYPES:
            raise InvalidArgumentError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if kv_mode not in KV_MODES:
            raise InvalidArgumentError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
        params = ffi.new("se_context_params *", lib.se_context_default_params())
        params.n_ctx = _int_arg("n_ctx", n_ctx, 0)
        params.n_batch = _int_arg("n_batch", n_batch, 1)
        params.n_threads = _int_arg("n_threads", n_threads, 0, MAX_THREADS)
        params.kv_type = KV_TYPES[kv_type]
        params.kv_mode = KV_MODES[kv_mode]
        for name, value in (("n_init", n_init), ("n_sep", n_sep), ("n_local", n_local), ("n_cache", n_cache)):
            setattr(params, name, -1 if value is None else _int_arg(name, value, 0))
        params.slide_in_pass = bool(slide_in_pass)
        out = ffi.new("se_context **")
        check(lib.se_context_new(model.ptr, params, out))
        self._lock = threading.Lock()   # held for every native call on the context
        self._pool_box: list = []       # the helper thread of main-thread calls, made when first needed
        self._ptr = out[0]
        self._finalizer = weakref.finalize(self, _free_context, out[0], self._lock, self._pool_box)
        self.model = model
        model._contexts.add(self)
        model._context_locks.append(self._lock)

    def close(self) -> None:
        """Free the context; a call running in another thread is cancelled first and waited for."""
        ptr = self._ptr
        if ptr is None:
            return
        if not _wait_idle(self._lock, lib.se_context_cancel, ptr):
            raise SepedgeError(f"the context is still running a call after {CLOSE_WAIT_SECONDS} s; not freed")
        try:
            self._ptr = None
            self._finalizer.detach()
            lib.se_context_free(ptr)
        finally:
            self._lock.release()
        if self._pool_box:
            self._pool_box.pop().shutdown(wait=False)

    def cancel(self) -> None:
        """Make the running (or next) decode stop at its next layer with CancelledError. Any thread;
        the request stays until uncancel()."""
        ptr = self._ptr
        if ptr is not None:
            lib.se_context_cancel(ptr)

    def uncancel(self) -> None:
        with self._lock:
            check(lib.se_context_uncancel(self.ptr))

    @property
    def cancelled(self) -> bool:
        ptr = self._ptr
        return ptr is not None and bool(lib.se_context_cancelled(ptr))

    def _call(self, fn, *args) -> int:
        """fn(ptr, *args) under the lock. From the main thread, the call runs on a helper thread while
        the main thread waits interruptibly: Ctrl-C then cancels it (within a layer) and, once it has
        returned, KeyboardInterrupt is raised with the cache as se_decode leaves a cancelled call."""
        with self._lock:
            ptr = self.ptr
            if threading.current_thread() is not threading.main_thread():
                return check(fn(ptr, *args))
            if not self._pool_box:
                self._pool_box.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sepedge-call"))
            future = self._pool_box[0].submit(fn, ptr, *args)
            try:
                status = future.result()
            except KeyboardInterrupt:
                lib.se_context_cancel(ptr)
                while True:  # the call must be over before the caller may touch its buffers again
                    try:
                        future.result()
                        break
                    except KeyboardInterrupt:
                        continue
                lib.se_context_uncancel(ptr)
                raise
            # the status' message lives in the helper thread's last-error slot: read it there
            if status < 0:
                message = self._pool_box[0].submit(lambda: ffi.string(lib.se_last_error())).result()
                check_with_message(status, message)
            return status

    def decode(self, tokens, n_logits: int = 1) -> np.ndarray:
        """Feed tokens after those in the cache; the logits of the last n_logits, (n_logits, n_vocab)."""
        toks = token_array(tokens, self.model.n_vocab)
        n_logits = min(_int_arg("n_logits", n_logits, 0), len(toks))
        logits = np.empty((n_logits, self.model.n_vocab), dtype=np.float32)
        self._call(lib.se_decode, ffi.from_buffer("int32_t[]", toks), len(toks),
                   ffi.from_buffer("float[]", logits) if n_logits else ffi.NULL, n_logits)
        return logits

    def clear(self) -> None:
        with self._lock:
            check(lib.se_cache_clear(self.ptr))

    def truncate(self, n_keep: int) -> None:
        with self._lock:
            check(lib.se_cache_truncate(self.ptr, _int_arg("n_keep", n_keep, 0)))

    def keep(self, n_keep: int) -> None:
        """Make the first n_keep tokens initial ones (never evicted)."""
        with self._lock:
            check(lib.se_cache_keep(self.ptr, _int_arg("n_keep", n_keep, 0)))

    # --- embeddings and state (CPU backend)

    def embeddings(self, tokens, pooling: str = "mean") -> np.ndarray:
        """The final hidden states of `tokens`, fed after those in the cache, pooled ("mean" or
        "last"): (n_embd,) float32."""
        poolings = {"mean": lib.SE_POOLING_MEAN, "last": lib.SE_POOLING_LAST}
        if pooling not in poolings:
            raise InvalidArgumentError(f"pooling must be one of {sorted(poolings)}, got {pooling!r}")
        check(lib.se_embeddings_enable(self.ptr, 1))
        try:
            self.decode(tokens, n_logits=0)
            out = np.empty(self.model.info["n_embd"], dtype=np.float32)
            check(lib.se_embeddings_get(self.ptr, poolings[pooling], ffi.from_buffer("float[]", out), len(out)))
        finally:
            lib.se_embeddings_enable(self.ptr, 0)
        return out

    def state_save(self) -> bytes:
        size = ffi.new("uint64_t *")
        check(lib.se_state_size(self.ptr, size))
        buf = bytearray(size[0])
        check(lib.se_state_save(self.ptr, ffi.from_buffer(buf), size[0]))
        return bytes(buf)

    def state_load(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"a cache state is bytes, got {type(data).__name__}")
        check(lib.se_state_load(self.ptr, ffi.from_buffer(data), len(data)))

    def info(self) -> dict:
        out = ffi.new("se_cache_info *")
        with self._lock:
            check(lib.se_cache_get_info(self.ptr, out))
        return self._info_dict(out)

    @staticmethod
    def _info_dict(out) -> dict:
        info = {k: getattr(out, k) for k in ("n_cells", "n_init", "n_sep", "n_local", "n_live", "n_live_init",
                                             "n_live_sep", "n_live_recent", "n_seen", "n_evicted", "sum_visible",
                                             "kv_bytes", "n_spare")}
        info["kv_mode"] = next(k for k, v in KV_MODES.items() if v == out.kv_mode)
        return info

    def snapshot(self) -> tuple[dict, tuple[np.ndarray, np.ndarray, list[str]]]:
        """info() and cells() read under one hold of the lock: the same cache state, never half of a
        forward pass running in another thread."""
        out = ffi.new("se_cache_info *")
        with self._lock:
            check(lib.se_cache_get_info(self.ptr, out))
            n = out.n_live
            tokens, positions, regions = (np.empty(max(n, 1), np.int32) for _ in range(3))
            check(lib.se_cache_get_cells(self.ptr, ffi.from_buffer("int32_t[]", tokens),
                                         ffi.from_buffer("int32_t[]", positions), ffi.from_buffer("int32_t[]", regions), n))
        return self._info_dict(out), (tokens[:n], positions[:n], [REGIONS[r] for r in regions[:n]])

    def cells(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Token ids, original positions and regions of the live cells, in cache order
        [initial | separators | recent]."""
        n = self.info()["n_live"]
        tokens, positions, regions = (np.empty(max(n, 1), np.int32) for _ in range(3))
        with self._lock:
            check(lib.se_cache_get_cells(self.ptr, ffi.from_buffer("int32_t[]", tokens),
                                         ffi.from_buffer("int32_t[]", positions), ffi.from_buffer("int32_t[]", regions), n))
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
        params.top_k = _int_arg("top_k", top_k, 0)
        params.repeat_last_n = _int_arg("repeat_last_n", repeat_last_n, 0, 1 << 24)
        params.seed = _int_arg("seed", seed, 0, 2 ** 64 - 1)
        out = ffi.new("se_sampler **")
        check(lib.se_sampler_new(params, _int_arg("n_vocab", n_vocab, 1), out))
        super().__init__(out[0], lib.se_sampler_free)
        self.n_vocab = n_vocab

    def accept(self, token: int) -> None:
        check(lib.se_sampler_accept(self.ptr, _int_arg("token", token, 0, self.n_vocab - 1)))

    def sample(self, logits: np.ndarray) -> int:
        """A token from one row of n_vocab logits; NumericalError for NaN or +inf among them."""
        row = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
        if row.size != self.n_vocab:  # the C sampler reads n_vocab floats
            raise InvalidArgumentError(f"sample takes {self.n_vocab} logits (one per token), got {row.size}")
        out = ffi.new("int32_t *")
        check(lib.se_sampler_sample(self.ptr, ffi.from_buffer("float[]", row), out))
        return int(out[0])
