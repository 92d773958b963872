"""Why SepLLM's streaming cache does (not) beat StreamingLLM on our models (issue J, item 2).

Measurements, each written to benchmarks/results/quality/why-<what>-<model>-<text>.json:

  lifetimes   the native policy (sepedge.cache_plan, no model run) over a long stream: separator
              share of the text, and for each separator evicted from the separator region its age
              (query position - its position) then; "young" = evicted before it was older than
              StreamingLLM's window at the same capacity, i.e. it never held anything StreamingLLM
              would not have held.
  mass        the torch reference under full attention: per layer, the share of attention each
              query (past `--skip` tokens) gives to the initial tokens, to separators outside the
              local window, to the local window (SepLLM's w) and to everything else, averaged over
              heads and queries. Full attention is the baseline a compressed cache approximates:
              what "other" gets is what SepLLM's cache loses.
  sepset      native streaming perplexity with the model's derived (broad) separator set against a
              narrow, reference-style list (the Llama-3 streaming list's shape), at c=800.
  kvtype      native streaming perplexity with f16 against f32 cache storage.

    python benchmarks/quality_why.py lifetimes --model qwen0.5b --text shakespeare --tokens 65536
    python benchmarks/quality_why.py mass --model smollm2 --tokens 3072
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import quality_sepllm as Q  # noqa: E402

from sepedge import Engine  # noqa: E402
from sepedge.cache_plan import CachePolicy  # noqa: E402
from sepedge.perplexity import perplexity  # noqa: E402
from sepedge.vocab import resolve_separators  # noqa: E402

# the shape of the reference's Llama-3 streaming list (SEPLLM.md §2.3): the marks and "\n", their
# space-prefixed forms, the space and whitespace runs
NARROW = [".", ",", "?", "!", ";", ":", "\n", " ", " .", " ,", " ?", " !", " ;", " :", " \n", "  ", "    "]
C800 = "sepllm c=800 s=64 w=256"


def save(what: str, model: str, text: str, res: dict) -> None:
    out = Q.ROWS_DIR / f"why-{what}-{model}-{text}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_layer", "ages")}, indent=1), flush=True)


def stream_tokens(model: str, text: str, n: int) -> tuple[list[int], list[int], Engine]:
    e = Engine(Q.model_path(model), n_ctx=16)
    tokens = e.tokenize(Q.TEXTS[text][0]())[:n]
    return tokens, list(e._model.separators), e


def narrow_set(e: Engine) -> list[int]:
    t = e.tokenizer
    ids = set()
    for s in NARROW:
        try:
            ids.update(resolve_separators([s], t.tokens, t.token_types, t.model))
        except ValueError:
            pass  # not a token of this vocabulary
    return sorted(ids)


def lifetimes(model: str, text: str, n: int) -> None:
    tokens, seps, e = stream_tokens(model, text, n)
    e.close()
    res = {"tokens": len(tokens), "n_separators_in_set": len(seps),
           "separator_share": float(np.isin(tokens, seps).mean())}
    for row in (C800, "sepllm c=324 s=32 w=224", "sepllm c=324 s=64 w=224"):
        kw = dict(Q.ROWS[row][1])
        young_limit = kw["n_cache"] - kw["n_init"]  # StreamingLLM's window at this capacity
        policy = CachePolicy(kw.pop("kv_mode"), separators=seps, n_vocab=max(max(tokens), max(seps)) + 1, mask=False,
                             n_batch=512, **kw)
        ages, s = [], 0
        while s < len(tokens):
            plan = policy.step(tokens[s:])
            s += plan.n_tokens
            sep_out = plan.evicted_regions == 2  # SE_REGION_SEP
            ages += (plan.positions[0] - plan.evicted_positions[sep_out]).tolist()
        ages = np.asarray(ages)
        res[row] = {"evicted_from_sep_region": int(len(ages)), "median_age": float(np.median(ages)) if len(ages) else None,
                    "young_limit": young_limit, "young_share": float((ages < young_limit).mean()) if len(ages) else None,
                    "age_p10_p90": [float(np.percentile(ages, 10)), float(np.percentile(ages, 90))] if len(ages) else None}
    save("lifetimes", model, text, res)


def mass(model: str, text: str, n: int, skip: int, threads: int) -> None:
    """Attention shares per layer under full attention (torch reference, float32)."""
    import torch

    from sepedge.reference import Transformer

    torch.set_num_threads(threads)
    tokens, seps, e = stream_tokens(model, text, n)
    e.close()
    ref = Transformer.from_gguf(Q.model_path(model), dtype=torch.float32)
    T = len(tokens)
    is_sep = torch.tensor(np.isin(tokens, seps))
    n_init, w = 4, 257  # the c=800 configuration: a = 4, w = 256 (sepedge n_local 257)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = j <= i
    region = {"initial": causal & (j < n_init)}
    region["local"] = causal & (j > i - w) & ~region["initial"]
    region["separator"] = causal & is_sep[None, :] & ~region["initial"] & ~region["local"]
    region["other"] = causal & ~region["initial"] & ~region["local"] & ~region["separator"]
    # what each c=800 cache holds beyond SepLLM's window: StreamingLLM the next 540 positions
    # (w = 796), SepLLM's separator region the newest 64 separators (s = 64)
    region["streaming_extra"] = causal & (j > i - 797) & (j <= i - w) & (j >= n_init)
    count = torch.cumsum(is_sep.long(), 0)  # separators at or before each position
    edge = (i - w).clamp(min=0)
    region["newest_64_separators"] = region["separator"] & (count[edge] - count[j] < 64)
    region = {k: v[skip:].float() for k, v in region.items()}
    per_layer, layer = [], [0]

    def attention(q, k, v, mask):
        rep = ref.args.n_head // ref.args.n_head_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(ref.args.head_dim)
        p = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
        pq = p[:, skip:].mean(0)  # (queries, keys), heads averaged
        per_layer.append({name: float((pq * r).sum(-1).mean()) for name, r in region.items()})
        layer[0] += 1
        return torch.einsum("hts,shd->thd", p, v)

    ref.attention = attention
    t0 = time.perf_counter()
    ref(torch.tensor(tokens))
    cells = {name: float(r.sum(-1).mean()) for name, r in region.items()}
    avg = {name: float(np.mean([lay[name] for lay in per_layer])) for name in region}
    save("mass", model, text, {"tokens": T, "queries_from": skip, "n_init": n_init, "n_local": w,
                               "mean_over_layers": avg, "cells_per_query": cells, "per_layer": per_layer,
                               "seconds": time.perf_counter() - t0})


def ppl(model: str, tokens: list[int], row: str, threads: int, kv_type: str = "f16", separators=None) -> float:
    """Native streaming perplexity of `tokens` under a row's cache, optionally with another separator set."""
    with Engine(Q.model_path(model), n_threads=threads, kv_type=kv_type, n_batch=Q.CHUNK, **Q.ROWS[row][1]) as base:
        llm = base
        if separators is not None:  # a context takes the model's set when it is made: spawn one after
            base._model.separators = separators
            llm = base.spawn()
        return perplexity(llm, tokens, chunk=Q.CHUNK)["perplexity"]  # in chunks: all logits of 8K tokens
                                                                       # of a 152K vocabulary would be 5 GB


