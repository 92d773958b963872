"""`sepedge serve`: an OpenAI-compatible HTTP server over one loaded model and N slots.

    sepedge serve model.gguf --parallel 4 --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -d '{"model": "model", "messages": [...]}'

A slot is an Engine of its own (one KV cache) on the shared weights (Engine.spawn). With the default
`sepllm-stream` cache every slot costs a fixed n_cache cells however long its conversations run, so
memory is known before the first request: weights + parallel x kv_bytes. A request goes to the free
slot whose cache already holds the longest part of its prompt (a continuing conversation then only
evaluates its new turn); requests beyond the free slots wait their turn. Generation runs on worker
threads, one per slot; the event loop streams tokens as they come, and a client that goes away
cancels its generation between two tokens and frees its slot.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /health, /slots,
/slots/{id}/cache, /metrics, and the chat page at / (static files in sepedge/web/). A generation's
response names the slot that serves it in the X-Sepedge-Slot header, so a client can watch that
slot's cache at /slots/{id}/cache while the reply streams. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import concurrent.futures
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat
from .engine import DEFAULTS, Engine, check_response_format
from .errors import ContextFullError, InvalidArgumentError, SepedgeError

WEB = Path(__file__).with_name("web")  # the chat page: plain HTML, CSS and JS, no build step
PUBLIC = ("/", "/health", "/v1/health")  # answered without the API key (the page asks for it)

# ---------------------------------------------------------------------------------------------
# errors in OpenAI's shape


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def api_error(e: Exception) -> APIError:
    """The HTTP error for an exception of the engine."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextFullError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, InvalidArgumentError):
        return APIError(400, str(e))
    return APIError(500, f"{type(e).__name__}: {e}", type="server_error")


# ---------------------------------------------------------------------------------------------
# requests (unknown fields are accepted and ignored, as OpenAI's clients send many)

Stop = str | list[str] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(DEFAULTS["temperature"], ge=0)
    top_p: float = Field(DEFAULTS["top_p"], ge=0, le=1)
    top_k: int = DEFAULTS["top_k"]
    min_p: float = Field(DEFAULTS["min_p"], ge=0, le=1)
    repeat_penalty: float = Field(DEFAULTS["repeat_penalty"], gt=0)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: Stop = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: dict | None = None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# ---------------------------------------------------------------------------------------------
# slots


class Slot:
    def __init__(self, id: int, engine: Engine):
        self.id, self.engine = id, engine
        self.busy = False
        self.n_requests = 0
        self.last_used = 0.0
        self.last: dict = {}  # the last request: finish_reason, tokens, seconds
        self.generation = None  # the Generation running (or last run) on this slot


