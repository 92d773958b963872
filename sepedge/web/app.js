// The chat page of `sepedge serve`: plain DOM code, no framework, nothing loaded from elsewhere.
// Model text is only ever put into the page as text nodes (textContent), never parsed as HTML, so a
// reply holding <script> or <img onerror=...> shows as those characters and runs nothing.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "sepedge.conversations", CURRENT = "sepedge.current", SETTINGS = "sepedge.settings";
const KEY = "sepedge.apiKey";
const POLL_MS = 300;          // how often the cache view is refreshed while a reply streams
const SHOWN_TOKENS = 4000;    // the cache view shows at most the last this many tokens

let convs = load(STORE, []);
let current = localStorage.getItem(CURRENT);
let model = null;
let running = null;           // {controller, conv, msg} while a reply streams

function load(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(convs));
  if (current) localStorage.setItem(CURRENT, current);
}
function conv() { return convs.find((c) => c.id === current); }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// --- the API key: asked for when the server answers 401, kept in the browser

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}
let asking = null;  // one dialog for all the requests that met a 401
function askKey() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dlg = $("keydlg");
    $("keyinput").value = $("apikey").value;
    dlg.addEventListener("close", () => {
      const key = $("keyinput").value.trim();
      if (key) { $("apikey").value = key; localStorage.setItem(KEY, key); }
      asking = null;
      resolve(Boolean(key));
    }, { once: true });
    dlg.showModal();
  });
  return asking;
}
// fetch with the key; on 401 ask for it once and try again
async function api(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, { ...init, headers: headers() });
    if (r.status !== 401 || attempt > 0 || !(await askKey())) return r;
  }
}
async function errorText(r) {
  try { const j = await r.json(); return j.error?.message || JSON.stringify(j); } catch { return r.statusText; }
}

// --- markdown: fenced code blocks, headings, lists, inline code, bold and italics, built as DOM

function renderMarkdown(text, into) {
  into.replaceChildren();
  const lines = text.split("\n");
  let para = null, list = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {  // a code block, to the closing fence (or the end while it streams)
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      const pre = el("pre"), code = el("code", null, body.join("\n"));
      if (fence[1]) code.dataset.lang = fence[1];
      pre.append(code);
      into.append(pre);
      para = list = null;
      continue;
    }
    if (!line.trim()) { para = list = null; continue; }
    const h = line.match(/^(#{1,6})\s+(.*)/);
    if (h) { const e = el("h" + Math.min(6, h[1].length + 2)); inline(h[2], e); into.append(e); para = list = null; continue; }
    const li = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)/);
    if (li) {
      const tag = li[1] ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) { list = el(tag); into.append(list); }
      const item = el("li"); inline(li[2], item); list.append(item);
      para = null;
      continue;
    }
    if (!para) { para = el("p"); into.append(para); } else para.append("\n");
    list = null;
    inline(line, para);
  }
}
function inline(text, into) {
  // `code`, **bold**, *italics*; everything else is text
  const re = /`([^`]+)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*/g;
  let last = 0, m;
  while ((m = re.exec(text))) {
    if (m.index > last) into.append(text.slice(last, m.index));
    if (m[1] !== undefined) into.append(el("code", null, m[1]));
    else if (m[2] !== undefined) into.append(el("strong", null, m[2]));
    else into.append(el("em", null, m[3]));
    last = re.lastIndex;
  }
  if (last < text.length) into.append(text.slice(last));
}

// --- conversations

function newConv() {
  const c = { id: String(Date.now()) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [], slot: null };
  convs.unshift(c);
  current = c.id;
  save();
  render();
}
function renderList() {
  const ul = $("convs");
  ul.replaceChildren();
  for (const c of convs) {
    const li = el("li", c.id === current ? "current" : "");
    li.append(el("span", null, c.title));
    const del = el("button", null, "×");
    del.title = "Delete";
    del.onclick = (ev) => {
      ev.stopPropagation();
      if (running) return;
      convs = convs.filter((x) => x !== c);
      if (current === c.id) current = convs[0]?.id ?? null;
      save();
      render();
    };
    li.append(del);
    li.onclick = () => { if (!running) { current = c.id; save(); render(); } };
    ul.append(li);
  }
}
function messageNode(m) {
  const div = el("div", "msg " + m.role + (m.stopped ? " stopped" : ""));
  div.append(el("div", "who", m.role));
  const body = el("div", "body");
  if (m.role === "assistant") renderMarkdown(m.content, body);
  else body.append(el("p", null, m.content));
  div.append(body);
  return div;
}
function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const c = conv();
  if (c) for (const m of c.messages) box.append(messageNode(m));
  box.scrollTop = box.scrollHeight;
}
function render() {
  renderList();
  renderMessages();
  showCache(null);
  const c = conv();
  if (c && c.slot !== null) refreshCache(c);
}

// --- chat

function settings() {
  return {
    system: $("system").value, temperature: $("temperature").value, max_tokens: $("max_tokens").value,
    extra: $("extra").value,
  };
}
function requestBody(c) {
  const s = settings();
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of c.messages) if (m.content) messages.push({ role: m.role, content: m.content });
  let extra = {};
  if (s.extra.trim()) extra = JSON.parse(s.extra);  // a mistake here is shown, nothing is sent
  const body = { model: model || "default", messages, stream: true, ...extra };
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.max_tokens !== "") body.max_tokens = Number(s.max_tokens);
  return body;
}
function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}
function setRunning(r) {
  running = r;
  $("send").hidden = Boolean(r);
  $("stop").hidden = !r;
}

