"""Passkey retrieval: what each KV cache mode remembers (issue J, item 4).

A five-digit number is hidden at a given depth of a long, repetitive filler text (the passkey test
of Mohtashami & Jaggi, "Landmark Attention", also used by StreamingLLM's authors), and the model is
asked for it at the end; greedy decoding, a trial counts when the digits it writes first are the
passkey. Bounded caches cannot hold a number that is neither initial, a separator nor recent, so
this shows what "bounded memory" costs in a way perplexity does not.

Results per model in benchmarks/results/quality/passkey-<model>.json (written after every trial);
`python benchmarks/quality_sepllm.py --report` puts them in the table.

    python benchmarks/passkey.py --model smollm2 [--length 1536] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import quality_sepllm as Q  # noqa: E402

from sepedge import Engine  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.1, 0.25, 0.5, 0.75, 0.9)
MODES = {"full": dict(kv_mode="full", n_ctx=4096),
         **{row: Q.ROWS[row][1] for row in ("streamingllm c=800 w=796", "sepllm c=800 s=64 w=256",
                                             "sepllm-slide c=800 s=64 w=732", "sepllm-runs c=800 s=64 w=732")}}


def prompt(e: Engine, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of about `length` tokens with the needle at `depth` of the filler; and the number of
    tokens between the needle and the end."""
    intro, needle, question = (e.tokenize(s, add_bos=False) for s in (INTRO, NEEDLE.format(key=key), QUESTION))
    unit = e.tokenize(FILLER, add_bos=False)
    n_fill = length - len(intro) - len(needle) - len(question) - 1
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    cut = int(round(depth * n_fill / len(unit))) * len(unit)  # at a sentence boundary of the filler
    bos = e.tokenize("", add_bos=True)
    ids = bos + intro + filler[:cut] + needle + filler[cut:] + question
    return ids, len(filler) - cut + len(question)


def answer(llm: Engine, ids: list[int], n: int = 8, pin: int = 0) -> str:
    """Greedy continuation of `ids`; pin > 0 makes the first `pin` tokens initial ones (never
    evicted, as a chat's system prompt with keep_system), in the sparse modes."""
    llm.reset()
    if pin and llm.kv_mode != "full":
        llm._ctx.keep(pin)
    logits = llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = llm.eval([tok])
    return llm.detokenize(out).decode("utf-8", "replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=1536)
    ap.add_argument("--trials", type=int, default=2, help="passkeys per depth")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="all")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | triton")
    ap.add_argument("--pin-intro", action="store_true",
                    help="keep the instruction (BOS + intro) as initial tokens: the modes get ' +pinned' names")
    a = ap.parse_args()
    out = Q.ROWS_DIR / f"passkey-{a.model}.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.update(model=a.model, length=a.length, depths=list(DEPTHS), trials=a.trials)
    res.setdefault("modes", {})
    rng = random.Random(12345)  # the same passkeys for every mode
    keys = [[rng.randrange(10000, 100000) for _ in range(a.trials)] for _ in DEPTHS]
    modes = [m for m in MODES if a.modes == "all" or any(s in m for s in a.modes.split(","))]
    for mode in modes:
        kw, pin = dict(MODES[mode]), 0
        if a.pin_intro and mode != "full":
            with Engine(Q.model_path(a.model), n_ctx=16) as e:
                pin = len(e.tokenize("", add_bos=True)) + len(e.tokenize(INTRO, add_bos=False))
            if kw["kv_mode"] != "sepllm-stream":  # the pinned tokens come out of the window: same capacity
                kw["n_local"] -= pin - kw["n_init"]
        # slide_in_pass: the sliding modes take up to 64 prompt tokens per pass (the same cells and
        # distances per token as one at a time; README), not one (CPU; CUDA one at a time; Triton refuses it)
        with Engine(Q.model_path(a.model), n_threads=a.threads, n_batch=Q.CHUNK, device=a.device,
                    slide_in_pass=a.device != "triton", **kw) as llm:
            name = mode + (" +pinned instruction" if pin else "")
            r = res["modes"][name] = {"by_depth": {}, "engine": kw, "pinned": pin}
            t0 = time.perf_counter()
            for depth, dkeys in zip(DEPTHS, keys):
                hits, dist, said = 0, 0, []
                for key in dkeys:
                    ids, dist = prompt(llm, a.length, depth, key)
                    text = answer(llm, ids, pin=pin)
                    digits = re.search(r"\d+", text)
                    hits += bool(digits and digits.group() == str(key))
                    said.append(text)
                r["by_depth"][str(depth)] = {"accuracy": hits / len(dkeys), "tokens_after_needle": dist,
                                             "answers": said, "keys": dkeys}
                r["seconds"] = time.perf_counter() - t0
                if out.is_file():  # rows written meanwhile by another run of this script
                    res["modes"] = {**json.loads(out.read_text())["modes"], name: r}
                out.write_text(json.dumps(res, indent=1))
                print(f"{a.model} {name} depth {depth} ({dist} tokens after): {hits}/{len(dkeys)} {said}", flush=True)


if __name__ == "__main__":
    main()
