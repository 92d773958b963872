"""`Engine`: load a GGUF model and generate text, in the shape of llama-cpp-python's `Llama`.

    from sepedge import Engine
    with Engine("model.gguf") as llm:
        print(llm.generate("The capital of France is", max_tokens=16, temperature=0))
        for chunk in llm.create_chat_completion([{"role": "user", "content": "Hi!"}], stream=True):
            print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""

from __future__ import annotations

import array
import codecs
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from . import chat
from . import vocab as V
from ._native import Context, Model, Sampler, token_array
from .errors import CancelledError, ContextFullError, InvalidArgumentError, SepedgeError
from .tokenizer import Tokenizer

# llama.cpp's sampling defaults
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


ENGINE_DEVICES = ("cpu", "cuda", "triton")
FED_HISTORY = 65536  # tokens of each Engine's history of fed tokens (cache_snapshot): 256 KiB of int32


class _OwnerLock:
    """The engine's one-operation-at-a-time lock: other threads wait, the owning thread may re-enter
    (a generation started inside another's loop), and any thread may release (a stream finished by
    the garbage collector in another thread)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            while self._owner not in (None, me):
                self._cond.wait()
            self._owner, self._depth = me, self._depth + 1

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Generation:
    """One generation, an iterator of text chunks; once exhausted, finish_reason ("stop", "length",
    or "cancelled" after cancel()), the generated tokens and text, and timings are set.

    Options on the way from logits to token (as OpenAI defines them): logit_bias adds to the logits
    of token ids; frequency_penalty subtracts its value times the number of times a token was
    generated so far, presence_penalty its value once a token was generated; logprobs (an int)
    records each token's log-probability under those logits and the `logprobs` most likely tokens'.
    """

    def __init__(self, engine: Engine, prompt_tokens: list[int], max_tokens: int | None, stop: list[str],
                 sampler: Sampler, prefill: Callable[[], np.ndarray], chat: bool = False, *,
                 logit_bias: dict[int, float] | None = None, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logprobs: int | None = None, json_mode: bool = False):
        self.engine, self.prompt_tokens, self.max_tokens, self.stop, self.sampler = \
            engine, prompt_tokens, max_tokens, stop, sampler
        self._prefill, self._chat = prefill, chat
        self.n_prompt = len(prompt_tokens)  # prompt length (a chat's: the whole conversation so far)
        self.tokens: list[int] = []
        self.n_fed = 0  # generated tokens that went into the cache (all but a final unfed one)
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_seconds = self.generate_seconds = 0.0
        self.first_token_time: float | None = None  # perf_counter() when the first token was sampled
        self.logit_bias = logit_bias or {}
        self.frequency_penalty, self.presence_penalty = float(frequency_penalty), float(presence_penalty)
        self.n_logprobs = logprobs
        # per generated token with logprobs: (token, logprob, [(token, logprob) of the top n_logprobs])
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self._logprobs_taken = 0
        self._cancelled = False
        self.constraint = None
        if json_mode:
            from .jsonmode import JSONConstraint
            self.constraint = JSONConstraint(engine._json_texts(), engine.tokenizer.eog_ids)
        self._chunks = self._run()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def cancel(self) -> None:
        """Stop this generation from any thread: the native call running for it returns within a
        layer, and the iteration ends with finish_reason "cancelled" (the text so far is kept)."""
        self.engine._cancel_generation(self)

    def take_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """The logprob entries recorded since the last call (for streamed chunks)."""
        out = self.logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.logprobs)
        return out

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def _held_back(self, emitted: int) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        tail = self.text[emitted:]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _process(self, logits: np.ndarray, counts: dict[int, int]) -> np.ndarray:
        """The logits with bias and penalties applied (a copy when anything changes)."""
        if not self.logit_bias and not (counts and (self.frequency_penalty or self.presence_penalty)):
            return logits
        logits = np.array(logits, dtype=np.float32)
        for t, b in self.logit_bias.items():
            logits[t] += b
        if counts and (self.frequency_penalty or self.presence_penalty):
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            logits[ids] -= c * self.frequency_penalty + self.presence_penalty
        return logits

    def _record_logprobs(self, logits: np.ndarray, token: int) -> None:
        x = logits.astype(np.float64)
        finite = np.isfinite(x)
        m = x[finite].max()
        lse = m + np.log(np.exp(x[finite] - m).sum())
        lp = x - lse
        top: list[tuple[int, float]] = []
        if self.n_logprobs:
            k = min(self.n_logprobs, len(lp))
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(i), float(lp[i])) for i in idx]
        self.logprobs.append((token, float(lp[token]), top))

    def _run(self) -> Iterator[str]:
        eng = self.engine
        eng._begin(self)
        try:
            yield from self._steps()
        except CancelledError:
            if not self._cancelled:
                raise
            self.finish_reason = "cancelled"
        except SepedgeError:
            if not self._cancelled:  # e.g. "the context is closed" after Engine.close() cancelled us
                raise
            self.finish_reason = "cancelled"
        finally:
            eng._end(self)

    def _steps(self) -> Iterator[str]:
        eng, tok = self.engine, self.engine.tokenizer
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        emitted, stopped_by_string = 0, False
        counts: dict[int, int] = {}
        t0 = time.perf_counter()
        if self._cancelled:
            raise CancelledError("cancelled before the prompt was processed")
        logits = self._prefill()
        self.prompt_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in self.prompt_tokens:
            self.sampler.accept(t)
        try:
            while True:
                if self._cancelled:
                    self.finish_reason = "cancelled"
                    break
                if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                logits = self._process(logits, counts)
                if self.constraint is not None:
                    logits = self.constraint.mask(logits)
                token = self.sampler.sample(logits)
                if self.first_token_time is None:
                    self.first_token_time = time.perf_counter()
                if token in tok.eog_ids:
                    self.finish_reason = "stop"
                    break
                if self.n_logprobs is not None:
                    self._record_logprobs(logits, token)
                if self.constraint is not None:
                    self.constraint.accept(token)
                counts[token] = counts.get(token, 0) + 1
                self.sampler.accept(token)
                self.tokens.append(token)
                self.text += decoder.decode(tok.decode([token]))
                hits = [i for s in self.stop if (i := self.text.find(s, max(0, emitted - len(s)))) >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.finish_reason, stopped_by_string = "stop", True
                    break
                safe = len(self.text) - self._held_back(emitted)
                if safe > emitted:
                    yield self.text[emitted:safe]
                    emitted = safe
                if not eng.sparse and eng._seen >= eng.n_ctx:
                    self.finish_reason = "length"  # no cell left for the token just generated
                    break
                if self._cancelled:
                    raise CancelledError("cancelled")
                try:
                    logits = eng._decode([token])
                except ContextFullError:  # sepllm with unlimited separators, full
                    self.finish_reason = "length"
                    break
                self.n_fed += 1
            if not stopped_by_string:
                self.text += decoder.decode(b"", final=True)
            if len(self.text) > emitted:
                yield self.text[emitted:]
        finally:
            self.generate_seconds = time.perf_counter() - t0
            eng._generation_done(self)


class Engine:
    """A model, its tokenizer and a KV cache.

    Args:
        model_path: a GGUF file; None for the embedded default model (SmolLM2-135M-Instruct).
        n_ctx: KV cache cells; 0 = the model's training context.
        n_batch: tokens per forward pass when a prompt is processed in chunks.
        n_threads: CPU threads; None = one per core.
        seed: seed of the sampling random stream; None = random.
        kv_type: "f16" (default) or "f32" storage for keys and values.
        device: "cpu", "cuda" (where built with CUDA), or "triton" (torch's current GPU through the
            Triton kernels of sepedge.kernels; needs `pip install sepedge[triton]`).
        kv_mode: which tokens the KV cache keeps: "full" (all, up to n_ctx), "sepllm" (training-free
            SepLLM: initial, separators, last n_local; original positions), "sepllm-stream" (streaming
            SepLLM, n_cache cells, unbounded input), "streamingllm" (initial + last n_local),
            "sepllm-slide" / "sepllm-runs" (SepLLM with a window that slides every token and a FIFO of
            the n_sep newest separators that left it, n_init + n_sep + n_local <= n_cache; runs: one
            separator per run of consecutive ones).
        n_init, n_sep, n_local, n_cache: SepLLM sizes; None = the model's `sepllm.*` defaults.
        keep_system: in chat, the rendered system prompt joins the initial region, so a long chat
            never evicts it.
        parse_special_in_content: in chat, parse special-token text inside message contents (e.g. a
            user typing "<|im_end|>") as those tokens. Off by default, as in llama.cpp's server: a
            message cannot forge turns; the template's own special tokens are always parsed.

    Threads: one operation runs at a time (others wait); cancel() or Generation.cancel() stop a
    running one from any thread, close() cancels and waits. Ctrl-C in the main thread interrupts a
    native call within a layer; the cache is then as it was before that call (or empty where a
    sparse cache had evicted tokens during it) and the engine stays usable.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, n_ctx: int = 0, n_batch: int = 512,
                 n_threads: int | None = None, seed: int | None = None, kv_type: str = "f16", device: str = "cpu",
                 kv_mode: str = "full", n_init: int | None = None, n_sep: int | None = None,
                 n_local: int | None = None, n_cache: int | None = None, keep_system: bool = True,
                 parse_special_in_content: bool = False, slide_in_pass: bool = False):
        if model_path is None:
            from .default_model import default_model
            model_path = default_model()
        self.model_path = os.fspath(model_path)
        self.device = device
        self.parse_special_in_content = bool(parse_special_in_content)
        if device not in ENGINE_DEVICES:
            raise InvalidArgumentError(f"device must be one of {list(ENGINE_DEVICES)}, got {device!r}")
        self._weights = None  # the Triton backend's weights on the GPU, shared with spawned engines
        if device == "triton":
            from .triton_backend import load_model
            self._model, self._weights = load_model(self.model_path)
        else:
            self._model = Model(self.model_path, device)
        try:
            self.tokenizer = Tokenizer.from_model(self._model)
            if not self._model.separators:  # a GGUF from another converter: derive them as `convert` does
                t = self.tokenizer
                self._model.separators = V.derive_separator_ids(t.tokens, t.token_types, t.model, t.bos_id)
            self._ctx_args = dict(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads or 0, kv_type=kv_type,
                                  kv_mode=kv_mode, n_init=n_init, n_sep=n_sep, n_local=n_local, n_cache=n_cache)
            if slide_in_pass:  # native contexts only (the CUDA backend ignores it)
                if device == "triton":
                    raise InvalidArgumentError("slide_in_pass is not available on the triton backend")
                self._ctx_args["slide_in_pass"] = True
            self._ctx = self._new_context()
        except BaseException:
            self._model.close()
            raise
        self._owns_model = True
        self._init_state(kv_mode, keep_system, seed)

    def _new_context(self):
        """A KV cache of this Engine's configuration: a native context (cpu, cuda) or, on the Triton
        backend, one whose cells the native cache policy plans and whose K/V live in torch tensors."""
        if self._weights is not None:
            from .triton_backend import TritonContext
            return TritonContext(self._model, self._weights, **self._ctx_args)
        return Context(self._model, **self._ctx_args)

    def _init_state(self, kv_mode: str, keep_system: bool, seed: int | None) -> None:
        self._lock = _OwnerLock()  # one operation at a time (generations hold it while they run)
        self._cancel_mu = threading.Lock()
        self._active: Generation | None = None
        self.kv_mode = kv_mode
        self.n_ctx: int = self._ctx.info()["n_cells"]
        self.keep_system = keep_system
        self._rng = random.Random(seed)
        self._seen = 0  # tokens fed since the last reset
        # full mode: the cached tokens, for reusing a shared prompt prefix (sparse caches are not
        # rewound: what they evicted is gone)
        self._tokens: list[int] | None = [] if kv_mode == "full" else None
        self._chat_text: str | None = None  # the conversation text the cache holds, to append a turn to
        # the tokens fed since the last reset, for showing what the cache kept and what it evicted (the
        # cells hold only the kept ones); the last FED_HISTORY of them, so memory stays bounded
        self._fed_mu = threading.Lock()  # a server's request thread reads them while a generation feeds
        self._fed = array.array("i")
        self._fed_start = 0  # the position of _fed[0]

    # --- lifetime

    def spawn(self, seed: int | None = None) -> Engine:
        """Another Engine on the same loaded model (weights and tokenizer shared, nothing copied)
        with its own KV cache of the same configuration: a server's slot. Closing it closes only
        its cache; closing this Engine closes them all."""
        e = Engine.__new__(Engine)
        e.model_path, e.device, e._model, e.tokenizer = self.model_path, self.device, self._model, self.tokenizer
        e._weights = self._weights
        e._ctx_args = dict(self._ctx_args)
        e._ctx = e._new_context()
        e._owns_model = False
        e.parse_special_in_content = self.parse_special_in_content
        e._init_state(self.kv_mode, self.keep_system, seed)
        return e

    def close(self) -> None:
        """Free the model and cache. A call running in another thread is cancelled and waited for;
        a generation in progress ends with finish_reason "cancelled"."""
        self.cancel()
        if getattr(self, "_weights", None) is not None:
            self._ctx.close()  # a Triton context is not among the native model's contexts
        if getattr(self, "_owns_model", True):
            self._model.close()  # closes the context too (waiting for a running native call)
        else:
            self._ctx.close()

    def cancel(self) -> None:
        """Stop the running operation, from any thread (the server's disconnects, a UI's stop
        button): a generation ends with finish_reason "cancelled", eval() raises CancelledError.
        The cache is as it was before the interrupted native call, or empty where a sparse cache
        evicted tokens during it; the engine stays usable. Without a running operation it does nothing."""
        with self._cancel_mu:
            if self._active is not None:
                self._active._cancelled = True
            if self._lock._owner is not None and not self._ctx.closed:
                self._ctx.cancel()

    def _cancel_generation(self, g: Generation) -> None:
        with self._cancel_mu:
            g._cancelled = True
            if self._active is g and not self._ctx.closed:
                self._ctx.cancel()

    def _begin(self, g: Generation | None = None) -> None:
        """Start an operation: wait for the engine, clear stale cancel requests."""
        self._lock.acquire()
        with self._cancel_mu:
            if self._lock._depth == 1:
                self._active = g
                if not self._ctx.closed:
                    self._ctx.uncancel()

    def _end(self, g: Generation | None = None) -> None:
        try:
            with self._cancel_mu:
                if self._lock._depth == 1:
                    self._active = None
                    if not self._ctx.closed:
                        self._ctx.uncancel()
        finally:
            self._lock.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record_fed(self, ids: list[int] | None, start: int | None = None) -> None:
        """Append fed tokens to the history, or (ids None) restart it empty at position `start`."""
        with self._fed_mu:
            if ids is None:
                self._fed, self._fed_start = array.array("i"), start or 0
                return
            self._fed.extend(ids)
            if len(self._fed) > FED_HISTORY:
                drop = len(self._fed) - FED_HISTORY
                del self._fed[:drop]
                self._fed_start += drop

    # --- model facts

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def n_embd(self) -> int:
        return self._model.info["n_embd"]

    @property
    def n_ctx_train(self) -> int:
        return self._model.info["n_ctx_train"]

    @property
    def sparse(self) -> bool:
        """Whether the cache evicts tokens (every mode but "full")."""
        return self.kv_mode != "full"

    def kv_stats(self) -> dict:
        """The KV cache: mode, capacity, live cells per region, tokens seen and evicted, bytes."""
        return self._kv_stats(self._ctx.info())

    @staticmethod
    def _kv_stats(i: dict) -> dict:
        return {"mode": i["kv_mode"], "capacity": i["n_cells"], "spare_cells": i.get("n_spare", 0),
                "n_init": i["n_init"], "n_sep": i["n_sep"],
                "n_local": i["n_local"], "live": i["n_live"], "live_init": i["n_live_init"], "live_sep": i["n_live_sep"],
                "live_recent": i["n_live_recent"], "tokens_seen": i["n_seen"], "tokens_evicted": i["n_evicted"],
                "kv_bytes": i["kv_bytes"], "avg_attended": i["sum_visible"] / i["n_seen"] if i["n_seen"] else 0.0}

    def cache_snapshot(self) -> dict:
        """What the cache holds, read at one moment even while a generation runs in another thread
        (between two of its forward passes): kv_stats(), the live cells in cache order [initial |
        separators | recent] as (position, token, region), and the ids of the tokens fed since the last
        reset (at most the last FED_HISTORY) from position `start` on, each with its region: the live
        cell's, or "evicted"."""
        # both read under the history's lock: a pass recording (and trimming) between the two reads
        # would move `start` past the positions the cells were read at
        with self._fed_mu:
            i, (tokens, positions, regions) = self._ctx.snapshot()
            fed, start = self._fed.tolist(), self._fed_start
        n_seen = i["n_seen"]
        fed = fed[:max(0, n_seen - start)]  # a cache emptied before its history was restarted
        ids = fed + [-1] * (n_seen - start - len(fed))  # a pass that ended before its tokens were recorded
        where = ["evicted"] * len(ids)
        for t, p, r in zip(tokens.tolist(), positions.tolist(), regions):
            if start <= p < n_seen:
                where[p - start] = r
                if ids[p - start] < 0:
                    ids[p - start] = t
        return {"kv": self._kv_stats(i), "cells": [[p, t, r] for t, p, r in zip(tokens.tolist(), positions.tolist(), regions)],
                "start": start, "ids": ids, "regions": where}

    @property
    def info(self) -> dict:
        return dict(self._model.info, separators=self._model.separators)

    def metadata(self, key: str, default=None):
        """A GGUF metadata value of the model."""
        return self._model.meta(key, default)

    def metadata_dict(self, arrays: bool = False) -> dict:
        """Every GGUF metadata key and its value (array values left out unless arrays=True)."""
        return {k: self._model.meta(k) for k in self._model.meta_keys() if arrays or not self._model.meta_is_array(k)}

    # --- tokens

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids; add_bos adds BOS when the model uses one, special parses special-token text."""
        if not isinstance(text, (str, bytes)):
            raise InvalidArgumentError(f"text must be str or bytes, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_bos=None if add_bos else False, special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of the tokens (control tokens left out unless special=True)."""
        return self.tokenizer.decode(self._check_tokens(tokens), special=special)

    def _check_tokens(self, tokens) -> list[int]:
        return token_array(tokens, self.n_vocab).tolist()  # integers in the vocabulary, nothing coerced

    # --- evaluation

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._lock:
            self._ctx.clear()
            self._seen = 0
            self._tokens = [] if self._tokens is not None else None
            self._chat_text = None
            self._record_fed(None)

    def _decode(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        try:
            logits = self._ctx.decode(ids, n_logits=len(ids) if all_logits else 1)
        except BaseException:
            self._resync()
            raise
        self._seen += len(ids)
        self._record_fed(ids)
        if self._tokens is not None:
            self._tokens += ids
        return logits if all_logits else logits[0]

    def _resync(self) -> None:
        """After a failed native call: the cache is as it was, or was cleared (se_decode's promise)."""
        if self._ctx.closed:
            return
        if self._ctx.info()["n_seen"] != self._seen:
            self._seen = 0
            self._tokens = [] if self._tokens is not None else None
            self._chat_text = None
            self._record_fed(None)

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens after those already in the cache. Returns the logits of the last one,
        (n_vocab,), or with all_logits those of every one, (len(tokens), n_vocab).
        NumericalError when a logit or hidden state is not finite; CancelledError after cancel()."""
        ids = self._check_tokens(tokens)
        if not ids:
            raise InvalidArgumentError("no tokens to evaluate")
        self._begin()
        try:
            if not self.sparse:
                self._check_room(self._seen + len(ids))
            self._chat_text = None
            return self._decode(ids, all_logits)
        finally:
            self._end()

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens`, evaluated from an empty cache: (len(tokens), n_vocab).
        Sparse modes process any length, in chunks that never exceed the cache."""
        ids = self._check_tokens(tokens)
        with self._lock:
            self.reset()
            return self.eval(ids, all_logits=True)

    def embed(self, text: str | bytes | Sequence[int], pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """The embedding of a text (or token ids): the model's final hidden states (after the output
        norm, as llama.cpp's embeddings), pooled over the tokens ("mean" or "last"), L2-normalized
        unless normalize=False. Uses (and empties) the KV cache; sparse modes embed any length."""
        ids = self.tokenize(text) if isinstance(text, (str, bytes)) else self._check_tokens(text)
        if not ids:
            raise InvalidArgumentError("nothing to embed: the input is empty")
        with self._lock:
            self.reset()
            if not self.sparse:
                self._check_room(len(ids))
            try:
                v = self._ctx.embeddings(ids, pooling)
            finally:
                self.reset()
        if normalize:
            n = float(np.linalg.norm(v.astype(np.float64)))
            v = v / n if n > 0 else v
        return v

    def save_state(self) -> EngineState:
        """A copy of the KV cache and what the Engine knows about it. A sparse cache's state holds at
        most n_cache cells: (2 * n_layer * n_head_kv * head_dim * 2 bytes) each with the f16 cache,
        whatever the length of the conversation."""
        with self._lock:
            return EngineState(self._ctx.state_save(), self._seen,
                               None if self._tokens is None else list(self._tokens), self._chat_text, self.kv_mode)

    def load_state(self, state: EngineState) -> None:
        """Restore a state from save_state() of an Engine with the same model and cache configuration."""
        if not isinstance(state, EngineState):
            raise InvalidArgumentError(f"load_state takes what save_state() returned, got {type(state).__name__}")
        if state.kv_mode != self.kv_mode:
            raise InvalidArgumentError(f"the state is of a {state.kv_mode} cache, this Engine's is {self.kv_mode}")
        with self._lock:
            self._ctx.state_load(state.cache)
            self._seen = state.n_tokens
            self._tokens = None if state.tokens is None else list(state.tokens)
            self._record_fed(None, state.n_tokens)  # the tokens before are not known
            self._chat_text = state.chat_text

    def cached_prefix(self, tokens: Sequence[int] | None = None, messages=None) -> int:
        """How much of a prompt the cache already holds, so a server can send a request to the cache
        that will evaluate the least: for a conversation, the characters of its rendered text that
        continue the cached conversation; for tokens (full mode), the common token prefix."""
        if messages is not None:
            if not self._chat_text:
                return 0
            t = self.tokenizer
            try:
                text = chat.render(t.chat_template, messages, True, t.bos_text, t.eos_text)
            except InvalidArgumentError:
                return 0
            return len(self._chat_text) if text.startswith(self._chat_text) and len(text) > len(self._chat_text) else 0
        if tokens is None or self._tokens is None:
            return 0
        k = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            k += 1
        return k

    def _check_room(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextFullError(f"{n} tokens exceed the context window of {self.n_ctx} "
                                   "(set n_ctx, or use a sparse kv_mode)")

    def _feed(self, tokens: list[int]) -> np.ndarray:
        """Logits after the prompt `tokens`, evaluating only what differs from the tokens cached
        (full mode); a sparse cache starts over."""
        self._chat_text = None
        if self._tokens is None:
            self.reset()
            return self._decode(tokens)
        self._check_room(len(tokens))
        k = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            k += 1
        k = min(k, len(tokens) - 1)  # at least one token to evaluate: its logits are wanted
        if k < self._seen:
            self._ctx.truncate(k)
            self._seen, self._tokens = k, self._tokens[:k]
            with self._fed_mu:
                del self._fed[max(0, k - self._fed_start):]
        return self._decode(tokens[k:])

    def _feed_chat(self, messages: list[dict]) -> tuple[list[int], np.ndarray]:
        """Prompt tokens and logits for a conversation. When the cache holds the conversation so far
        (the previous turns, reply included), only the new turn is fed: a chat can go on forever in
        a streaming cache."""
        text, spans = self._render_chat(messages, True)
        if self._chat_text and text.startswith(self._chat_text) and len(text) > len(self._chat_text):
            ids = self._chat_tokens(text, spans, len(self._chat_text), add_bos=False)
            if not self.sparse:
                self._check_room(self._seen + len(ids))
            logits = self._decode(ids)
        else:
            ids = self.format_chat(messages)
            if self.sparse or self.keep_system:
                self.reset()
                if self.keep_system:
                    self._pin_system_prompt(messages)
                logits = self._decode(ids)
            else:
                logits = self._feed(ids)
        self._chat_text = text
        return ids, logits

    def _pin_system_prompt(self, messages: list[dict]) -> None:
        """Make the rendered system prompt (what precedes the first user message's content) initial
        tokens. Found as the common token prefix of two renderings that differ in that content only."""
        lead = []
        for m in messages:
            if m.get("role") != "system":
                break
            lead.append(m)
        a = self.format_chat(lead + [{"role": "user", "content": "A"}], add_generation_prompt=False)
        b = self.format_chat(lead + [{"role": "user", "content": "B"}], add_generation_prompt=False)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        try:
            self._ctx.keep(n)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"the system prompt ({n} tokens) does not fit the cache's initial region: {e}") from None

    def _generation_done(self, g: Generation) -> None:
        if not g._chat or self._chat_text is None:
            self._chat_text = None
            return
        # the reply's tokens that went into the cache extend the conversation text; invalid UTF-8 reads
        # as the client read it (replaced), a character cut at the end stops the next turn matching
        self._chat_text += self.tokenizer.decode(g.tokens[:g.n_fed]).decode("utf-8", errors="replace")

    # --- generation

    def _sampler(self, temperature, top_k, top_p, min_p, repeat_penalty, seed) -> Sampler:
        if seed is None:
            seed = self._rng.getrandbits(63)
        return Sampler(self.n_vocab, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repeat_penalty=repeat_penalty, seed=seed)

    def _json_texts(self) -> list:
        """Token texts for JSON mode, made once per tokenizer."""
        t = self.tokenizer
        if getattr(t, "_json_texts", None) is None:
            from .jsonmode import token_texts
            t._json_texts = token_texts(t)
        return t._json_texts

    def _logit_options(self, logit_bias=None, frequency_penalty=0.0, presence_penalty=0.0, logprobs=None,
                       json_mode=False) -> dict:
        """Checked options of Generation (OpenAI's logit_bias maps token ids, as ints or strings, to a bias)."""
        bias = {}
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise InvalidArgumentError("logit_bias must map token ids to numbers")
            for k, v in logit_bias.items():
                try:
                    t = int(k)
                except (TypeError, ValueError):
                    raise InvalidArgumentError(f"logit_bias: {k!r} is not a token id") from None
                if not 0 <= t < self.n_vocab:
                    raise InvalidArgumentError(f"logit_bias: token id {t} is outside the vocabulary (0..{self.n_vocab - 1})")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                    raise InvalidArgumentError(f"logit_bias: the bias of token {t} must be a finite number, got {v!r}")
                bias[t] = float(v)
        for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise InvalidArgumentError(f"{name} must be a finite number, got {v!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise InvalidArgumentError(f"logprobs must be a non-negative integer or None, got {logprobs!r}")
        return dict(logit_bias=bias, frequency_penalty=frequency_penalty or 0.0, presence_penalty=presence_penalty or 0.0,
                    logprobs=logprobs, json_mode=bool(json_mode))

    def _start(self, prompt, max_tokens, stop, sampling, seed, messages=None, options: dict | None = None) -> Generation:
        options = self._logit_options(**(options or {}))
        if messages is not None:
            tokens = None
        elif isinstance(prompt, (str, bytes)):
            tokens = self.tokenize(prompt, special=True)
        else:
            tokens = self._check_tokens(prompt)
        if tokens is not None and not tokens:
            raise InvalidArgumentError("the prompt is empty")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise InvalidArgumentError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        if max_tokens is not None and max_tokens <= 0:
            max_tokens = None  # as llama-cpp-python: until end of generation or a full context
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidArgumentError("stop must be a non-empty string or a list of them")
        sampler = self._sampler(**sampling, seed=seed)
        if messages is None:
            if not self.sparse:
                self._check_room(len(tokens))
            return Generation(self, tokens, max_tokens, stops, sampler, lambda: self._feed(tokens), **options)
        chat.check_messages(messages)
        g = Generation(self, [], max_tokens, stops, sampler, None, chat=True, **options)

        def prefill():
            g.prompt_tokens, logits = self._feed_chat(messages)
            g.n_prompt = self._seen
            return logits

        g._prefill = prefill
        return g

    def generate(self, prompt: str | bytes | Sequence[int], max_tokens: int | None = 256, *,
                 temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
                 top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                 repeat_penalty: float = DEFAULTS["repeat_penalty"], stop: str | Sequence[str] | None = None,
                 seed: int | None = None, stream: bool = False, logit_bias: dict | None = None,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> str | Iterator[str]:
        """Continue `prompt` (text or token ids). Returns the text, or with stream=True an iterator
        of text chunks (never splitting a UTF-8 character, never showing a stop string)."""
        g = self._start(prompt, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed,
                        options=dict(logit_bias=logit_bias, frequency_penalty=frequency_penalty,
                                     presence_penalty=presence_penalty))
        return g if stream else "".join(g)

    # --- OpenAI-shaped API (as llama-cpp-python)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], special=True).decode("utf-8", "replace")

    def completion_logprobs(self, entries, text_offset: int) -> dict:
        """OpenAI's (legacy) completions logprobs object for logprob entries of a Generation."""
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for token, lp, top in entries:
            text = self._token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(text_offset)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._token_text(t): v for t, v in top})
            text_offset += len(text)
        return out

    def chat_logprobs(self, entries) -> dict:
        """OpenAI's chat logprobs object ({"content": [...]}) for logprob entries of a Generation."""
        def item(token, lp):
            return {"token": self._token_text(token), "logprob": lp, "bytes": list(self.tokenizer.decode([token], special=True))}
        return {"content": [{**item(token, lp), "top_logprobs": [item(t, v) for t, v in top]} for token, lp, top in entries],
                "refusal": None}

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16, *,
                          temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
                          top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                          repeat_penalty: float = DEFAULTS["repeat_penalty"], stop=None, seed: int | None = None,
                          stream: bool = False, echo: bool = False, logprobs: int | None = None,
                          logit_bias: dict | None = None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, model: str | None = None):
        g = self._start(prompt, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed,
                        options=dict(logprobs=logprobs, logit_bias=logit_bias, frequency_penalty=frequency_penalty,
                                     presence_penalty=presence_penalty))
        head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_path}
        prefix = prompt if echo and isinstance(prompt, str) else ""
        offset = [len(prefix)]

        def choice(text, finish, entries=None):
            lp = None
            if logprobs is not None:
                lp = self.completion_logprobs(entries or [], offset[0])
                offset[0] += sum(len(t) for t in lp["tokens"])
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}

        if stream:
            def chunks():
                if prefix:
                    yield {**head, "choices": [choice(prefix, None)]}
                for piece in g:
                    yield {**head, "choices": [choice(piece, None, g.take_logprobs())]}
                yield {**head, "choices": [choice("", g.finish_reason, g.take_logprobs())]}
            return chunks()
        text = "".join(g)
        return {**head, "choices": [choice(prefix + text, g.finish_reason, g.logprobs)], "usage": _usage(g)}

    __call__ = create_completion

    def format_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template. Special-token text
        inside message contents stays plain text unless parse_special_in_content is set."""
        t = self.tokenizer
        text, spans = self._render_chat(messages, add_generation_prompt)
        has_bos = bool(t.bos_text) and text.startswith(t.bos_text)  # templates often write BOS themselves
        return self._chat_tokens(text, spans, 0, add_bos=not has_bos)

    def _render_chat(self, messages, add_generation_prompt: bool) -> tuple[str, list | None]:
        t = self.tokenizer
        messages = chat.check_messages(messages)
        if self.parse_special_in_content or not any(t.contains_special(m["content"]) for m in messages):
            # nothing to protect: one rendering
            return chat.render(t.chat_template, messages, add_generation_prompt, t.bos_text, t.eos_text), []
        text, spans = chat.render_spans(t.chat_template, messages, add_generation_prompt, t.bos_text, t.eos_text)
        if spans is None:
            raise InvalidArgumentError("a message contains special-token text, and this model's chat template "
                                       "rewrites message contents, so it cannot be kept as plain text; remove it "
                                       "or set parse_special_in_content=True")
        return text, spans

    def _chat_tokens(self, text: str, spans: list, start: int, add_bos: bool) -> list[int]:
        if self.parse_special_in_content or not spans:
            return self.tokenize(text[start:], add_bos=add_bos, special=True)
        return self.tokenizer.encode_spans(text, spans, start, add_bos=None if add_bos else False)

    def stream_chat(self, messages, max_tokens: int | None = None, *, temperature: float = 0.2,
                    top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                    repeat_penalty: float = DEFAULTS["repeat_penalty"], stop=None,
                    seed: int | None = None, logprobs: int | None = None, logit_bias: dict | None = None,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    response_format: dict | None = None) -> Generation:
        """The assistant's reply to a conversation as a Generation (text chunks, then its stats);
        response_format {"type": "json_object"} constrains it to one JSON object."""
        return self._start(None, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed,
                           messages=messages, options=dict(logprobs=logprobs, logit_bias=logit_bias,
                                                           frequency_penalty=frequency_penalty,
                                                           presence_penalty=presence_penalty,
                                                           json_mode=check_response_format(response_format)))

    def create_chat_completion(self, messages, max_tokens: int | None = None, *, temperature: float = 0.2,
                               top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"],
                               min_p: float = DEFAULTS["min_p"], repeat_penalty: float = DEFAULTS["repeat_penalty"],
                               stop=None, seed: int | None = None, stream: bool = False, logprobs: bool = False,
                               top_logprobs: int | None = None, logit_bias: dict | None = None,
                               frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                               response_format: dict | None = None, model: str | None = None):
        if top_logprobs is not None and not logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs=True")
        g = self.stream_chat(messages, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, stop=stop, seed=seed,
                             logprobs=(top_logprobs or 0) if logprobs else None, logit_bias=logit_bias,
                             frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                             response_format=response_format)
        head = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": model or self.model_path}
        if stream:
            def chunks():
                def chunk(delta, finish, entries=None):
                    lp = self.chat_logprobs(entries) if logprobs and entries else None
                    return {**head, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
                yield chunk({"role": "assistant"}, None)
                for piece in g:
                    yield chunk({"content": piece}, None, g.take_logprobs())
                yield chunk({}, g.finish_reason, g.take_logprobs())
            return chunks()
        text = "".join(g)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": self.chat_logprobs(g.logprobs) if logprobs else None,
                             "finish_reason": g.finish_reason}], "usage": _usage(g)}


class EngineState:
    """What Engine.save_state() returns: the KV cache's live cells (a few MiB for a SepLLM cache of
    n_cache cells, whatever the length of the conversation) and the Engine's view of them."""

    def __init__(self, cache: bytes, n_tokens: int, tokens: list[int] | None, chat_text: str | None, kv_mode: str):
        self.cache, self.n_tokens, self.tokens, self.chat_text, self.kv_mode = cache, n_tokens, tokens, chat_text, kv_mode

    @property
    def nbytes(self) -> int:
        return len(self.cache)

    def __repr__(self) -> str:
        return f"EngineState({self.kv_mode}, {self.n_tokens} tokens seen, {self.nbytes / 2 ** 20:.2f} MiB)"


def check_response_format(response_format) -> bool:
    """Whether a response_format asks for JSON mode: {"type": "text"} (or None) is plain text,
    {"type": "json_object"} one JSON object. A JSON schema is not supported (it needs a grammar
    compiled from the schema)."""
    if response_format is None:
        return False
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise InvalidArgumentError("response_format must be an object with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return False
    if kind == "json_object" and not response_format.get("schema"):
        return True
    raise InvalidArgumentError(f"response_format {kind!r}{' with a schema' if kind == 'json_object' else ''} is not "
                               "supported (sepedge constrains output to JSON, not to a schema: use 'json_object')")


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.n_prompt, "completion_tokens": len(g.tokens), "total_tokens": g.n_prompt + len(g.tokens)}
