"""The chat page of `sepedge serve` in a real browser (Debian's chromium, driven headless by Playwright),
and the cache endpoint behind its cache view (/slots/{id}/cache) against the engine's own kv_stats.

The server runs as a subprocess on a free loopback port with the tiny random model, a small SepLLM
cache (n_cache 64, so a few dozen tokens of conversation evict some) and an API key. Without chromium
or Playwright the browser tests are skipped, unless CI is set: there they fail."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

import fixtures
from sepedge import Engine
from sepedge import engine as engine_module
from sepedge.convert import convert
from sepedge.server import Server
from test_server import KEY, SMALL_CACHE, TIMEOUT, Served

CACHE_ARGS = dict(kv_mode="sepllm-stream", n_init=4, n_sep=8, n_local=24, n_cache=64)  # = SMALL_CACHE
WAIT_MS = 60_000  # the longest the browser waits for something to appear (a small, shared machine)
LONG_REPLY_CHARS = 40_000  # a reply this long hung the page's Stop before it drew once a frame
STOP_MS = 10_000  # Stop must answer within this while such a reply streams


def chromium_path() -> str | None:
    return os.environ.get("SEPEDGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Playwright for Python is not installed (pip install -e '.[test]')"
    exe = chromium_path()
    if reason is None and exe is None:
        reason = "no chromium binary (apt-get install chromium; tests/run.sh installs it)"
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the browser tests cannot run under CI: {reason}")
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random model with SmolLM2's whole vocabulary: it has tokens such as "<script" that a
    logit_bias can force into a reply (the shared tiny models keep only the first thousand)."""
    spec = fixtures.TinySpec("page-full-vocab", n_embd=64, n_layer=2, n_head=2, n_head_kv=2, n_ff=128,
                             n_vocab=len(fixtures.smollm2_fields()["tokenizer.ggml.tokens"]))
    d = tmp_path_factory.mktemp("page-model")
    return convert(fixtures.make_tiny_checkpoint(spec, d / "hf"), d / "tiny.gguf", outtype="q8_0", progress=False)


@pytest.fixture(scope="module")
def server(tiny_model):
    s = Served(tiny_model, "--parallel", "1", "-n", "100000", *SMALL_CACHE, api_key=KEY)
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    # the server wants a key: the page asks for it
    pg.locator("#keydlg").wait_for(state="visible")
    pg.fill("#keyinput", KEY)
    pg.press("#keyinput", "Enter")
    pg.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
    yield pg
    context.close()
    assert not errors, errors


def settle(server) -> None:
    """Wait until no slot is generating (a stopped reply's cancel has reached the server)."""
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(server.url + "/health", timeout=TIMEOUT).json()["slots_processing"]:
        assert time.monotonic() < deadline, "the slot stayed busy"
        time.sleep(0.1)


def set_options(pg, max_tokens: int, extra: dict, temperature: float = 1.0) -> None:
    pg.fill("#temperature", str(temperature))
    pg.fill("#max_tokens", str(max_tokens))
    pg.fill("#extra", json.dumps(extra))


def send(pg, text: str) -> None:
    pg.fill("#input", text)
    pg.press("#input", "Enter")


def wait_reply(pg, n: int) -> None:
    """Wait until the n-th reply has ended (its message is on the page, the Stop button gone)."""
    pg.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n}"
                         " && document.getElementById('stop').hidden")


def assistant_texts(pg) -> list[str]:
    return pg.locator(".msg.assistant .body").all_text_contents()


