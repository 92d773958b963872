"""A/B of the CUDA backend's prefill routes on one loaded model: cuBLAS on weights dequantized to f16
(SEPEDGE_CUDA_CUBLAS=1) against the int8 tensor-core kernels (=0), each in its own context of the same
model, interleaved: prompt times from 64 to 4096 tokens (chunks of n_batch 512), and how far apart the
two routes' logits of a 512-token prompt are. Prints a table and writes JSON.

    python benchmarks/cublas_ab.py MODEL.gguf [MODEL ...] [--prompts 64,128,256,512,4096] [--reps 3]
        [--out benchmarks/results/cublas_ab.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROUTE_MIN_TOKENS = "16"  # the route on for every prompt timed here (the default threshold is 128)


def spawn(base, route: str):
    """A context of base's model with the route on ("1") or off ("0"): the switch is read when a
    context starts."""
    os.environ["SEPEDGE_CUDA_CUBLAS"] = route
    os.environ["SEPEDGE_CUDA_CUBLAS_MIN"] = ROUTE_MIN_TOKENS
    try:
        return base.spawn()
    finally:
        del os.environ["SEPEDGE_CUDA_CUBLAS"], os.environ["SEPEDGE_CUDA_CUBLAS_MIN"]


def run_model(path: Path, prompts: list[int], reps: int) -> dict:
    from sepedge import Engine
    rng = np.random.default_rng(0)
    longest = max(prompts + [512])
    with Engine(path, device="cuda", kv_type="f16", n_ctx=longest + 16, n_batch=512) as base:
        engines = {"int8": spawn(base, "0"), "cublas": spawn(base, "1")}
        tokens = rng.integers(0, base.n_vocab, longest).tolist()
        for e in engines.values():  # warm up (cuBLAS picks its kernels on the first calls)
            e.eval(tokens[:512])
            e.reset()
        times = {name: {} for name in engines}
        for p in prompts:
            for _ in range(reps):
                for name, e in engines.items():
                    e.reset()
                    t0 = time.perf_counter()
                    e.eval(tokens[:p])
                    dt = time.perf_counter() - t0
                    times[name][p] = min(times[name].get(p, dt), dt)
        logits = {}
        for name, e in engines.items():
            e.reset()
            logits[name] = e.eval_logits(tokens[:512])
        a, b = logits["cublas"].astype(np.float64), logits["int8"].astype(np.float64)
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        same_top = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
        for e in engines.values():
            e.close()
    return {"model": path.name, "ms": {n: {str(p): 1e3 * t for p, t in ts.items()} for n, ts in times.items()},
            "logits_rel_diff_512": rel, "same_argmax_512": same_top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--prompts", default="64,128,256,512,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cublas_ab.json")
    args = ap.parse_args()
    from sepedge._ffi import ffi, lib
    if lib.se_cuda_cublas_load() != 0:
        sys.exit(f"no cuBLAS: {ffi.string(lib.se_last_error()).decode()}")
    print(f"cuBLAS: {os.environ.get('SEPEDGE_CUBLAS') or 'libcublas.so.13 / .12 from the system'}")
    prompts = [int(p) for p in args.prompts.split(",")]
    results = [run_model(m, prompts, args.reps) for m in args.models]
    print("| model | prompt | int8 ms | cuBLAS ms | int8 t/s | cuBLAS t/s | speedup |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for p in prompts:
            t8, tc = r["ms"]["int8"][str(p)], r["ms"]["cublas"][str(p)]
            print(f"| {r['model']} | {p} | {t8:.1f} | {tc:.1f} | {p / t8 * 1e3:.0f} | {p / tc * 1e3:.0f} | {t8 / tc:.2f} |")
    for r in results:
        print(f"{r['model']}: 512-token logits, max |cuBLAS - int8| / max |int8| = {r['logits_rel_diff_512']:.2e}, "
              f"same argmax {r['same_argmax_512']:.1%}")
        if r["logits_rel_diff_512"] == 0:  # f16 and 8-bit activations cannot agree bit for bit
            print(f"{r['model']}: identical logits: the route did not run (a weight beyond f16's range?)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": prompts, "reps": args.reps, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
