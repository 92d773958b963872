"""`sepedge serve` driven by the real `openai` client: chat and completions (streamed and not),
logprobs, embeddings, errors in OpenAI's shape, the API key, slots chosen by cached prefix, more
clients than slots, a client leaving mid-stream, and memory under a bounded load.

Servers run as subprocesses on a free loopback port, on a tiny random model (fast, so generation
lengths are what the tests choose) and, for a few end-to-end checks, on SmolLM2."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

import fixtures

KEY = "sk-test-key"
TIMEOUT = 60  # seconds any one request may take (the machine is small and shared)
SMALL_CACHE = ["--kv-mode", "sepllm-stream", "--n-init", "4", "--n-sep", "8", "--n-local", "24", "--n-cache", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, model, *args, api_key: str | None = None):
        self.api_key = api_key
        for _ in range(3):  # a port taken between free_port() and the bind: try another
            self.port = free_port()
            cmd = [sys.executable, "-m", "sepedge.cli", "serve", str(model), "--host", "127.0.0.1", "--port",
                   str(self.port), "--log-level", "warning", "-a", "tiny", *args]
            if api_key:
                cmd += ["--api-key", api_key]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if self._wait():
                break
        else:
            raise RuntimeError("the server did not start")
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", timeout=TIMEOUT, max_retries=0)

    def _wait(self) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                print(self.proc.stdout.read())
                return False
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        return False

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str):
        r = httpx.get(self.url + path, headers=self.headers(), timeout=TIMEOUT)
        r.raise_for_status()
        return r.json()

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny_model(gguf_path):
    return gguf_path("mha-d64", "q8_0")


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Served(tiny_model, "--parallel", "2", "-n", "100000", *SMALL_CACHE, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def full_server(tiny_model):
    s = Served(tiny_model, "--parallel", "1", "--kv-mode", "full", "-c", "48")
    yield s
    s.stop()


def user(text):
    return [{"role": "user", "content": text}]


# --- the API


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"  # no key needed
    slots = server.get("/slots")
    assert len(slots) == 2 and all(s["kv"]["capacity"] == 64 and s["kv"]["mode"] == "sepllm-stream" for s in slots)
    text = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=TIMEOUT).text
    assert 'sepedge_slot_kv_capacity{slot="1"} 64' in text and "sepedge_process_resident_memory_bytes" in text


def test_chat_streamed_and_not(server, eog):
    args = dict(model="tiny", messages=user("Hello there"), max_tokens=12, temperature=0, logit_bias=eog)
    r = server.client.chat.completions.create(**args)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant" and c.message.content
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    chunks = list(server.client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_sampling_seed_and_stop(server, eog):
    args = dict(model="tiny", messages=user("Tell me"), max_tokens=16, temperature=1.0, logit_bias=eog)
    a = server.client.chat.completions.create(**args, seed=7).choices[0].message.content
    b = server.client.chat.completions.create(**args, seed=7).choices[0].message.content
    c = server.client.chat.completions.create(**args, seed=8).choices[0].message.content
    assert a == b and a != c
    stop = a[len(a) // 2:len(a) // 2 + 2]
    r = server.client.chat.completions.create(**args, seed=7, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == a[:a.index(stop)]


def test_completions_logprobs_and_logit_bias(server, eog):
    r = server.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                         logprobs=3, echo=True, logit_bias=eog)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith("Once upon a time") and len(lp.tokens) == 6 == len(lp.token_logprobs)
    assert "".join(lp.tokens) == c.text[len("Once upon a time"):]
    assert lp.text_offset[0] == len("Once upon a time")
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(v)  # greedy: the top token
    forced = server.client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0,
                                              logit_bias={"300": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [forced.choices[0].logprobs.tokens[0]] * 5
    chat = server.client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2, logit_bias=eog)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_content_parts_and_streamed_completion(server, eog):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    a = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=5, temperature=0, logit_bias=eog)
    b = server.client.chat.completions.create(model="tiny", messages=user("Hello there"), max_tokens=5,
                                              temperature=0, logit_bias=eog)
    assert a.choices[0].message.content == b.choices[0].message.content
    whole = server.client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, logit_bias=eog)
    streamed = server.client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0,
                                                logit_bias=eog, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == whole.choices[0].text


def test_json_mode(server):
    r = server.client.chat.completions.create(model="tiny", messages=user("Give me JSON"), max_tokens=60,
                                              temperature=1.0, seed=3, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert JSONPrefix_accepts(text)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def JSONPrefix_accepts(text: str) -> bool:  # noqa: N802
    from sepedge.jsonmode import JSONPrefix
    return text.lstrip().startswith("{") and JSONPrefix().accepts(text)


def test_embeddings(server):
    r = server.client.embeddings.create(model="tiny", input=["first text", "second one"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    v = np.array(r.data[0].embedding)
    assert v.shape == (128,) and np.linalg.norm(v) == pytest.approx(1, abs=1e-5)
    raw = httpx.post(server.url + "/v1/embeddings", headers=server.headers(), timeout=TIMEOUT,
                     json={"model": "tiny", "input": "first text", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, v, atol=1e-6)


# --- errors


def error_of(server, path, body=None, content=None):
    r = httpx.post(server.url + path, headers={**server.headers(), "Content-Type": "application/json"},
                   content=content if content is not None else json.dumps(body), timeout=TIMEOUT)
    return r.status_code, r.json()["error"]


def test_bad_requests(server):
    status, err = error_of(server, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [')
    assert status == 400 and err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    status, err = error_of(server, "/v1/chat/completions", content=b"[1, 2]")
    assert status == 400
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    bad = [dict(temperature=-1), dict(top_p=1.5), dict(n=2), dict(max_tokens=-3), dict(logit_bias={"abc": 1}),
           dict(logit_bias={"99999999": 1}), dict(presence_penalty=3), dict(top_logprobs=3),
           dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), dict(messages=[]), dict(messages=[{"role": "alien", "content": "x"}]),
           dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
           dict(stop=5)]
    for override in bad:
        args = {**dict(model="tiny", messages=user("hi"), max_tokens=2), **override}
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["message"], override
    status, err = error_of(server, "/v1/completions", {"model": "tiny", "prompt": [10 ** 8]})
    assert status == 400 and "vocabulary" in err["message"]
    status, err = error_of(server, "/v1/completions", {"model": "tiny", "prompt": ["one", "two"]})
    assert status == 400 and err["param"] == "prompt"
    status, err = error_of(server, "/v1/embeddings", {"model": "tiny", "input": ""})
    assert status == 400 and err["param"] == "input"
    r = httpx.get(server.url + "/v1/nothing", headers=server.headers(), timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    assert server.client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2).choices  # still fine


def test_prompt_too_long_for_a_full_cache(full_server):
    long = "word " * 200
    with pytest.raises(openai.BadRequestError) as e:
        full_server.client.completions.create(model="tiny", prompt=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        full_server.client.chat.completions.create(model="tiny", messages=user(long), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # streamed: the error comes before the stream
        full_server.client.chat.completions.create(model="tiny", messages=user(long), max_tokens=4, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    r = full_server.client.chat.completions.create(model="tiny", messages=user("short"), max_tokens=200)
    # the reply runs until the window is full (its last token needs no cell)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.total_tokens <= 48 + 1


def test_api_key(server):
    for key in ("wrong", ""):
        client = OpenAI(base_url=server.url + "/v1", api_key=key or "x", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            client.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/slots", timeout=TIMEOUT).status_code == 401
    assert httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT, json={}).status_code == 401


# --- slots


def slot_of(server, n_requests_before):
    """The slot that served the last request."""
    slots = server.get("/slots")
    changed = [s for s, before in zip(slots, n_requests_before) if s["n_requests"] != before]
    assert len(changed) == 1
    return changed[0]


def test_a_conversation_returns_to_its_slot(server, eog):
    args = dict(model="tiny", max_tokens=8, temperature=0, logit_bias=eog)
    convs = {"x": user("first conversation"), "y": user("second conversation, another one")}
    where = {}
    # y's second turn: least recently used would pick x's slot; the cached prefix says y's
    for turn, name in enumerate(["x", "y", "y", "x", "y", "x"]):
        before = [s["n_requests"] for s in server.get("/slots")]
        r = server.client.chat.completions.create(messages=convs[name], **args)
        convs[name] = convs[name] + [{"role": "assistant", "content": r.choices[0].message.content},
                                     {"role": "user", "content": f"turn {turn} of {name}"}]
        slot = slot_of(server, before)
        if name in where:
            assert slot["id"] == where[name]
            assert slot["last"]["prompt_evaluated"] < slot["last"]["prompt_tokens"]  # only the new turn
        where[name] = slot["id"]
    assert where["x"] != where["y"]


def test_more_clients_than_slots(server, eog):
    n_clients, turns = 6, 2

    def client(i):
        messages = user(f"client {i} says hello")
        for _ in range(turns):
            stream = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=300,
                                                           temperature=0.5, seed=i, logit_bias=eog, stream=True)
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]
        return len(messages)

    waiting, busy, done = [], [], threading.Event()

    def watch():
        while not done.is_set():
            h = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
            waiting.append(h["requests_waiting"])
            busy.append(h["slots_processing"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
            results = list(pool.map(client, range(n_clients), timeout=5 * TIMEOUT))
    finally:
        done.set()
        watcher.join()
    assert results == [1 + 2 * turns] * n_clients
    assert max(busy) <= 2 and max(waiting) >= 1  # two slots; the others queued


def test_disconnect_mid_stream_stops_generation(server, eog):
    cancelled_before = metric(server, "sepedge_requests_cancelled_total")
    body = {"model": "tiny", "messages": user("go on forever"), "max_tokens": 100000, "stream": True, "logit_bias": eog}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", headers=server.headers(), json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data:")
                if events >= 5:
                    break  # leave mid-stream: closing the response closes the connection
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        slots = server.get("/slots")
        if not any(s["busy"] for s in slots) and metric(server, "sepedge_requests_cancelled_total") > cancelled_before:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the generation went on after the client left: {server.get('/slots')}")
    last = [s["last"] for s in slots if s["last"].get("finish_reason") == "cancelled"]
    assert last and last[0]["completion_tokens"] < 100000


def metric(server, name) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=TIMEOUT).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_memory_stays_flat_under_endless_chats(server, eog):
    """Four conversations of many turns each run far past the 64-cell caches; the server's memory
    after the second half of the load is what it was after the first."""
    n_clients, turns = 4, 8

    def client(i, messages):
        for t in range(turns):
            r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0.7,
                                                      seed=i * 100 + t, logit_bias=eog)
            messages = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                                   {"role": "user", "content": f"and then {t}?"}]
        return messages

    convs = [user(f"conversation {i}") for i in range(n_clients)]
    rss = []
    for half in range(2):
        with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
            convs = list(pool.map(client, range(n_clients), convs, timeout=10 * TIMEOUT))
        rss.append(server.rss())
    slots = server.get("/slots")
    assert all(s["kv"]["live"] <= s["kv"]["capacity"] == 64 for s in slots)
    assert max(s["kv"]["tokens_seen"] for s in slots) > 4 * 64  # the conversations outgrew the caches
    assert rss[1] - rss[0] <= 16 * 2 ** 20, rss


# --- SmolLM2, end to end


@pytest.fixture(scope="module")
def smollm2_server():
    s = Served(fixtures.smollm2_gguf(), "--parallel", "2")
    yield s
    s.stop()


def test_smollm2_answers(smollm2_server):
    c = smollm2_server.client
    r = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    chat = c.chat.completions.create(model="tiny", messages=user("Hi! What is 2+2?"), max_tokens=30, temperature=0)
    assert "4" in chat.choices[0].message.content
    e = c.embeddings.create(model="tiny", input=["The cat sat on the mat.", "A cat was sitting on a mat.",
                                                 "Quarterly earnings fell sharply."])
    v = [np.array(d.embedding) for d in e.data]
    assert v[0] @ v[1] > v[0] @ v[2]