def test_chat_streams_stops_and_survives_a_reload(page, server, eog):
    pg = page
    # a short reply, streamed, equal to what the API answers for the same request
    set_options(pg, 12, {"logit_bias": eog, "seed": 7})
    send(pg, "Hello there")
    wait_reply(pg, 1)
    reply = assistant_texts(pg)[0]
    settle(server)
    expected = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=TIMEOUT, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
        "temperature": 1.0, "seed": 7, "logit_bias": eog}).json()["choices"][0]["message"]["content"]
    assert reply.strip() and reply.split() == expected.split()  # markdown joins lines; the words are the same

    # an endless reply: text appears while it streams, then Stop ends it and frees the slot
    set_options(pg, 100000, {"logit_bias": eog})
    send(pg, "Tell me everything")
    # ... and the cache view follows it while it streams, until the conversation outgrows n_cache
    pg.wait_for_function("""() => {
        const bodies = document.querySelectorAll('.msg.assistant .body');
        return bodies.length === 2 && bodies[1].textContent.length > 40
            && document.querySelectorAll('#tokens .tok.evicted').length > 0
            && document.getElementById('slot').textContent === 'slot 0 (generating)'
            && !document.getElementById('stop').hidden; }""")
    pg.click("#stop")
    pg.locator(".msg.assistant.stopped").wait_for()
    assert pg.locator("#send").is_visible() and not pg.locator("#stop").is_visible()
    settle(server)
    metrics = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=TIMEOUT).text
    assert "sepedge_requests_cancelled_total 1" in metrics
    stopped = assistant_texts(pg)[1]

    # reload: the conversation is kept in the browser, the cache view shows the slot again
    pg.reload()
    pg.wait_for_function("document.querySelectorAll('.msg').length === 4")
    assert pg.locator("#convs li span").first.text_content() == "Hello there"
    assert pg.locator(".msg.user .body").all_text_contents() == ["Hello there", "Tell me everything"]
    assert assistant_texts(pg) == [reply, stopped]
    assert pg.locator(".msg.assistant").nth(1).get_attribute("class").split().count("stopped") == 1

    # the conversation is longer than n_cache: the view shows evicted tokens, and what the endpoint says
    pg.wait_for_function("document.querySelectorAll('#tokens .tok.evicted').length > 0")
    view = server.get("/slots/0/cache")
    kv = view["kv"]
    assert kv["tokens_evicted"] > 0 and kv["live"] <= kv["capacity"] == 64
    counts = {r: pg.locator(f"#tokens .tok.{r}").count() for r in ("init", "sep", "recent", "evicted")}
    shown = sum(counts.values())
    hidden = kv["tokens_seen"] - shown  # the page shows the last tokens of a long conversation
    assert counts["init"] == kv["live_init"] and counts["sep"] == kv["live_sep"] - sum(
        1 for r in view["tokens"]["regions"][:hidden] if r == "sep")
    assert counts["recent"] == kv["live_recent"] and counts["evicted"] <= kv["tokens_evicted"]
    stats = dict(zip(pg.locator("#stats td:first-child").all_text_contents(),
                     pg.locator("#stats td:last-child").all_text_contents()))
    assert stats["cells in use"] == f"{kv['live']} / 64" and stats["tokens seen"] == str(kv["tokens_seen"])
    assert stats["tokens evicted"] == str(kv["tokens_evicted"])
    assert "".join(pg.locator("#tokens .tok").all_text_contents()) == "".join(view["tokens"]["texts"][hidden:])


def test_stop_answers_during_a_long_fast_reply(page, server, eog):
    """The tiny model streams faster than the page can re-render a growing reply. Before the page drew
    at most once a frame and yielded between network reads, its reading loop never gave the browser a
    turn once the reply was long, and Stop could not be clicked (a 60 s timeout in CI)."""
    pg = page
    set_options(pg, 100000, {"logit_bias": eog})
    send(pg, "Tell me everything")
    pg.wait_for_function("""() => {
        const bodies = document.querySelectorAll('.msg.assistant .body');
        return bodies.length === 1 && bodies[0].textContent.length > LONG_REPLY_CHARS; }""".replace(
        "LONG_REPLY_CHARS", str(LONG_REPLY_CHARS)))
    t0 = time.monotonic()
    pg.click("#stop", timeout=STOP_MS)
    pg.locator(".msg.assistant.stopped").wait_for(timeout=STOP_MS)
    assert time.monotonic() - t0 < STOP_MS / 1000
    settle(server)


def distinct_tokens(vocab: dict[bytes, int], text: bytes, used: tuple = ()) -> list[int] | None:
    """Token ids, none twice, whose texts make up `text` (None if there are none such)."""
    if not text:
        return []
    for n in range(min(len(text), 16), 0, -1):
        t = vocab.get(text[:n])
        if t is not None and t not in used and (rest := distinct_tokens(vocab, text[n:], (*used, t))) is not None:
            return [t, *rest]
    return None


def test_html_in_a_reply_runs_nothing(page, server, tiny_model):
    pg = page
    # The reply is forced through the real server: a decreasing logit_bias on the payload's tokens puts
    # them in order, a huge repeat_penalty keeps each from coming twice (so no token may repeat, hence
    # no final ">"; parsed as HTML this would still make a <script> element)
    reply = "<script>window.pwned=1</script"
    with Engine(tiny_model, n_ctx=8) as e:
        vocab = {}
        for t in range(e.n_vocab):
            vocab.setdefault(e.detokenize([t]), t)
    ids = distinct_tokens(vocab, reply.encode())
    assert ids is not None
    alerts = []
    pg.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
    set_options(pg, len(ids), {"logit_bias": {str(t): 200 - 5 * k for k, t in enumerate(ids)}, "repeat_penalty": 1e4},
                temperature=0)
    send(pg, "Show me some HTML")
    wait_reply(pg, 1)
    assert assistant_texts(pg) == [reply]  # shown as text, exactly
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'
    set_options(pg, 2, {})
    send(pg, payload)
    wait_reply(pg, 2)
    assert pg.locator(".msg.user .body").all_text_contents() == ["Show me some HTML", payload]
    # a reply that is markdown with HTML in it: built as elements holding text
    pg.evaluate("""() => { const m = JSON.parse(localStorage.getItem('sepedge.conversations'));
        m[0].messages[3].content = '# Title\\n```html\\n<script>window.pwned=1</script>\\n```\\n'
            + 'Use `<img src=x onerror=window.pwned=1>` and **bold <b>x</b>**\\n- one\\n- *two*';
        localStorage.setItem('sepedge.conversations', JSON.stringify(m)); }""")
    pg.reload()
    pg.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
    assert assistant_texts(pg)[0] == reply
    body = pg.locator(".msg.assistant .body").nth(1)
    assert body.locator("pre code").text_content() == "<script>window.pwned=1</script>"
    assert body.locator("pre code").get_attribute("data-lang") == "html"
    assert body.locator("p code").text_content() == "<img src=x onerror=window.pwned=1>"
    assert body.locator("strong").text_content() == "bold <b>x</b>"
    assert body.locator("li").all_text_contents() == ["one", "two"] and body.locator("li em").count() == 1
    assert body.locator("h3").text_content() == "Title"
    pg.wait_for_function("document.querySelectorAll('#tokens .tok').length > 0")  # the cache view, with the payloads
    assert "<script>window.pwned=1</script" in pg.locator("#tokens").text_content()
    time.sleep(0.5)  # give an onerror handler, were there one, time to run
    assert pg.evaluate("window.pwned") is None and not alerts
    assert pg.locator("#messages script, #messages img, #messages b, #tokens script, #tokens img").count() == 0


