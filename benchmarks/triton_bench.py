"""Triton backend speed (issue G): `device="triton"` against sepedge's CUDA path and llama.cpp on the
same GGUF files, in the same run. Rows per model: pp512 and tg128 (full cache), tg128 of the
sepllm-stream cache (default sizes, c = 800) after 0 and after DEPTH tokens of history; and the
achieved weight bandwidth of the decode products (every matrix of layer 0 and the output head,
bytes / time) and of whole decode steps (the file's matrix bytes x tokens/s) next to the measured
copy rate.

    python benchmarks/triton_bench.py MODEL.gguf [...] [--llama-bench BIN] [--devices triton,cuda]
                                      [--reps 3] [--depth 32768] [--json results.json] [--md results.md]

Each invocation adds its rows to the JSON file (so a session can measure in several calls) and
rewrites the markdown table from all of them; the tiles Triton's autotuner chose in this process go
under "configs" (processes can tune differently). sepedge rows run in this process through
sepedge.bench (what `sepedge bench` runs); llama.cpp's through llama-bench (-fa 1, -ngl 99).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def copy_rate() -> float:
    """Device-to-device copy through torch, bytes read + written per second (the ceiling of a
    kernel that streams its weights once)."""
    import torch
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / sorted(ts)[len(ts) // 2]


def product_bandwidth(model: str) -> dict:
    """GB/s of the decode products over layer 0's matrices and the output head (activations already in
    their 8-bit form: the product alone, each launch replayed from a CUDA graph so that Python's
    launch cost stays out), weight bytes as the backend holds them (repacked where it repacks);
    TFLOP/s of the prefill products of 512 tokens."""
    import torch
    import triton.testing

    from sepedge import kernels as K
    from sepedge.triton_backend import TritonWeights
    W = TritonWeights(model)
    names = [n for n in W.w if n.startswith("blk.0.")] + ["output.weight"]
    out = {}
    total_b = total_t = 0.0
    per = {}
    for n in names:
        w, qtype, k = W.w[n]
        nbytes = w.nbytes if isinstance(w, K.Packed) else w.numel()
        x = K.act_q8(torch.randn(1, k, device="cuda"), keep_float=True)
        fn = lambda: K.matvec(w, qtype, x)  # noqa: E731
        fn()  # compiles and autotunes outside the graph
        torch.cuda.synchronize()
        t = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e-3
        per[n] = {"type": K.NAMES[qtype], "bytes": nbytes, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                  "packed": isinstance(w, K.Packed)}
        total_b += nbytes
        total_t += t
        if n.endswith("ffn_gateup.weight") and isinstance(w, K.Packed) and w.shape[0] % 64 == 0:
            # the same bytes through the fused gate/up product (SEPEDGE_TRITON_FUSE=1), 8-bit h out
            fn = lambda: K.matvec_glu(w, qtype, x)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            t = triton.testing.do_bench_cudagraph(fn, rep=50) * 1e-3
            per[n + " glu"] = {"type": K.NAMES[qtype], "bytes": nbytes, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                               "packed": True}
    out["wide"] = {"GBps": total_b / total_t / 1e9, "matrices": per}
    out["prefill"] = {}
    for n in names[:-1]:
        w, qtype, k = W.w[n]
        x = K.act_q8(torch.randn(512, k, device="cuda"))
        t = triton.testing.do_bench(lambda: K.matmul(w, qtype, x), warmup=5, rep=25) * 1e-3
        out["prefill"][f"{n} {K.NAMES[qtype]}"] = 2 * 512 * w.shape[0] * k / t / 1e12
    from sepedge.kernels.matmul import _tuned as mm_tuned
    from sepedge.kernels.matvec import _tuned  # the tiles triton.autotune chose, per type and shape
    # keyed by (type, glu, alt): the fused gate/up product (kernels.matvec_glu) and SEPEDGE_TRITON_Q4K's kernels
    # have their own tiles
    out["tuned"] = {K.NAMES[q] + (" glu" if glu else "") + (" alt" if alt else ""):
                    {str(k): str(c) for k, c in t.cache.items()} for (q, glu, alt), t in _tuned.items()}
    out["tuned_prefill"] = {str(k): str(c) for t in mm_tuned.values() for k, c in t.cache.items()}
    del W
    torch.cuda.empty_cache()
    return out


def decode_bytes(model: str) -> int:
    """Bytes of the matrices one decode step reads (every 2-D weight but the token embedding, which
    only gathers a row; the embedding too when it is the tied output head), as in the file."""
    import gguf
    r = gguf.GGUFReader(model)
    names = {t.name for t in r.tensors}
    return sum(int(t.n_bytes) for t in r.tensors if len(t.shape) > 1 and t.shape[1] > 1
               and (t.name != "token_embd.weight" or "output.weight" not in names))


def run_sepedge(model: str, device: str, reps: int, depth: int, stream: bool = True) -> list[dict]:
    from sepedge import Engine
    from sepedge.bench import bench
    rows = []
    t0 = time.perf_counter()
    with Engine(model, device=device, n_ctx=1024) as llm:
        load = time.perf_counter() - t0
        if device == "triton":  # a whole prompt first: bench's 16-token warm-up compiles other tiles than 512's
            llm.eval(list(range(1, 513)))
            llm.reset()
        for r in bench(llm, 512, 128, 0, reps):
            rows.append({"test": r["test"], "kv_mode": "full", **_tps(r)})
    if not stream:
        return [{**r, "load_s": round(load, 1)} for r in rows]
    with Engine(model, device=device, kv_mode="sepllm-stream") as llm:
        for d in (0, depth):
            for r in bench(llm, 0, 128, d, reps if d == 0 else 1):  # each repetition rebuilds the history
                rows.append({"test": r["test"], "kv_mode": "sepllm-stream", **_tps(r)})
    for r in rows:
        r["load_s"] = round(load, 1)
    return rows


def _tps(r: dict) -> dict:
    return {"tps": r["tokens_per_second"], "sd": r["sd"]}


def run_llama(bin_path: str, model: str, reps: int) -> list[dict]:
    rows = []
    for name, p, n in (("pp512", 512, 0), ("tg128", 0, 128)):
        cmd = [bin_path, "-m", model, "-ngl", "99", "-fa", "1", "-r", str(reps), "-o", "json", "-p", str(p), "-n", str(n)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"test": name, "kv_mode": "full", "error": done.stderr[-1000:]})
            continue
        r = json.loads(done.stdout)[-1]
        rows.append({"test": name, "kv_mode": "full", "tps": r["avg_ts"], "sd": r["stddev_ts"]})
    return rows


def table(res: dict) -> str:
    def get(model, who, test, mode):
        for r in res["rows"]:
            if (r["model"], r["who"], r["test"], r["kv_mode"]) == (model, who, test, mode) and "tps" in r:
                return r
        return None

    def fmt(r):
        return f"{r['tps']:.1f} ± {r['sd']:.1f}" if r else "-"

    def ratio(a, b):
        return f"{a['tps'] / b['tps']:.2f}" if a and b else "-"

    models = list(dict.fromkeys(r["model"] for r in res["rows"]))
    depth = res.get("depth", 32768)
    lines = [f"GPU: {res.get('gpu', '?')}; {res.get('versions', '')}", "",
             "| model | test | Triton t/s | sepedge CUDA t/s | llama.cpp t/s | Triton / CUDA | Triton / llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        for test, mode, label in (("pp512", "full", "pp512"), ("tg128", "full", "tg128"),
                                  ("tg128", "sepllm-stream", "tg128 sepllm-stream"),
                                  (f"tg128@d{depth}", "sepllm-stream", f"tg128 sepllm-stream after {depth}")):
            t, c, ll = get(m, "triton", test, mode), get(m, "cuda", test, mode), get(m, "llama.cpp", test, mode)
            if not (t or c or ll):
                continue
            lines.append(f"| {m} | {label} | {fmt(t)} | {fmt(c)} | {fmt(ll)} | {ratio(t, c)} | {ratio(t, ll)} |")
    lines.append("")
    for m in models:
        ratios = []
        for who in ("triton", "cuda"):
            a, b = get(m, who, f"tg128@d{depth}", "sepllm-stream"), get(m, who, "tg128", "sepllm-stream")
            if a and b:
                ratios.append(f"{'Triton' if who == 'triton' else 'CUDA'} {a['tps'] / b['tps']:.2f}")
        if ratios:
            lines.append(f"- {m}: sepllm-stream decode after {depth} tokens / after 0: " + ", ".join(ratios))
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"- {r['model']} {r['who']}: error ({r['error'][-300:].strip()})")
    cr = res.get("copy_TBps")
    if cr and res.get("decode_bytes"):
        lines += ["", f"Whole decode steps (tg128, full cache): matrix bytes read per token (the file's) x t/s, "
                      f"as a share of the copy rate {cr:.2f} TB/s (read + written):", "",
                  "| model | who | tg128 t/s | weight TB/s | share of copy |", "|---|---|---:|---:|---:|"]
        for m in models:
            nb = res["decode_bytes"].get(m)
            for who in ("triton", "cuda", "llama.cpp"):
                r = get(m, who, "tg128", "full")
                if nb and r:
                    lines.append(f"| {m} | {who} | {r['tps']:.1f} | {nb * r['tps'] / 1e12:.2f} | "
                                 f"{nb * r['tps'] / 1e12 / cr:.0%} |")
    bw = res.get("bandwidth", {})
    if bw:
        lines += ["", f"Decode products alone (layer 0's matrices + output head, each replayed from a CUDA graph; "
                      f"bytes as held on the device / time; copy rate {cr:.2f} TB/s):" if cr else "Decode products:", "",
                  "| model | all TB/s | share of copy |", "|---|---:|---:|"]
        for m, b in bw.items():
            frac = f"{b['wide']['GBps'] / 1e3 / cr:.0%}" if cr else "-"
            lines.append(f"| {m} | {b['wide']['GBps'] / 1e3:.2f} | {frac} |")
        for m, b in bw.items():
            if b.get("prefill"):
                lines += ["", f"{m}, prefill products of 512 tokens (8-bit activations, TFLOP/s): "
                          + ", ".join(f"{n.removeprefix('blk.0.')} {v:.1f}" for n, v in b["prefill"].items())]
            lines += ["", f"{m}, per matrix (GB/s, share of the copy rate): "
                      + ", ".join(f"{n.removeprefix('blk.0.').removesuffix('.weight')} {v['type']} {v['GBps']:.0f}"
                                  + (f" ({v['GBps'] / 1e3 / cr:.0%})" if cr else "")
                                  for n, v in b["wide"]["matrices"].items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--devices", default="triton,cuda")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=32768)
    ap.add_argument("--no-stream", action="store_true", help="pp512 and tg128 of the full cache only")
    ap.add_argument("--bandwidth", action="store_true", help="measure the decode products' bandwidth too")
    ap.add_argument("--json", type=Path, default=RESULTS / "triton_bench.json")
    ap.add_argument("--md", type=Path, default=RESULTS / "triton_bench.md")
    args = ap.parse_args()
    res = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    res["depth"] = args.depth
    if args.models:
        import torch
        import triton
        res["gpu"] = torch.cuda.get_device_name()
        res["versions"] = f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}"

    def save():
        args.json.write_text(json.dumps(res, indent=1))
        args.md.write_text("# Triton backend speed\n\n`python benchmarks/triton_bench.py` (benchmarks/cuda_session.sh "
                           "phase `tritonbench`); random-weight files from benchmarks/random_gguf.py.\n\n"
                           + table(res) + "\n")

    if args.models:
        res.setdefault("decode_bytes", {})
        for m in args.models:
            res["decode_bytes"][Path(m).name] = decode_bytes(m)
    if args.bandwidth and args.models:
        res["copy_TBps"] = copy_rate() / 1e12
        res.setdefault("bandwidth", {})
        for m in args.models:
            res["bandwidth"][Path(m).name] = product_bandwidth(m)
            print(Path(m).name, {k: round(v["GBps"]) for k, v in res["bandwidth"][Path(m).name].items()
                                 if isinstance(v, dict) and "GBps" in v}, flush=True)
            save()
    for m in args.models:
        for who in [d for d in args.devices.split(",") if d] + (["llama.cpp"] if args.llama_bench else []):
            try:
                rows = run_llama(args.llama_bench, m, args.reps) if who == "llama.cpp" else \
                    run_sepedge(m, who, args.reps, args.depth, not args.no_stream)
            except Exception as e:  # one failing tool must not lose the others' rows
                rows = [{"test": "all", "kv_mode": "-", "error": f"{type(e).__name__}: {e}"}]
            res["rows"] = [r for r in res["rows"] if not (r["model"] == Path(m).name and r["who"] == who
                                                          and (r["kv_mode"] in ("full", "-") or not args.no_stream))]
            for r in rows:
                res["rows"].append({"model": Path(m).name, "who": who, **r})
                print(json.dumps(res["rows"][-1]), flush=True)
            if who == "triton":  # the tiles this process tuned (another process may tune others)
                from sepedge.kernels.tuning import tuned_configs
                res.setdefault("configs", {})[Path(m).name] = tuned_configs()
            save()
    save()
    print(table(res))


if __name__ == "__main__":
    sys.exit(main())
