"""`Engine`: load a GGUF model and generate text, in the shape of llama-cpp-python's `Llama`.

    from sepedge import Engine
    with Engine("model.gguf") as llm:
        print(llm.generate("The capital of France is", max_tokens=16, temperature=0))
        for chunk in llm.create_chat_completion([{"role": "user", "content": "Hi!"}], stream=True):
            print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""

from __future__ import annotations

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
    """One generation, an iterator of text chunks; once exhausted, finish_reason ("stop" or
    "length"), the generated tokens and text, and timings are set."""

    def __init__(self, engine: Engine, prompt_tokens: list[int], max_tokens: int | None, stop: list[str],
                 sampler: Sampler, prefill: Callable[[], np.ndarray], chat: bool = False):
        self.engine, self.prompt_tokens, self.max_tokens, self.stop, self.sampler = \
            engine, prompt_tokens, max_tokens, stop, sampler
        self._prefill, self._chat = prefill, chat
        self.n_prompt = len(prompt_tokens)  # prompt length (a chat's: the whole conversation so far)
        self.tokens: list[int] = []
        self.n_fed = 0  # generated tokens that went into the cache (all but a final unfed one)
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_seconds = self.generate_seconds = 0.0
        self._cancelled = False
        self._chunks = self._run()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def cancel(self) -> None:
        """Stop this generation from any thread: the native call running for it returns within a
        layer, and the iteration ends with finish_reason "cancelled" (the text so far is kept)."""
        self.engine._cancel_generation(self)

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
                if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                token = self.sampler.sample(logits)
                if token in tok.eog_ids:
                    self.finish_reason = "stop"
                    break
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
        device: "cpu" (or "cuda" where built with CUDA).
        kv_mode: which tokens the KV cache keeps: "full" (all, up to n_ctx), "sepllm" (training-free
            SepLLM: initial, separators, last n_local; original positions), "sepllm-stream" (streaming
            SepLLM, n_cache cells, unbounded input), "streamingllm" (initial + last n_local).
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
                 parse_special_in_content: bool = False):
        if model_path is None:
            from .default_model import default_model
            model_path = default_model()
        self.model_path = os.fspath(model_path)
        self.device = device
        self._lock = _OwnerLock()  # one operation at a time (generations hold it while they run)
        self._cancel_mu = threading.Lock()
        self._active: Generation | None = None
        self.parse_special_in_content = bool(parse_special_in_content)
        self._model = Model(self.model_path, device)
        try:
            self.tokenizer = Tokenizer.from_model(self._model)
            if not self._model.separators:  # a GGUF from another converter: derive them as `convert` does
                t = self.tokenizer
                self._model.separators = V.derive_separator_ids(t.tokens, t.token_types, t.model, t.bos_id)
            self._ctx = Context(self._model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads or 0, kv_type=kv_type,
                                kv_mode=kv_mode, n_init=n_init, n_sep=n_sep, n_local=n_local, n_cache=n_cache)
        except BaseException:
            self._model.close()
            raise
        self.kv_mode = kv_mode
        self.n_ctx: int = self._ctx.info()["n_cells"]
        self.keep_system = keep_system
        self._rng = random.Random(seed)
        self._seen = 0  # tokens fed since the last reset
        # full mode: the cached tokens, for reusing a shared prompt prefix (sparse caches are not
        # rewound: what they evicted is gone)
        self._tokens: list[int] | None = [] if kv_mode == "full" else None
        self._chat_text: str | None = None  # the conversation text the cache holds, to append a turn to

    # --- lifetime

    def close(self) -> None:
        """Free the model and cache. A call running in another thread is cancelled and waited for;
        a generation in progress ends with finish_reason "cancelled"."""
        self.cancel()
        self._model.close()  # closes the context too (waiting for a running native call)

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

    # --- model facts

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def sparse(self) -> bool:
        """Whether the cache evicts tokens (every mode but "full")."""
        return self.kv_mode != "full"

    def kv_stats(self) -> dict:
        """The KV cache: mode, capacity, live cells per region, tokens seen and evicted, bytes."""
        i = self._ctx.info()
        return {"mode": i["kv_mode"], "capacity": i["n_cells"], "n_init": i["n_init"], "n_sep": i["n_sep"],
                "n_local": i["n_local"], "live": i["n_live"], "live_init": i["n_live_init"], "live_sep": i["n_live_sep"],
                "live_recent": i["n_live_recent"], "tokens_seen": i["n_seen"], "tokens_evicted": i["n_evicted"],
                "kv_bytes": i["kv_bytes"], "avg_attended": i["sum_visible"] / i["n_seen"] if i["n_seen"] else 0.0}

    @property
    def info(self) -> dict:
        return dict(self._model.info, separators=self._model.separators)

    def metadata(self, key: str, default=None):
        """A GGUF metadata value of the model."""
        return self._model.meta(key, default)

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

    def _decode(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        try:
            logits = self._ctx.decode(ids, n_logits=len(ids) if all_logits else 1)
        except BaseException:
            self._resync()
            raise
        self._seen += len(ids)
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
        try:  # the reply's tokens that went into the cache extend the conversation text
            self._chat_text += self.tokenizer.decode(g.tokens[:g.n_fed]).decode("utf-8")
        except UnicodeDecodeError:
            self._chat_text = None

    # --- generation

    def _sampler(self, temperature, top_k, top_p, min_p, repeat_penalty, seed) -> Sampler:
        if seed is None:
            seed = self._rng.getrandbits(63)
        return Sampler(self.n_vocab, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repeat_penalty=repeat_penalty, seed=seed)

    def _start(self, prompt, max_tokens, stop, sampling, seed, messages=None) -> Generation:
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
            return Generation(self, tokens, max_tokens, stops, sampler, lambda: self._feed(tokens))
        chat.check_messages(messages)
        g = Generation(self, [], max_tokens, stops, sampler, None, chat=True)

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
                 seed: int | None = None, stream: bool = False) -> str | Iterator[str]:
        """Continue `prompt` (text or token ids). Returns the text, or with stream=True an iterator
        of text chunks (never splitting a UTF-8 character, never showing a stop string)."""
        g = self._start(prompt, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed)
        return g if stream else "".join(g)

    # --- OpenAI-shaped API (as llama-cpp-python)

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16, *,
                          temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
                          top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                          repeat_penalty: float = DEFAULTS["repeat_penalty"], stop=None, seed: int | None = None,
                          stream: bool = False, echo: bool = False):
        g = self._start(prompt, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed)
        head = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_path}
        prefix = prompt if echo and isinstance(prompt, str) else ""

        def choice(text, finish):
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if stream:
            def chunks():
                if prefix:
                    yield {**head, "choices": [choice(prefix, None)]}
                for piece in g:
                    yield {**head, "choices": [choice(piece, None)]}
                yield {**head, "choices": [choice("", g.finish_reason)]}
            return chunks()
        text = "".join(g)
        return {**head, "choices": [choice(prefix + text, g.finish_reason)], "usage": _usage(g)}

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
                    seed: int | None = None) -> Generation:
        """The assistant's reply to a conversation as a Generation (text chunks, then its stats)."""
        return self._start(None, max_tokens, stop, dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                        min_p=min_p, repeat_penalty=repeat_penalty), seed,
                           messages=messages)

    def create_chat_completion(self, messages, max_tokens: int | None = None, *, temperature: float = 0.2,
                               top_k: int = DEFAULTS["top_k"], top_p: float = DEFAULTS["top_p"],
                               min_p: float = DEFAULTS["min_p"], repeat_penalty: float = DEFAULTS["repeat_penalty"],
                               stop=None, seed: int | None = None, stream: bool = False):
        g = self.stream_chat(messages, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, stop=stop, seed=seed)
        head = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": self.model_path}
        if stream:
            def chunks():
                def chunk(delta, finish):
                    return {**head, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                yield chunk({"role": "assistant"}, None)
                for piece in g:
                    yield chunk({"content": piece}, None)
                yield chunk({}, g.finish_reason)
            return chunks()
        text = "".join(g)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": g.finish_reason}], "usage": _usage(g)}


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.n_prompt, "completion_tokens": len(g.tokens), "total_tokens": g.n_prompt + len(g.tokens)}