async function send(text) {
  if (running) return;
  if (!conv()) newConv();
  const c = conv();
  showError("");
  let body;
  c.messages.push({ role: "user", content: text });
  try { body = requestBody(c); } catch (e) { c.messages.pop(); showError("More request fields: " + e.message); return; }
  if (c.title === "New chat") c.title = text.slice(0, 40);
  const msg = { role: "assistant", content: "" };
  c.messages.push(msg);
  save();
  renderList();
  renderMessages();
  const node = $("messages").lastElementChild;
  const controller = new AbortController();
  setRunning({ controller, conv: c, msg });
  let poller = null;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await errorText(r));
    const slot = r.headers.get("X-Sepedge-Slot");
    if (slot !== null) c.slot = Number(slot);
    poller = setInterval(() => refreshCache(c), POLL_MS);
    // Re-rendering the whole reply on every token costs O(length) per token: a fast model on a slow
    // machine then outpaces the page, and Stop never gets a turn. Render at most once a frame.
    let painting = false;
    const paint = () => { painting = false; paintReply(msg, node); };
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        msg.content += delta;
        if (!painting) { painting = true; requestAnimationFrame(paint); }
      }
    });
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else showError(String(e.message || e));
  } finally {
    clearInterval(poller);
    paintReply(msg, node);  // the last tokens, whether or not their frame came
    if (!msg.content && !msg.stopped) c.messages.pop();  // nothing came: keep the question only
    if (msg.stopped) node.classList.add("stopped");
    setRunning(null);
    save();
    if (c.slot !== null) refreshCache(c);
  }
}

function paintReply(msg, node) {
  renderMarkdown(msg.content, node.querySelector(".body"));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// Server-sent events from a fetch body: "data: {json}" blocks separated by blank lines, "[DONE]" last.
// While the server is ahead, reader.read() resolves at once and this loop would run as one chain of
// microtasks, starving clicks and frames; it yields to the event loop every YIELD_MS.
const YIELD_MS = 16;
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", yielded = performance.now();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    if (performance.now() - yielded > YIELD_MS) {
      await new Promise((resolve) => setTimeout(resolve, 0));
      yielded = performance.now();
    }
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;  // a comment (the server's keep-alive ping)
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

// --- the cache view: the conversation's tokens coloured by the region of their cell, or evicted

let cacheBusy = false;
async function refreshCache(c) {
  if (cacheBusy || c.slot === null) return;
  cacheBusy = true;
  try {
    const r = await api(`/slots/${c.slot}/cache`);
    if (r.ok && c.id === current) {
      const view = await r.json();
      showCache(view);
      // the reply has ended here but the server had not yet freed the slot: look again shortly
      if (view.busy && !running) setTimeout(() => refreshCache(c), POLL_MS);
    }
  } catch { /* the next refresh tries again */ }
  finally { cacheBusy = false; }
}
function fmtBytes(n) {
  return n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : n >= 1024 ? (n / 1024).toFixed(1) + " KiB" : n + " B";
}
function showCache(view) {
  const stats = $("stats"), box = $("tokens");
  if (!view) {
    stats.replaceChildren(); box.replaceChildren();
    $("slot").textContent = "";
    $("cache-note").textContent = "Send a message to see the slot's KV cache.";
    return;
  }
  const kv = view.kv;
  $("slot").textContent = `slot ${view.slot}${view.busy ? " (generating)" : ""}`;
  const rows = [
    ["cache mode", kv.mode], ["cells in use", `${kv.live} / ${kv.capacity}`],
    ["initial · separator · recent", `${kv.live_init} · ${kv.live_sep} · ${kv.live_recent}`],
    ["tokens seen", kv.tokens_seen], ["tokens evicted", kv.tokens_evicted], ["KV bytes", fmtBytes(kv.kv_bytes)],
  ];
  stats.replaceChildren(...rows.map(([k, v]) => {
    const tr = el("tr");
    tr.dataset.key = k;
    tr.append(el("td", null, k), el("td", null, String(v)));
    return tr;
  }));
  const t = view.tokens, n = t.ids.length, from = Math.max(0, n - SHOWN_TOKENS);
  const parts = [];
  for (let i = from; i < n; i++) {
    const s = el("span", "tok " + (t.ids[i] < 0 ? "pending" : t.regions[i]), t.texts[i]);
    s.title = `position ${t.start + i}, token ${t.ids[i]}, ${t.regions[i]}`;
    parts.push(s);
  }
  box.replaceChildren(...parts);
  const hidden = t.start + from;
  $("cache-note").textContent = hidden ? `${hidden} earlier tokens not shown.` : "";
  box.scrollTop = box.scrollHeight;
}

// --- start

function init() {
  const s = load(SETTINGS, {});
  for (const k of ["system", "temperature", "max_tokens", "extra"]) if (s[k] !== undefined) $(k).value = s[k];
  $("apikey").value = localStorage.getItem(KEY) || "";
  for (const k of ["system", "temperature", "max_tokens", "extra"]) {
    $(k).addEventListener("change", () => localStorage.setItem(SETTINGS, JSON.stringify(settings())));
  }
  $("apikey").addEventListener("change", () => localStorage.setItem(KEY, $("apikey").value.trim()));
  $("new").onclick = () => { if (!running) newConv(); };
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || running) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").onclick = () => running?.controller.abort();
  if (!conv()) current = convs[0]?.id ?? null;
  render();
  api("/v1/models").then(async (r) => {
    if (!r.ok) { showError(await errorText(r)); return; }
    const j = await r.json();
    model = j.data[0].id;
    const m = j.data[0].meta || {};
    $("model").textContent = `${model} · ${m.kv_mode ?? ""} · n_cache ${m.n_cache ?? "?"}`;
  }).catch((e) => showError(String(e)));
}
init();
