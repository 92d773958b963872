"""A/B of decode with the measured tile table (kernels/tile_table.py) against triton.autotune: tg128 as
sepedge.bench times it, each arm in fresh processes (the autotuner picks anew in each process, which is
the spread the table is to remove), the arms interleaved process by process (table, autotune, table, ...)
so that clock and thermal drift fall on both; per process its mean t/s, per arm the mean and sd over
processes and the ratio, and which tiles each process ran (kernels.tuning.tuned_configs).

    python benchmarks/triton_tiles_ab.py MODEL.gguf --table TABLE.json [--procs 3] [--reps 3] [--n-gen 128]
        [--md out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENV = "SEPEDGE_TRITON_TILES"


def child(model: str, reps: int, n_gen: int) -> None:
    """One process's tg runs and tiles, as one JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from sepedge import Engine
    from sepedge.bench import bench
    from sepedge.kernels.tuning import tuned_configs
    t0 = time.perf_counter()
    with Engine(model, device="triton", n_ctx=n_gen + 64) as llm:
        load = time.perf_counter() - t0
        row = bench(llm, 0, n_gen, 0, reps)[0]
    print(json.dumps({"runs": row["runs"], "load_s": round(load, 1), "gpu": torch.cuda.get_device_name(),
                      "configs": tuned_configs()}))


def run_arm(model: str, value: str, reps: int, n_gen: int) -> dict:
    env = {**os.environ, ENV: value}
    cmd = [sys.executable, __file__, model, "--child", "--reps", str(reps), "--n-gen", str(n_gen)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{ENV}={value}: rc {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(model: str, arms: dict[str, list[dict]], reps: int, n_gen: int) -> str:
    def tps(r):
        return statistics.fmean(r["runs"])

    lines = [f"# tile table A/B: {Path(model).name}", "",
             f"tg{n_gen}, {reps} repetitions a process, processes interleaved; a process's t/s is its mean", "",
             "| arm | processes t/s | mean | sd over processes | within-process sd (mean) | tile sets |",
             "|---|---|---:|---:|---:|---:|"]
    means = {}
    for arm, rows in arms.items():
        per = [tps(r) for r in rows]
        means[arm] = statistics.fmean(per)
        within = statistics.fmean(statistics.stdev(r["runs"]) if len(r["runs"]) > 1 else 0.0 for r in rows)
        sets = len({json.dumps(r["configs"], sort_keys=True) for r in rows})  # 1: every process ran the same tiles
        sd = statistics.stdev(per) if len(per) > 1 else 0.0
        lines.append(f"| {arm} | {', '.join(f'{v:.1f}' for v in per)} | {means[arm]:.1f} | {sd:.1f} | "
                     f"{within:.1f} | {sets} |")
    if len(means) == 2:
        a, b = means
        lines += ["", f"{a} / {b}: {means[a] / means[b]:.3f}"]
    for arm, rows in arms.items():
        served = [len(v) for r in rows for k, v in r["configs"].items() if k.startswith("tiles:")]
        lines.append(f"- {arm}: keys served by the table per process: {served or 'none'}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--table", default=None, help="the table arm's SEPEDGE_TRITON_TILES")
    ap.add_argument("--procs", type=int, default=3, help="processes an arm")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.reps, args.n_gen)
        return 0
    if not args.table or not Path(args.table).is_file():
        ap.error(f"--table: no such file {args.table!r}")
    values = {"table": str(Path(args.table).resolve()), "autotune": "0"}
    arms: dict[str, list[dict]] = {a: [] for a in values}
    for i in range(args.procs):
        for arm, v in values.items():
            arms[arm].append(run_arm(args.model, v, args.reps, args.n_gen))
            r = arms[arm][-1]
            print(f"process {i + 1} {arm}: {statistics.fmean(r['runs']):.1f} t/s "
                  f"({', '.join(f'{t:.1f}' for t in r['runs'])}), load {r['load_s']} s", flush=True)
    text = summary(args.model, arms, args.reps, args.n_gen)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"model": Path(args.model).name, "table": values["table"], "reps": args.reps,
                                         "n_gen": args.n_gen, "arms": arms}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