class SlotPool:
    """The slots and the queue of requests waiting for one. A request takes the free slot whose cache
    holds the longest part of its prompt (then the least recently used)."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self._cond = asyncio.Condition()
        self.waiting = 0

    async def acquire(self, score) -> Slot:
        async with self._cond:
            self.waiting += 1
            try:
                await self._cond.wait_for(lambda: any(not s.busy for s in self.slots))
            finally:
                self.waiting -= 1
            slot = max((s for s in self.slots if not s.busy), key=lambda s: (score(s.engine), -s.last_used))
            slot.busy = True
            slot.n_requests += 1
            return slot

    async def release(self, slot: Slot) -> None:
        async with self._cond:
            slot.busy = False
            slot.last_used = time.monotonic()
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# the app


class Server:
    """The loaded model, its slots and the worker threads they generate on."""

    def __init__(self, engine: Engine, parallel: int, model_name: str, api_key: str | None = None,
                 n_predict: int = 1024):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.n_predict = n_predict
        engines = [engine] + [engine.spawn() for _ in range(parallel - 1)]
        self.pool = SlotPool([Slot(i, e) for i, e in enumerate(engines)])
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="slot")
        self.started = int(time.time())
        self.counters = {"requests": 0, "errors": 0, "tokens_generated": 0, "tokens_prompt": 0, "cancelled": 0}
        self._token_bytes: dict[int, bytes] = {}  # token id -> its bytes, control tokens' text included

    def cache_view(self, slot: Slot) -> dict:
        """The slot's cache for /slots/{id}/cache: Engine.cache_snapshot() with the text of each token."""
        snap = slot.engine.cache_snapshot()
        ids = snap.pop("ids")
        # each token's text is the characters it completes: a character split over tokens shows on the last
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        texts = []
        for t in ids:
            if t < 0:  # not recorded yet (read between a forward pass and its bookkeeping)
                texts.append("")
                continue
            b = self._token_bytes.get(t)
            if b is None:
                b = self._token_bytes[t] = slot.engine.tokenizer.decode([t], special=True)
            texts.append(decoder.decode(b))
        if texts:  # an incomplete character at the end reads as the client would read it (replaced)
            texts[-1] += decoder.decode(b"", final=True)
        return {"slot": slot.id, "busy": slot.busy, "kv": snap["kv"],
                "cells": [{"position": p, "token": t, "region": r} for p, t, r in snap["cells"]],
                "tokens": {"start": snap["start"], "ids": ids, "texts": texts, "regions": snap["regions"]}}

    def close(self) -> None:
        for s in self.pool.slots:  # stop what is still generating, between two tokens
            if s.generation is not None:
                s.generation.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for s in self.pool.slots[1:]:
            s.engine.close()
        self.engine.close()

    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.engine.model_path, os.path.basename(self.engine.model_path)):
            raise APIError(404, f"The model '{name}' does not exist (this server runs '{self.model_name}')",
                           param="model", code="model_not_found")

    async def run(self, slot: Slot, start, request: Request, stream: bool):
        """Start a generation on the slot's worker thread. Returns an async iterator of
        ("piece", text, logprobs) ... ("end", None, logprobs) items; the slot is released when the
        thread is done, whatever the client does."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        holder: dict = {}

        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce():
            try:
                g = holder["g"] = slot.generation = start(slot.engine)
                if holder.get("cancelled"):  # the client left before the generation started
                    g.cancel()
                for piece in g:
                    put(("piece", piece, g.take_logprobs()))
                put(("end", None, g.take_logprobs()))
            except BaseException as e:  # to the client as an error item
                put(("error", e, None))

        fut = loop.run_in_executor(self.executor, produce)

        def done(_):
            g = holder.get("g")
            if g is not None:
                self.counters["tokens_generated"] += len(g.tokens)
                self.counters["tokens_prompt"] += g.n_prompt
                self.counters["cancelled"] += g.finish_reason == "cancelled"
                slot.last = {"finish_reason": g.finish_reason, "completion_tokens": len(g.tokens),
                             "prompt_tokens": g.n_prompt, "prompt_evaluated": len(g.prompt_tokens),
                             "prompt_seconds": round(g.prompt_seconds, 4),
                             "generate_seconds": round(g.generate_seconds, 4)}
            asyncio.ensure_future(self.pool.release(slot))

        fut.add_done_callback(done)

        def cancel():
            g = holder.get("g")
            if g is not None:
                g.cancel()
            holder["cancelled"] = True

        async def items():
            finished = False
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        item = None
                    # between tokens (or every 0.25 s while none come): is the client still there?
                    if await request.is_disconnected():
                        return
                    if item is None:
                        continue
                    finished = item[0] != "piece"
                    yield item
                    if finished:
                        return
            finally:
                if not finished:
                    cancel()  # the client left (or the consumer stopped early): stop generating

        return items(), holder

    def generation(self, g) -> dict:
        return {"prompt_tokens": g.n_prompt, "completion_tokens": len(g.tokens), "total_tokens": g.n_prompt + len(g.tokens)}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="sepedge", version=__import__("sepedge").__version__)
    app.state.server = server

    # --- errors

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        server.counters["errors"] += 1
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        server.counters["errors"] += 1
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {err.get('msg', '')}", code="invalid_json").response()
        param = ".".join(loc) or None
        return APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        server.counters["errors"] += 1
        return api_error(e).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if server.api_key and path not in PUBLIC and not path.startswith("/web/"):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != server.api_key:
                return JSONResponse(error_body("Incorrect API key provided", "invalid_request_error", None,
                                               "invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # --- info

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "slots_idle": sum(not s.busy for s in server.pool.slots),
                "slots_processing": sum(s.busy for s in server.pool.slots), "requests_waiting": server.pool.waiting}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        e = server.engine
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.started, "owned_by": "sepedge",
            "meta": {"path": e.model_path, "n_vocab": e.n_vocab, "n_ctx_train": e.n_ctx_train, "n_embd": e.n_embd,
                     "kv_mode": e.kv_mode, "n_cache": e.n_ctx, "parallel": len(server.pool.slots)}}]}

    @app.get("/slots")
    async def slots():
        return [{"id": s.id, "busy": s.busy, "n_requests": s.n_requests, "kv": s.engine.kv_stats(), "last": s.last}
                for s in server.pool.slots]

    @app.get("/slots/{slot_id}/cache")
    async def slot_cache(slot_id: int):
        if not 0 <= slot_id < len(server.pool.slots):
            raise APIError(404, f"no slot {slot_id}: this server has slots 0..{len(server.pool.slots) - 1}",
                           type="not_found_error", param="slot_id")
        # on a worker thread: the read waits for a forward pass running on the slot to end
        return await asyncio.to_thread(server.cache_view, server.pool.slots[slot_id])

    # --- the chat page

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.get("/metrics")
    async def metrics():
        lines = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP sepedge_{name} {help}", f"# TYPE sepedge_{name} {kind}"])
            lines.extend(f"sepedge_{name}{labels} {value}" for labels, value in samples)

        c = server.counters
        metric("requests_total", "counter", "Requests received.", [("", c["requests"])])
        metric("errors_total", "counter", "Requests answered with an error.", [("", c["errors"])])
        metric("requests_cancelled_total", "counter", "Generations stopped by a client leaving.", [("", c["cancelled"])])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", [("", c["tokens_prompt"])])
        metric("tokens_predicted_total", "counter", "Tokens generated.", [("", c["tokens_generated"])])
        metric("requests_processing", "gauge", "Slots generating.", [("", sum(s.busy for s in server.pool.slots))])
        metric("requests_waiting", "gauge", "Requests waiting for a slot.", [("", server.pool.waiting)])
        stats = [(s.id, s.engine.kv_stats()) for s in server.pool.slots]
        for key, help in (("live", "KV cells holding a token."), ("capacity", "KV cells of the slot."),
                          ("tokens_seen", "Tokens the slot's cache has seen since its last reset."),
                          ("tokens_evicted", "Tokens the slot's cache evicted."), ("kv_bytes", "Bytes of K and V.")):
            metric(f"slot_kv_{key}", "gauge", help, [(f'{{slot="{i}"}}', st[key]) for i, st in stats])
        metric("process_resident_memory_bytes", "gauge", "Resident memory of the server.", [("", _rss_bytes())])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # --- generation

    def sampling(r: _Sampling) -> dict:
        return dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                    repeat_penalty=r.repeat_penalty)

    def max_tokens(value: int | None) -> int:
        return server.n_predict if value is None or value == 0 else value

    async def respond(request: Request, r: _Sampling, score, start, object_name: str, piece_choice, final_choice,
                      prelude: list[dict]):
        server.counters["requests"] += 1
        slot = await server.pool.acquire(score)
        items, holder = await server.run(slot, start, request, r.stream)
        slot_header = {"X-Sepedge-Slot": str(slot.id)}  # the page watches this slot's cache
        head = {"id": f"{'chatcmpl' if object_name.startswith('chat') else 'cmpl'}-{uuid.uuid4()}",
                "object": object_name, "created": int(time.time()), "model": server.model_name}
        first = await anext(items, None)  # an error in the first item still becomes an HTTP error
        if first is None:  # the client left before anything came
            return JSONResponse(error_body("the client disconnected"), status_code=499)
        if first[0] == "error":
            raise api_error(first[1])
        if not r.stream:
            pieces, entries, item = [], [], first
            while True:
                if item[0] == "error":
                    raise api_error(item[1])
                entries += item[2] or []
                if item[0] == "end":
                    break
                pieces.append(item[1])
                item = await anext(items, None)
                if item is None:
                    return JSONResponse(error_body("the client disconnected"), status_code=499)
            g = holder["g"]
            return JSONResponse({**head, "choices": [final_choice("".join(pieces), g.finish_reason, entries)],
                                 "usage": server.generation(g), "timings": _timings(g)}, headers=slot_header)

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        chunk_head = {**head, "object": f"{object_name}.chunk" if object_name.startswith("chat") else object_name}

        async def events():
            item = first
            for choice in prelude:
                yield json.dumps({**chunk_head, "choices": [choice]})
            while item is not None:
                if item[0] == "error":  # mid-stream: an error event, then the end
                    e = api_error(item[1])
                    yield json.dumps(error_body(e.message, e.type, e.param, e.code))
                    break
                if item[0] == "piece":
                    yield json.dumps({**chunk_head, "choices": [piece_choice(item[1], None, item[2])]})
                else:
                    g = holder["g"]
                    yield json.dumps({**chunk_head, "choices": [piece_choice("", g.finish_reason, item[2])]})
                    if include_usage:
                        yield json.dumps({**chunk_head, "choices": [], "usage": server.generation(g)})
                    break
                item = await anext(items, None)
            yield "[DONE]"

        return EventSourceResponse(events(), ping=15, headers=slot_header)

    async def parse(request: Request, model):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            r = model.model_validate(body)
        except Exception as e:  # pydantic.ValidationError
            errors = getattr(e, "errors", lambda: [])()
            err = errors[0] if errors else {}
            param = ".".join(str(p) for p in err.get("loc", ())) or None
            raise APIError(400, f"{param or 'body'}: {err.get('msg', str(e))}", param=param, code="invalid_value") from None
        server.check_model(r.model)
        return r

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        r: ChatRequest = await parse(request, ChatRequest)
        try:
            messages = chat.check_messages(r.messages)
            check_response_format(r.response_format)
            if r.top_logprobs is not None and not r.logprobs:
                raise InvalidArgumentError("top_logprobs needs logprobs: true")
            server.engine._logit_options(logit_bias=r.logit_bias, frequency_penalty=r.frequency_penalty,
                                         presence_penalty=r.presence_penalty)
        except InvalidArgumentError as e:
            raise api_error(e) from None
        n_logprobs = (r.top_logprobs or 0) if r.logprobs else None
        limit = max_tokens(r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens)

        def start(engine: Engine):
            return engine.stream_chat(messages, limit, stop=r.stop, seed=r.seed, logprobs=n_logprobs,
                                      logit_bias=r.logit_bias, frequency_penalty=r.frequency_penalty,
                                      presence_penalty=r.presence_penalty, response_format=r.response_format,
                                      **sampling(r))

        def lp(entries):
            return server.engine.chat_logprobs(entries) if r.logprobs else None

        def piece_choice(text, finish, entries):
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": lp(entries) if entries else None,
                    "finish_reason": finish}

        def final_choice(text, finish, entries):
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp(entries),
                    "finish_reason": finish}

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return await respond(request, r, lambda e: e.cached_prefix(messages=messages), start, "chat.completion",
                             piece_choice, final_choice, [role])

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        r: CompletionRequest = await parse(request, CompletionRequest)
        if r.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of several prompts is not supported)", param="prompt")
            prompt = prompt[0]
        try:
            tokens = server.engine.tokenize(prompt, special=True) if isinstance(prompt, str) else server.engine._check_tokens(prompt)
            if not tokens:
                raise InvalidArgumentError("the prompt is empty")
            if not server.engine.sparse:
                server.engine._check_room(len(tokens))
            server.engine._logit_options(logit_bias=r.logit_bias, frequency_penalty=r.frequency_penalty,
                                         presence_penalty=r.presence_penalty, logprobs=r.logprobs)
        except InvalidArgumentError as e:
            raise api_error(e) from None
        except ContextFullError as e:
            raise api_error(e) from None
        limit = max_tokens(r.max_tokens)
        echo = prompt if r.echo and isinstance(prompt, str) else ""
        offset = [len(echo)]

        def start(engine: Engine):
            return engine._start(tokens, limit, r.stop, sampling(r), r.seed,
                                 options=dict(logprobs=r.logprobs, logit_bias=r.logit_bias,
                                              frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty))

        def lp(entries):
            if r.logprobs is None:
                return None
            out = server.engine.completion_logprobs(entries or [], offset[0])
            offset[0] += sum(len(t) for t in out["tokens"])
            return out

        def piece_choice(text, finish, entries):
            return {"text": text, "index": 0, "logprobs": lp(entries), "finish_reason": finish}

        def final_choice(text, finish, entries):
            return {"text": echo + text, "index": 0, "logprobs": lp(entries), "finish_reason": finish}

        prelude = [{"text": echo, "index": 0, "logprobs": None, "finish_reason": None}] if echo else []
        return await respond(request, r, lambda e: e.cached_prefix(tokens=tokens), start, "text_completion",
                             piece_choice, final_choice, prelude)

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    async def embeddings(request: Request):
        r: EmbeddingRequest = await parse(request, EmbeddingRequest)
        if r.dimensions is not None and r.dimensions != server.engine.n_embd:
            raise APIError(400, f"dimensions: this model's embeddings have {server.engine.n_embd}", param="dimensions")
        inputs = [r.input] if isinstance(r.input, str) or (r.input and isinstance(r.input[0], int)) else list(r.input)
        if not inputs or any(len(x) == 0 for x in inputs):
            raise APIError(400, "input must not be empty", param="input")
        server.counters["requests"] += 1
        # the slot whose cache holds the least conversation: embedding empties it
        slot = await server.pool.acquire(lambda e: -len(e._chat_text or "") - e._seen)
        loop = asyncio.get_running_loop()

        def work():
            out = []
            for x in inputs:
                ids = slot.engine.tokenize(x) if isinstance(x, str) else slot.engine._check_tokens(x)
                out.append((slot.engine.embed(ids), len(ids)))
            return out

        try:
            vectors = await loop.run_in_executor(server.executor, work)
        except SepedgeError as e:
            raise api_error(e) from None
        finally:
            await server.pool.release(slot)

        def encode(v: np.ndarray):
            if r.encoding_format == "base64":
                return base64.b64encode(v.astype("<f4").tobytes()).decode()
            return v.tolist()

        n_tokens = sum(n for _, n in vectors)
        return {"object": "list", "model": server.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, (v, _) in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


def _timings(g) -> dict:
    return {"prompt_n": g.n_prompt, "prompt_ms": g.prompt_seconds * 1e3, "predicted_n": len(g.tokens),
            "predicted_ms": g.generate_seconds * 1e3, "predicted_per_second": g.tokens_per_second}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4,
          api_key: str | None = None, model_name: str | None = None, n_predict: int = 1024,
          n_threads: int | None = None, log_level: str = "info", **engine_args) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn
    if parallel < 1:
        raise InvalidArgumentError(f"parallel must be >= 1, got {parallel}")
    if n_threads is None:  # slots run side by side: share the cores rather than oversubscribe them
        n_threads = max(1, (os.cpu_count() or 1) // parallel)
    engine = Engine(model_path, n_threads=n_threads, **engine_args)
    server = Server(engine, parallel, model_name or Path(model_path).stem, api_key, n_predict)
    app = create_app(server)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        server.close()
