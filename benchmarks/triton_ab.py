"""A/B of a Triton-backend switch (an environment variable) on decode: tg128 as sepedge.bench times
it (CUDA-graph decode, random tokens after an empty cache), each value in its own context over the
same loaded weights, the variable set while that context is made and its decode graph captured,
the values interleaved round by round so that clock and thermal drift fall on all of them; then
torch.profiler's decode step per value (kernel time and launches a step, the act_q8 launches left).

    python benchmarks/triton_ab.py MODEL.gguf [--env SEPEDGE_TRITON_FUSE] [--modes 0,attn,1] [--md out.md] [--reps 5]
        [--choose choice.env]

SEPEDGE_TRITON_FUSE: 0 (an act_q8 launch before every quantized product), attn (the attention merge
makes the output projection's input), 1 (and the gate/up product makes the down product's).
SEPEDGE_TRITON_PDL: 1 (decode kernels launched early, kernels/pdl.py), 0 (one after the other).
SEPEDGE_TRITON_Q4K: 0 (matvec_q4_k_kernel), 1 (matvec_q4_k_v2_kernel), 2 (and Q6_K's staged tiles;
kernels/matvec.py), read at each launch: the graph captured in a mode keeps its kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_profile import kernel_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled per mode")
    ap.add_argument("--env", default="SEPEDGE_TRITON_FUSE")
    ap.add_argument("--modes", default="0,attn,1")
    ap.add_argument("--choose", type=Path, default=None, help="append ENV=the fastest mode to this file")
    args = ap.parse_args()
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sepedge import Engine

    modes = args.modes.split(",")
    rng = np.random.default_rng(0)
    runs: dict[str, list[float]] = {m: [] for m in modes}
    tables = {}
    out = [f"# {args.env} A/B: {Path(args.model).name} on {torch.cuda.get_device_name()}", ""]
    with Engine(args.model, device="triton", n_ctx=1024) as base:
        engines = {}

        def tg(llm) -> float:
            llm.reset()
            toks = rng.integers(0, llm.n_vocab, args.n_gen).tolist()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for t in toks:
                llm.eval([t])
            return args.n_gen / (time.perf_counter() - t0)

        before = os.environ.get(args.env)
        for m in modes:  # read when a context is made (FUSE) or when its graph is captured (PDL, Q4K)
            os.environ[args.env] = m
            engines[m] = base.spawn()
            tg(engines[m])  # compiles, autotunes, captures the graph
        if before is None:
            os.environ.pop(args.env, None)
        else:
            os.environ[args.env] = before
        for _ in range(args.reps):
            for m in modes:
                runs[m].append(tg(engines[m]))
        for m in modes:
            llm = engines[m]
            llm.reset()
            llm.eval(rng.integers(0, llm.n_vocab, 20).tolist())
            for t in rng.integers(0, llm.n_vocab, 4).tolist():
                llm.eval([t])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for t in rng.integers(0, llm.n_vocab, args.steps).tolist():
                    llm.eval([t])
                torch.cuda.synchronize()
            tables[m] = kernel_table(prof, args.steps)
        for e in engines.values():
            e.close()
    ref = statistics.fmean(runs[modes[0]])
    out += [f"tg{args.n_gen}, {args.reps} interleaved rounds", "",
            f"| mode | t/s | sd | vs {modes[0]} | kernel µs a step | launches a step | act_q8 µs | act_q8 launches |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        rows = tables[m]
        act = [r for r in rows if "act_q8" in r[0]]
        mean = statistics.fmean(runs[m])
        sd = statistics.stdev(runs[m]) if len(runs[m]) > 1 else 0.0
        out.append(f"| {m} | {mean:.1f} | {sd:.1f} | "
                   f"{mean / ref:.3f} | {sum(t for _, t, _ in rows):.0f} | {sum(c for _, _, c in rows)} | "
                   f"{sum(t for _, t, _ in act):.0f} | {sum(c for _, _, c in act)} |")
    for m in modes:
        out += ["", f"decode step, {args.env}={m}", "", "| kernel | µs | launches |", "|---|---:|---:|"]
        out += [f"| {n[:70]} | {t:.1f} | {c} |" for n, t, c in tables[m][:12]]
    text = "\n".join(out) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.choose:
        with args.choose.open("a") as f:
            f.write(f"{args.env}={max(modes, key=lambda m: statistics.fmean(runs[m]))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
