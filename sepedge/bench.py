"""`sepedge bench`: prompt processing and generation speed, measured as llama-bench measures them.

pp N: N random tokens evaluated at once (in n_batch chunks), tokens/s = N / time.
tg N: N single-token decode steps with random tokens, tokens/s = N / time.
Each test runs once to warm up (the whole prompt, as llama-bench does; 16 decode steps), then
`repetitions` times from a cleared cache (after `depth` tokens of untimed history, if any, processed
anew each time); the result is mean and standard deviation of the runs' tokens/s.
"""

from __future__ import annotations

import statistics
import time

import gguf
import numpy as np


def _history(llm, rng, depth: int) -> None:
    llm.reset()
    if depth:
        llm.eval(rng.integers(0, llm.n_vocab, depth).tolist())


def _pp(llm, rng, n: int, depth: int) -> float:
    _history(llm, rng, depth)
    tokens = rng.integers(0, llm.n_vocab, n).tolist()
    t0 = time.perf_counter()
    llm.eval(tokens)
    return n / (time.perf_counter() - t0)


def _tg(llm, rng, n: int, depth: int) -> float:
    _history(llm, rng, depth)
    tokens = rng.integers(0, llm.n_vocab, n).tolist()
    t0 = time.perf_counter()
    for t in tokens:
        llm.eval([t])
    return n / (time.perf_counter() - t0)


def bench(llm, n_prompt: int = 512, n_gen: int = 128, depth: int = 0, repetitions: int = 5, seed: int = 0) -> list[dict]:
    """Rows of results: test name, tokens/s mean and sd, and the runs."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind, n, run in (("pp", n_prompt, _pp), ("tg", n_gen, _tg)):
        if n <= 0:
            continue
        # warm up, without the history (first-call costs: pages, graphs, the GPU libraries' first
        # products of each shape): the whole prompt, as llama-bench's warm-up runs it; 16 steps of decode
        run(llm, rng, n if kind == "pp" else min(n, 16), 0)
        runs = [run(llm, rng, n, depth) for _ in range(repetitions)]
        rows.append({"test": f"{kind}{n}" + (f"@d{depth}" if depth else ""), "n": n, "depth": depth,
                     "tokens_per_second": statistics.fmean(runs),
                     "sd": statistics.stdev(runs) if len(runs) > 1 else 0.0, "runs": runs})
    return rows


def format_table(llm, rows: list[dict], n_threads: int | None) -> str:
    info = llm.info
    stats = llm.kv_stats()
    size = f"{info['n_bytes'] / 2 ** 20:.2f} MiB"
    if info.get("n_bytes_packed"):  # the CPU backend's repacked copies, held beside the file's mapping
        size += f" + {info['n_bytes_packed'] / 2 ** 20:.2f} MiB repacked"
    ftype = info["file_type"]
    kind = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype in gguf.LlamaFileType._value2member_map_ \
        else str(ftype)
    params = f"{info['n_params'] / 1e6:.2f} M"
    head = ("| model | size | params | backend | kv mode | test | t/s |\n"
            "| --- | ---: | ---: | --- | --- | ---: | ---: |")
    backend = {"cuda": "CUDA", "triton": "Triton"}.get(llm.device, f"CPU {n_threads or 'all'} threads")
    lines = [head]
    for r in rows:
        lines.append(f"| {info['arch']} {kind} | {size} | {params} | {backend} | "
                     f"{stats['mode']} ({stats['capacity']}) | {r['test']} | {r['tokens_per_second']:.2f} ± {r['sd']:.2f} |")
    return "\n".join(lines)
