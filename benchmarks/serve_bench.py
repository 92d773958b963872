"""Concurrent chat clients against `sepedge serve` and llama.cpp's `llama-server` on the same GGUF.

N clients each hold a conversation of T turns (every turn sends the whole history, as chat clients
do) with streamed replies of exactly M tokens (the end-of-generation tokens are banned through
logit_bias, so both servers do the same work). Measured per server: requests/s, time to first token
(p50, p95), generated tokens/s over the run, and the server's resident memory sampled over time.

    python tests/llama_cpp.py build-server          # llama-server, from the same sdist as the tests' peer
    python benchmarks/serve_bench.py [--model PATH] [--clients 4] [--turns 4] [--max-tokens 32] [--parallel 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine  # noqa: E402

import llama_cpp  # noqa: E402  (tests/llama_cpp.py: where the peer is built)
from sepedge._native import Model  # noqa: E402
from sepedge.default_model import package_gguf  # noqa: E402
from sepedge.tokenizer import Tokenizer  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
TOPICS = ["the sea", "mountains", "bread", "trains", "music", "gardens", "the moon", "chess"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return float("nan")


class Server:
    def __init__(self, name: str, cmd: list[str], port: int):
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{name} did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chat_turn(http: httpx.Client, url: str, messages: list, max_tokens: int, bias: dict, seed: int) -> dict:
    """One streamed request: time to the first content token, the reply, its token count."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
            "logit_bias": bias, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, tokens = None, [], None
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
    return {"ttft": ttft if ttft is not None else float("nan"), "seconds": time.perf_counter() - t0,
            "text": "".join(text), "tokens": tokens if tokens is not None else max_tokens}


def run_load(server: Server, clients: int, turns: int, max_tokens: int, bias: dict) -> dict:
    rss, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            rss.append((time.perf_counter() - t0, rss_mib(server.proc.pid)))
            stop.wait(0.5)

    def client(i: int) -> list[dict]:
        messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        results = []
        with httpx.Client(timeout=600) as http:
            for t in range(turns):
                r = chat_turn(http, server.url, messages, max_tokens, bias, seed=1000 * i + t)
                results.append(r)
                messages = messages + [{"role": "assistant", "content": r["text"]},
                                       {"role": "user", "content": "Tell me more."}]
        return results

    with httpx.Client(timeout=600) as http:  # warm-up, not measured
        chat_turn(http, server.url, [{"role": "user", "content": "Hello"}], 4, bias, seed=0)
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            per_client = list(pool.map(client, range(clients)))
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    reqs = [r for rs in per_client for r in rs]
    ttfts = sorted(r["ttft"] for r in reqs)
    return {"server": server.name, "requests": len(reqs), "wall_s": wall, "requests_per_s": len(reqs) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "tokens": sum(r["tokens"] for r in reqs), "tokens_per_s": sum(r["tokens"] for r in reqs) / wall,
            "rss_mib": rss}


def eog_bias(model: str) -> dict:
    with Model(model) as m:
        tok = Tokenizer.from_model(m)
    return {str(t): -100 for t in tok.eog_ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file [default: SmolLM2-135M-Instruct Q4_1]")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=2, help="slots of each server")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each server, in all")
    ap.add_argument("--ctx-per-slot", type=int, default=2048, help="llama-server's context per slot")
    ap.add_argument("--skip-llama", action="store_true")
    # -nr: no extra CPU buffer types. A -march=native build of llama.cpp on a CPU that reports AMX
    # runs its AMX kernels, which stop with SIGILL where the (virtual) machine does not let processes
    # use AMX; Q4_1, the default model's type, has no other repacked CPU layout, so -nr only drops AMX.
    ap.add_argument("--llama-args", default="-nr", help="extra llama-server arguments [default: -nr]")
    args = ap.parse_args()
    model = str(args.model or package_gguf())
    bias = eog_bias(model)
    binary = None if args.skip_llama else llama_cpp.server_bin()
    if not args.skip_llama and binary is None:
        sys.exit("llama-server is not built: python tests/llama_cpp.py build-server (or set SEPEDGE_LLAMA_CPP_BIN)")
    sepedge_cmd = [sys.executable, "-m", "sepedge.cli", "serve", model, "--parallel", str(args.parallel),
                   "--threads", str(max(1, args.threads // args.parallel)), "-a", "bench", "--log-level", "warning"]
    runs = []
    port = free_port()
    s = Server("sepedge serve", [*sepedge_cmd, "--port", str(port)], port)
    try:
        runs.append(run_load(s, args.clients, args.turns, args.max_tokens, bias))
    finally:
        s.stop()
    llama_cmd = None
    if binary is not None:
        port = free_port()
        llama_cmd = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(args.parallel),
                     "-c", str(args.ctx_per_slot * args.parallel), "-t", str(args.threads), "--alias", "bench",
                     "--no-webui", *args.llama_args.split()]
        s = Server("llama-server", llama_cmd, port)
        try:
            runs.append(run_load(s, args.clients, args.turns, args.max_tokens, bias))
        finally:
            s.stop()
    write(args, model, runs, sepedge_cmd, llama_cmd)


def write(args, model: str, runs: list[dict], sepedge_cmd, llama_cmd) -> None:
    lines = ["# Concurrent chats: sepedge serve against llama-server", "",
             f"Model `{Path(model).name}`; {args.clients} clients x {args.turns} turns, each turn the whole history, "
             f"streamed replies of exactly {args.max_tokens} tokens (end-of-generation tokens banned through "
             f"logit_bias), temperature 0.7; {args.parallel} slots per server, {args.threads} threads per server. "
             f"sepedge: default cache (sepllm-stream, n_cache 800 per slot); llama-server: -c "
             f"{args.ctx_per_slot * args.parallel} ({args.ctx_per_slot} per slot). Machine: {machine()}; "
             "shared with other jobs while measured, so the numbers are noisy: a single run, not a best of several.",
             "", "Command: `python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]) + "`", "",
             "| server | requests | requests/s | TTFT p50 (ms) | TTFT p95 (ms) | tokens/s | RSS start / max / end (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        rss = [v for _, v in r["rss_mib"]]
        lines.append(f"| {r['server']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['ttft_p50_s'] * 1e3:.0f} | "
                     f"{r['ttft_p95_s'] * 1e3:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} |")
    lines += ["", "Server RSS over the run (MiB, sampled every 0.5 s; every tenth of the run shown):", ""]
    for r in runs:
        samples = r["rss_mib"]
        step = max(1, len(samples) // 10)
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        lines.append(f"- {r['server']}: " + ", ".join(f"{t:.0f}s {v:.0f}" for t, v in shown))
    lines += ["", f"sepedge command: `{' '.join(Path(c).name if c == sys.executable else c for c in sepedge_cmd)}`"]
    if llama_cmd:
        lines.append(f"llama-server command: `{' '.join(llama_cmd)}`")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_bench.md").write_text("\n".join(lines) + "\n")
    for r in runs:
        r["rss_mib"] = [[round(t, 1), round(v, 1)] for t, v in r["rss_mib"]]
    (OUT / "serve_bench.json").write_text(json.dumps({"args": vars(args), "model": model, "runs": runs},
                                                     separators=(",", ":")) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
