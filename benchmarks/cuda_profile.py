"""Where a CUDA decode step's time goes: wall time per token; with SEPEDGE_CUDA_TIMING=1 the
library also prints each kernel's GPU time per token (launches queued back to back, timed with
events); or sum an Nsight Compute run per kernel.

    python benchmarks/cuda_profile.py MODEL.gguf [--depth N] [--kv-mode M] [--steps 64]
    SEPEDGE_CUDA_TIMING=1 python benchmarks/cuda_profile.py MODEL.gguf --steps 16
    SEPEDGE_CUDA_TIMING=prefill python benchmarks/cuda_profile.py MODEL.gguf --prompt 512   (prefill kernels)
    python benchmarks/cuda_profile.py MODEL.gguf --prompt 4096 --kv-mode sepllm-stream   (time to first token)
    SEPEDGE_CUDA_GRAPHS=0 ncu --clock-control none --csv --metrics gpu__time_duration.sum \\
        python benchmarks/cuda_profile.py MODEL.gguf --steps 8 > ncu.csv
    python benchmarks/cuda_profile.py --summarize ncu.csv --steps 8
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np


def summarize(path: Path, steps: int) -> None:
    text = path.read_text()
    start = text.find('"ID"')
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[row["Metric Unit"]]
        name = row["Kernel Name"].split("(")[0]
        per_kernel[name][0] += float(row["Metric Value"].replace(",", "")) * scale
        per_kernel[name][1] += 1
    total = sum(t for t, _ in per_kernel.values())
    print(f"| kernel | launches/token | us/token | share |\n|---|---:|---:|---:|")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {n / steps:.1f} | {t / steps:.1f} | {t / total:.1%} |")
    print(f"| total | {sum(n for _, n in per_kernel.values()) / steps:.1f} | {total / steps:.1f} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--kv-mode", default="full")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=0, help="time prompts of this many tokens instead of decode steps")
    ap.add_argument("--summarize", type=Path, help="an ncu --csv output to sum per kernel")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize, args.steps)
    from sepedge import Engine
    kw = dict(n_ctx=args.depth + args.steps + 16) if args.kv_mode == "full" else dict(kv_mode=args.kv_mode)
    rng = np.random.default_rng(0)
    if args.prompt:
        pkw = dict(n_ctx=args.prompt + 16) if args.kv_mode == "full" else dict(kv_mode=args.kv_mode)
        with Engine(args.model, device="cuda", kv_type="f16", **pkw) as llm:
            prompt = rng.integers(0, llm.n_vocab, args.prompt).tolist()
            llm.eval(prompt)  # warm up
            times = []
            for _ in range(3):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                times.append(time.perf_counter() - t0)
        dt = min(times)
        print(f"{Path(args.model).name} prompt {args.prompt} {args.kv_mode}: {dt * 1e3:.1f} ms, {args.prompt / dt:.1f} tokens/s",
              file=sys.stderr)
        return
    with Engine(args.model, device="cuda", kv_type="f16", **kw) as llm:
        if args.depth:
            llm.eval(rng.integers(0, llm.n_vocab, args.depth).tolist())
        tokens = rng.integers(0, llm.n_vocab, args.steps).tolist()
        llm.eval([tokens[0]])  # capture the graph outside the timing
        t0 = time.perf_counter()
        for t in tokens[1:]:
            llm.eval([t])
        dt = (time.perf_counter() - t0) / (args.steps - 1)
    print(f"{Path(args.model).name} depth {args.depth} {args.kv_mode}: {dt * 1e3:.3f} ms/token, "
          f"{1 / dt:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
