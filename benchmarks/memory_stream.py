"""Resident memory while streaming a million tokens through a sepllm-stream cache (issue B).

Feeds Shakespeare (repeated) through `Engine.eval` in 4096-token pieces and records the process's
RSS every 100K tokens; it must stay flat, since the cache's cells are allocated once.

    python benchmarks/memory_stream.py [--model PATH] [--tokens 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, shakespeare  # noqa: E402

from sepedge import Engine  # noqa: E402
from sepedge.default_model import package_gguf  # noqa: E402


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    args = ap.parse_args()
    model = args.model or package_gguf()
    rows = []
    with Engine(model, kv_mode="sepllm-stream", n_init=4, n_sep=64, n_local=256, n_cache=800) as llm:
        text = llm.tokenize(shakespeare())
        fed, piece, t0 = 0, 4096, time.perf_counter()
        rows.append((0, rss_mib(), llm.kv_stats()))
        while fed < args.tokens:
            start = fed % (len(text) - piece)
            llm.eval(text[start:start + piece])
            fed += piece
            if fed // args.every != (fed - piece) // args.every:
                rows.append((fed, rss_mib(), llm.kv_stats()))
                print(f"{fed} tokens: RSS {rows[-1][1]:.1f} MiB, {rows[-1][2]['live']} live cells, "
                      f"{fed / (time.perf_counter() - t0):.0f} tok/s", flush=True)
    lines = [
        "# Memory while streaming through a sepllm-stream cache",
        "",
        f"Model: `{Path(model).name}`; cache sepllm-stream n_init 4, n_sep 64, n_local 256, n_cache 800. "
        f"Input: Shakespeare, repeated, fed 4096 tokens per `Engine.eval` call. Machine: {machine()}. "
        f"Command: `python benchmarks/memory_stream.py`.",
        "",
        "| tokens | RSS (MiB) | live cells | KV bytes | tokens evicted |",
        "|---|---|---|---|---|",
    ]
    for fed, rss, s in rows:
        lines.append(f"| {fed} | {rss:.1f} | {s['live']} | {s['kv_bytes']} | {s['tokens_evicted']} |")
    growth = rows[-1][1] - rows[1][1] if len(rows) > 2 else float("nan")
    lines += ["", f"RSS change from {rows[1][0]} to {rows[-1][0]} tokens: {growth:+.1f} MiB; "
              f"{fed / (time.perf_counter() - t0):.0f} tokens/s overall.", ""]
    out = ROOT / "benchmarks" / "results" / "memory_stream.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
