"""CUDA speed and memory, sepedge against llama.cpp on the same GGUF files (issue D).

For each model: pp512, pp4096, tg128, and tg128 after DEPTH tokens of history (llama.cpp and sepedge with
the full cache; sepedge's sepllm-stream cache with its default c = 800), each run as its own
process (llama-bench, `sepedge bench --device cuda`), the two tools alternating row by row. Peak
VRAM is the most nvidia-smi reported in use during the run, minus what was in use before it.

    python benchmarks/cuda_bench.py --llama-bench BIN MODEL.gguf [MODEL.gguf ...] [--reps 3] [--depth 32768]
                                    [--tests pp512,pp4096,tg128,tg128@d32768] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class VramPeak:
    """Samples nvidia-smi's memory.used (MiB) every 50 ms while a command runs."""

    def __init__(self):
        self.base = self.sample()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_llama(bin_path: str, model: str, test: dict, reps: int) -> dict:
    cmd = [bin_path, "-m", model, "-ngl", "99", "-fa", "1", "-r", str(reps), "-o", "json",
           "-p", str(test["p"]), "-n", str(test["n"])]
    if test["d"]:
        cmd += ["-d", str(test["d"])]
    with VramPeak() as v:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    rows = json.loads(done.stdout)
    r = rows[-1]
    return {"tps": r["avg_ts"], "sd": r["stddev_ts"], "vram_mib": v.peak - v.base, "cmd": " ".join(cmd[1:])}


def run_ours(model: str, test: dict, reps: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "sepedge.cli", "bench", model, "--device", "cuda", "-r", str(reps), "--json",
           "-p", str(test["p"]), "-n", str(test["n"]), "-d", str(test["d"]), "--kv-mode", mode]
    with VramPeak() as v:
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    r = json.loads(done.stdout)[-1]
    return {"tps": r["tokens_per_second"], "sd": r["sd"], "vram_mib": v.peak - v.base,
            "cmd": "sepedge " + " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-depth", action="store_true", help="skip the rows with history")
    ap.add_argument("--tests", default=None, help="only these rows, comma-separated names (pp512,tg128,...)")
    args = ap.parse_args()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    tests = [{"name": "pp512", "p": 512, "n": 0, "d": 0}, {"name": "pp4096", "p": 4096, "n": 0, "d": 0},
             {"name": "tg128", "p": 0, "n": 128, "d": 0}]
    if not args.no_depth:
        tests.append({"name": f"tg128@d{args.depth}", "p": 0, "n": 128, "d": args.depth})
    if args.tests:
        tests = [t for t in tests if t["name"] in args.tests.split(",")]
    results = {"gpu": gpu, "rows": []}
    for i, model in enumerate(args.models):
        for j, test in enumerate(tests):
            llama = ours = stream = None
            first_llama = (i + j) % 2 == 0  # alternate which tool goes first
            reps = min(args.reps, 2) if test["d"] else args.reps  # each repetition rebuilds the history
            for who in (("llama", "ours") if first_llama else ("ours", "llama")):
                if who == "llama":
                    llama = run_llama(args.llama_bench, model, test, reps)
                else:
                    ours = run_ours(model, test, reps, "full")
            if test["n"]:
                stream = run_ours(model, test, reps, "sepllm-stream")
            row = {"model": Path(model).name, "test": test["name"], "llama.cpp": llama, "sepedge": ours,
                   "sepedge sepllm-stream": stream}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    def fmt(r):
        if not r:
            return "-"
        if "error" in r:
            return "error"
        return f"{r['tps']:.1f} ± {r['sd']:.1f}"

    lines = [f"GPU: {results['gpu']}", "",
             "| model | test | llama.cpp t/s | sepedge full t/s | ratio | sepedge sepllm-stream t/s | VRAM llama.cpp / full / stream (MiB) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        l, o, s = r["llama.cpp"], r["sepedge"], r["sepedge sepllm-stream"]
        ratio = f"{o['tps'] / l['tps']:.2f}" if l and o and "tps" in l and "tps" in o else "-"
        vram = " / ".join(str(x.get("vram_mib", "-")) if x else "-" for x in (l, o, s))
        lines.append(f"| {r['model']} | {r['test']} | {fmt(l)} | {fmt(o)} | {ratio} | {fmt(s)} | {vram} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