def sepset(model: str, text: str, n: int, threads: int) -> None:
    tokens, seps, e = stream_tokens(model, text, n)
    narrow = narrow_set(e)
    e.close()
    res = {"tokens": len(tokens), "row": C800, "broad_ids": len(seps), "narrow_ids": len(narrow),
           "broad_share": float(np.isin(tokens, seps).mean()), "narrow_share": float(np.isin(tokens, narrow).mean()),
           "narrow_texts": NARROW}
    res["broad_ppl"] = ppl(model, tokens, C800, threads)
    res["narrow_ppl"] = ppl(model, tokens, C800, threads, separators=narrow)
    save("sepset", model, text, res)


def kvtype(model: str, text: str, n: int, threads: int, rows: list[str]) -> None:
    tokens, _, e = stream_tokens(model, text, n)
    e.close()
    res = {"tokens": len(tokens)}
    for row in rows:
        res[row] = {t: ppl(model, tokens, row, threads, kv_type=t) for t in ("f16", "f32")}
    save("kvtype", model, text, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["lifetimes", "mass", "sepset", "kvtype"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="shakespeare")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip", type=int, default=1024, help="mass: queries before this position are not counted")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=f"{C800},streamingllm c=800 w=796")
    a = ap.parse_args()
    if a.what == "lifetimes":
        lifetimes(a.model, a.text, a.tokens)
    elif a.what == "mass":
        mass(a.model, a.text, a.tokens, a.skip, a.threads)
    elif a.what == "sepset":
        sepset(a.model, a.text, a.tokens, a.threads)
    else:
        kvtype(a.model, a.text, a.tokens, a.threads, a.rows.split(","))


if __name__ == "__main__":
    main()
