"""Streaming perplexity: every token predicted from the cache as the engine's kv_mode keeps it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of targets (n,) under logits (n, n_vocab), in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(llm, tokens: Sequence[int], chunk: int = 512, progress: Callable[[int], None] | None = None,
               checkpoints: Sequence[int] = ()) -> dict:
    """Feed `tokens` from an empty cache, `chunk` at a time, scoring each token against the logits
    of the one before it. Returns perplexity, the tokens scored, the average number of KV cells a
    token attended to, throughput, and the perplexity of the first k scored tokens for each k in
    `checkpoints`."""
    tokens = list(tokens)
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    llm.reset()
    total, last, scored, at = 0.0, None, 0, {}
    marks = sorted(k for k in checkpoints if 0 < k < len(tokens))
    t0 = time.perf_counter()
    for start in range(0, len(tokens), chunk):
        piece = tokens[start:start + chunk]
        logits = llm.eval(piece, all_logits=True)
        rows = logits[:-1] if last is None else np.concatenate([last[None], logits[:-1]])
        targets = np.asarray(piece[1:] if last is None else piece)
        losses = nll(rows, targets)
        for k in marks:
            if scored < k <= scored + len(losses):
                at[k] = math.exp((total + float(losses[:k - scored].sum())) / k)
        total += float(losses.sum())
        scored += len(losses)
        last = logits[-1]
        if progress:
            progress(len(piece))
    seconds = time.perf_counter() - t0
    stats = llm.kv_stats()
    n = len(tokens) - 1
    return {"perplexity": math.exp(total / n), "nll": total / n, "tokens": n, "kv_mode": stats["mode"],
            "capacity": stats["capacity"], "avg_attended": stats["avg_attended"], "kv_bytes": stats["kv_bytes"],
            "seconds": seconds, "tokens_per_second": len(tokens) / seconds, "perplexity_at": at}
