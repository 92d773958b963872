"""Where the Triton backend's time goes on a GPU: pp512 (and --pp lengths) with each route of the prefill
products (SEPEDGE_TRITON_PREFILL=q8 / f16 / dq, the default: an A/B of the routes), tg timed as
sepedge.bench times it, and torch.profiler's kernel table of one 512-token prompt and of decode steps
(CUDA-graph replays: the profiler lists the graph's kernels), each kernel's total time and share, per
prompt and per decode step. --timeline: for each route named, the GPU's timeline of one prompt
(benchmarks/gpu_timeline.py): busy and idle time, and whether each idle gap waited for the host's launch
call or for the device.

    python benchmarks/triton_profile.py MODEL.gguf [--md out.md] [--reps 3] [--pp 512,4096] [--timeline f16,dq]
        [--env SEPEDGE_TRITON_F16_DECODE --modes 1,3]

--env / --modes: the A/B of a switch read at each launch (as SEPEDGE_TRITON_F16_DECODE, the Q4_K / Q6_K
tile decoder of the f16 and dq routes) at each length and route: every mode compiled and tuned first,
then the modes interleaved run by run (drift falls on all of them), t/s per mode and against the first;
the tables below then take the first mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import gpu_timeline  # benchmarks/, beside this file


def kernel_table(prof, per: int) -> list[tuple[str, float, int]]:
    """(kernel name, µs per unit, launches per unit) from a profile of `per` units, longest first."""
    tot, cnt = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):  # a kernel (or memcpy) on the GPU's timeline
            tot[e.name] += e.time_range.elapsed_us()
            cnt[e.name] += 1
    return sorted(((n, t / per, cnt[n] // per) for n, t in tot.items()), key=lambda r: -r[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--pp", default="512", help="prompt lengths of the A/B, comma-separated")
    ap.add_argument("--routes", default="q8,f16,dq", help="prefill routes of the A/B, comma-separated")
    ap.add_argument("--table-route", default="dq", help="the prefill route of the kernel table")
    ap.add_argument("--timeline", default="", help="prefill routes whose 512-token prompt's timeline is reduced")
    ap.add_argument("--env", default="", help="a switch read at each launch, A/B'd over --modes per length and route")
    ap.add_argument("--modes", default="", help="the values of --env, comma-separated (the first: the reference)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m] if args.env else []
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sepedge import Engine
    rng = np.random.default_rng(0)
    out = [f"# Triton profile: {Path(args.model).name} on {torch.cuda.get_device_name()}", ""]
    pps = [int(n) for n in args.pp.split(",")]
    with Engine(args.model, device="triton", n_ctx=max(1024, max(pps) + 64)) as llm:
        toks_all = rng.integers(0, llm.n_vocab, max(pps)).tolist()
        def pp(n_pp: int) -> float:
            llm.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.eval(toks_all[:n_pp])
            return n_pp / (time.perf_counter() - t0)

        for n_pp in pps:
            for mode in args.routes.split(","):
                os.environ["SEPEDGE_TRITON_PREFILL"] = mode
                if modes:  # the A/B of --env: each mode tuned, then the modes interleaved run by run
                    ab: dict[str, list[float]] = {m: [] for m in modes}
                    for m in modes:
                        os.environ[args.env] = m
                        pp(n_pp)  # compiles and autotunes this mode's kernels
                    for _ in range(args.reps):
                        for m in modes:
                            os.environ[args.env] = m
                            ab[m].append(pp(n_pp))
                    os.environ[args.env] = modes[0]
                    ref = statistics.fmean(ab[modes[0]])
                    for m in modes:
                        mean = statistics.fmean(ab[m])
                        out.append(f"- pp{n_pp} with the {mode} prefill products, {args.env}={m}: {mean:.1f} t/s "
                                   f"({mean / ref:.3f} of {modes[0]}; {', '.join(f'{r:.0f}' for r in ab[m])})")
                        print(out[-1], flush=True)
                    continue
                pp(n_pp)  # compiles and autotunes
                runs = [pp(n_pp) for _ in range(args.reps)]
                out.append(f"- pp{n_pp} with the {mode} prefill products: {statistics.fmean(runs):.1f} t/s "
                           f"({', '.join(f'{r:.0f}' for r in runs)})")
                print(out[-1], flush=True)
        toks = toks_all[:512]
        timelines = []
        for mode in [m for m in args.timeline.split(",") if m]:
            os.environ["SEPEDGE_TRITON_PREFILL"] = mode
            llm.reset()
            llm.eval(toks)  # compiled and tuned before the profile
            llm.reset()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                llm.eval(toks)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e6
            s = gpu_timeline.summarize(gpu_timeline.from_profile(prof), wall)
            timelines += gpu_timeline.markdown(s, f"timeline of one {len(toks)}-token prompt, {mode} prefill products "
                                                  f"(under the profiler: its own host cost included)")
            print("\n".join(timelines[-12:]), flush=True)
        os.environ["SEPEDGE_TRITON_PREFILL"] = args.table_route  # the route of the tables below
        llm.reset()
        llm.eval(toks[:16])
        for t in toks[:4]:
            llm.eval([t])  # the graph's capture
        t0 = time.perf_counter()
        for t in toks[:64]:
            llm.eval([t])
        out.append(f"- tg (64 steps after 20 tokens): {64 / (time.perf_counter() - t0):.1f} t/s")
        print(out[-1], flush=True)
        llm.reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            llm.eval(toks)
            torch.cuda.synchronize()
        pre = kernel_table(prof, 1)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for t in toks[:args.steps]:
                llm.eval([t])
            torch.cuda.synchronize()
        dec = kernel_table(prof, args.steps)
    out += [""] + timelines
    for title, rows in ((f"one 512-token prompt ({args.table_route} prefill products)", pre), ("one decode step", dec)):
        total = sum(t for _, t, _ in rows)
        out += ["", f"{title}: kernels {total:.0f} µs", "", "| kernel | µs | launches | share |", "|---|---:|---:|---:|"]
        out += [f"| {n[:70]} | {t:.1f} | {c} | {t / total:.1%} |" for n, t, c in rows[:25]]
    text = "\n".join(out) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