def test_cache_endpoint_matches_the_engine(server, tiny_model, eog):
    messages = [{"role": "user", "content": "Count to a hundred"}]
    args = dict(max_tokens=90, temperature=0, logit_bias=eog)
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=TIMEOUT,
                   json={"model": "tiny", "messages": messages, **args})
    assert r.headers["x-sepedge-slot"] == "0"
    view = server.get("/slots/0/cache")
    with Engine(tiny_model, **CACHE_ARGS) as e:  # the same conversation in this process
        g = e.stream_chat(messages, 90, temperature=0, logit_bias={int(k): v for k, v in eog.items()})
        assert "".join(g) == r.json()["choices"][0]["message"]["content"]
        kv = e.kv_stats()
        tokens, positions, regions = e._ctx.cells()
        fed = g.prompt_tokens + g.tokens[:g.n_fed]  # the reply's last token is sampled, never fed
        text = e.detokenize(fed, special=True)
    assert view["kv"] == kv and view["slot"] == 0 and not view["busy"]
    assert view["cells"] == [{"position": p, "token": t, "region": g}
                             for t, p, g in zip(tokens.tolist(), positions.tolist(), regions)]
    t = view["tokens"]
    assert t["start"] == 0 and len(t["ids"]) == len(t["texts"]) == len(t["regions"]) == kv["tokens_seen"]
    for c in view["cells"]:  # each cell holds the token fed at its position
        assert t["ids"][c["position"]] == c["token"] and t["regions"][c["position"]] == c["region"]
    assert t["regions"].count("evicted") == kv["tokens_evicted"] > 0
    assert t["ids"] == fed and "".join(t["texts"]) == text.decode("utf-8", errors="replace")
    for bad in ("/slots/1/cache", "/slots/-1/cache"):
        resp = httpx.get(server.url + bad, headers=server.headers(), timeout=TIMEOUT)
        assert resp.status_code in (404, 422) and "error" in resp.json()
    assert httpx.get(server.url + "/slots/0/cache", timeout=TIMEOUT).status_code == 401  # the key guards it


def test_cache_view_is_consistent_while_generating(tiny_model, eog, monkeypatch):
    """Views read from another thread while a generation runs are each one state of the cache; the
    history of fed tokens keeps its last FED_HISTORY."""
    monkeypatch.setattr(engine_module, "FED_HISTORY", 100)
    engine = Engine(tiny_model, **CACHE_ARGS)
    srv = Server(engine, 1, "tiny")
    slot = srv.pool.slots[0]
    g = engine.stream_chat([{"role": "user", "content": "Go on and on"}], 300, temperature=0,
                           logit_bias={int(k): v for k, v in eog.items()})
    done = threading.Event()

    def run():
        for _ in g:
            pass
        done.set()

    th = threading.Thread(target=run)
    th.start()
    views = 0
    try:
        while not done.is_set() or views < 3:
            v = srv.cache_view(slot)
            kv, t = v["kv"], v["tokens"]
            assert len(v["cells"]) == kv["live"] <= kv["capacity"]
            # (one more while the history has not yet recorded the pass the cells show)
            assert len(t["ids"]) == kv["tokens_seen"] - t["start"] and t["start"] <= max(0, kv["tokens_seen"] - 100)
            window = [c for c in v["cells"] if c["position"] >= t["start"]]
            assert sum(r != "evicted" for r in t["regions"]) == len(window)
            for c in window:
                i = c["position"] - t["start"]
                assert t["regions"][i] == c["region"] and t["ids"][i] in (c["token"], -1)
            views += 1
    finally:
        th.join()
        srv.close()
    assert views >= 3 and g.finish_reason == "length"
    assert t["start"] == kv["tokens_seen"] - 100 > 0 and -1 not in t["ids"]
