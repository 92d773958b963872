"""A/B of a CUDA-backend switch (an environment variable) on decode, through benchmarks/cuda_profile.py:
each value in its own process, the values interleaved round by round over every case, ms a token
(CUDA graphs); a table of the means and their ratio to the first value, and with --choose the value
with the least geometric mean of those ratios over the cases appended to a file as VAR=value (so a
later phase of the same session can source it).

    python benchmarks/env_ab.py --var SEPEDGE_CUDA_MV_SPEC --values 0,1 --rounds 2 \\
        --case "/tmp/models/llama3-8b-q4_0.gguf --steps 64" --case "/tmp/models/llama3-8b-q4_k_m.gguf --steps 64" \\
        [--choose /tmp/choice.env] [--md out.md]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

PROFILE = Path(__file__).resolve().parent / "cuda_profile.py"
MS = re.compile(r"([0-9.]+) ms/token")


def run_case(case: str, var: str, value: str) -> float:
    env = dict(os.environ)
    env[var] = value
    out = subprocess.run([sys.executable, str(PROFILE), *shlex.split(case)], env=env, capture_output=True, text=True,
                         timeout=300)
    found = MS.findall(out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{var}={value} {case}: rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(found[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--var", required=True)
    ap.add_argument("--values", required=True, help="comma-separated; the first is the reference")
    ap.add_argument("--case", action="append", required=True, help="cuda_profile.py arguments (model first)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--choose", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    values = args.values.split(",")
    ms: dict[tuple[str, str], list[float]] = {(c, v): [] for c in args.case for v in values}
    for _ in range(args.rounds):
        for c in args.case:
            for v in values:
                ms[c, v].append(run_case(c, args.var, v))
                print(f"{args.var}={v} {c}: {ms[c, v][-1]:.3f} ms/token", flush=True)
    lines = [f"## {args.var}: {', '.join(values)} ({args.rounds} interleaved rounds, ms a token)", "",
             "| case | " + " | ".join(values) + " | " + " | ".join(f"{v} / {values[0]}" for v in values[1:]) + " |",
             "|---|" + "---:|" * (2 * len(values) - 1)]
    score = {v: 0.0 for v in values}
    for c in args.case:
        means = {v: statistics.fmean(ms[c, v]) for v in values}
        cells = [f"{means[v]:.3f} ± {statistics.stdev(ms[c, v]) if len(ms[c, v]) > 1 else 0:.3f}" for v in values]
        ratios = [f"{means[v] / means[values[0]]:.3f}" for v in values[1:]]
        lines.append(f"| {c} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        for v in values:
            score[v] += math.log(means[v] / means[values[0]])
    best = min(values, key=lambda v: score[v])
    lines += ["", "geometric mean of the ratios: " + ", ".join(f"{v} {math.exp(score[v] / len(args.case)):.3f}"
                                                           for v in values) + f"; least: {best}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with args.md.open("a") as f:
            f.write(text + "\n")
    if args.choose:
        with args.choose.open("a") as f:
            f.write(f"{args.var}={best}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
