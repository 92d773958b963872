"""The decode products' tile table of this GPU (kernels/tile_table.py): every candidate tile of every
product a batch-1 decode step of the models launches, timed the way decode runs it, the fastest written.

    python benchmarks/triton_decode_tiles.py MODEL.gguf [MODEL.gguf ...] [--fuse attn|0|1] [--out TABLE.json]
        [--merge TABLE.json] [--extra "BN,NB,WARPS[,STAGES[,PAIR]];..."] [--deadline S] [--keys-only]
        [--compare-autotune] [--pf]

Keys: the (type, alt, N, nblk, HAS_ADD, GLU, NORM) of every launch of one decode step that would
autotune (kernels/matvec.py _packed_launch asks the table for exactly these), recorded where the launch
asks the table (each then runs the first candidate: one compile a key, nothing autotuned), with
SEPEDGE_TRITON_FUSE as --fuse sets it and SEPEDGE_TRITON_Q4K as the environment sets it (the table's
"variant"). Several models: one table.

Timing, per key and candidate (matvec.tune_configs, and --extra's of the same kind): copies of a random
packed weight of the key's shape, together at least 4x the GPU's L2, launched over successive copies
through the backend's own launchers (matvec_q8 / matvec_glu / matvec_norm, their epilogue tensors real)
with the candidate as the table's tile, 64 launches (or the next multiple of 64 past the copies) in one
CUDA graph, PDL as decode launches them; the median of 9 replays after 2 warm-ups, over the launches.
A candidate that fails to compile or run is left out with a note. The table is written after each key
(--out; --merge keeps another table's entries and skips their keys); --deadline: no key is started past it.
--pf: the Q4_K / Q6_K kernels' tiles are timed twice, the second time with PF 1 (the next step's loads
issued before a step's sums, kernels/matvec.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAUNCHES = 64
WARMUP, REPLAYS = 2, 9


def _modules():
    import importlib
    # the modules: the package's `matvec` is the function
    return importlib.import_module("sepedge.kernels.matvec"), importlib.import_module("sepedge.kernels.tile_table")


def decode_keys(model: str, fuse: str = "attn") -> dict[tuple, int]:
    """{key: launches a step} of a batch-1 decode step of the model (the Triton backend), each key the
    table lookup of a launch that would autotune."""
    import numpy as np

    from sepedge import Engine
    mv, tt = _modules()
    counts: dict[tuple, int] = {}
    lookup = tt.lookup

    def record(device, qtype, alt, N, nblk, has_add, glu, norm):
        key = (qtype, alt, N, nblk, has_add, glu, norm)
        counts[key] = counts.get(key, 0) + 1
        return dict(zip(mv.TILE_PARAMS, mv.tune_configs(qtype, glu, alt)[0]))

    saved = {k: os.environ.get(k) for k in ("SEPEDGE_TRITON_FUSE", "SEPEDGE_TRITON_GRAPHS")}
    os.environ["SEPEDGE_TRITON_FUSE"] = fuse  # read when a context is made
    os.environ["SEPEDGE_TRITON_GRAPHS"] = "0"  # one step, launched directly: no capture to count twice
    tt.lookup = record
    try:
        with Engine(model, device="triton", n_ctx=64) as llm:
            toks = np.random.default_rng(0).integers(0, llm.n_vocab, 2).tolist()
            llm.eval(toks[:1])  # a prompt of one token: the products of T = 1, not yet a decode step
            counts.clear()
            llm.eval(toks[1:])
    finally:
        tt.lookup = lookup
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return counts


def random_packed(qtype: int, N: int, K: int, device):
    """A packed weight of random codes and small float16 scales (random_gguf.py's bytes), on the device."""
    import gguf
    import numpy as np
    import torch
    from random_gguf import random_bytes

    from sepedge import kernels as Kn
    b = np.concatenate(list(random_bytes(gguf.GGMLQuantizationType(qtype), (N, K), np.random.default_rng(0))))
    return Kn.pack(torch.from_numpy(b).view(N, -1).to(device), qtype, K)


def launcher(key: tuple, device):
    """fn(weight) that launches the key's product as decode does: its 8-bit input, and the bias (GLU),
    residual or norm epilogue's tensors, made once."""
    import torch

    from sepedge import kernels as Kn
    mv, _ = _modules()
    qtype, alt, N, nblk, has_add, glu, norm = key
    K = nblk * Kn.BLOCKS[qtype][0]
    xa = Kn.act_q8(torch.randn(1, K, device=device))
    if glu:
        bias = torch.randn(N, device=device) if has_add else None
        return lambda w: Kn.matvec_glu(w, qtype, xa, bias)
    res = torch.randn(1, N, device=device)
    if norm:
        nw, tickets = torch.rand(N, device=device) + 0.5, torch.zeros(2, dtype=torch.int32, device=device)
        return lambda w: Kn.matvec_norm(w, qtype, xa, res, nw, 1e-5, tickets)
    return lambda w: mv.matvec_q8(w, qtype, xa, res if has_add else None, N if has_add else 0)


def time_config(fn, weights: list, cfg: dict) -> float:
    """µs a launch of fn over the weights in turn with the tile cfg, from a CUDA graph's replays."""
    import torch
    _, tt = _modules()
    lookup = tt.lookup
    tt.lookup = lambda *key: cfg  # the table's path of _packed_launch, with this tile
    try:
        n = LAUNCHES * math.ceil(len(weights) / LAUNCHES)
        fn(weights[0])  # compiles (an error here: the candidate is left out)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n):
                fn(weights[i % len(weights)])
        for _ in range(WARMUP):
            g.replay()
        ts = []
        for _ in range(REPLAYS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / n)
        del g
        return statistics.median(ts)
    finally:
        tt.lookup = lookup


def candidates(key: tuple, extra: list[tuple]) -> list[tuple]:
    """The key's candidate tiles (as _autotuned tries them) and the --extra tiles of the same kind."""
    mv, _ = _modules()
    qtype, alt, N, nblk, has_add, glu, norm = key
    base = list(mv.tune_configs(qtype, glu, alt))
    more = [t for t in extra if len(t) == len(base[0]) and t not in base and (not glu or t[0] % 64 == 0)]
    return base + more


def entry(key: tuple, cfg: dict, us: float, runner_up: float | None) -> dict:
    _, tt = _modules()
    qtype, alt, N, nblk, has_add, glu, norm = key
    return {"kernel": {q: n for n, q in tt.KERNELS.items()}[qtype], "variant": alt, "N": N, "nblk": nblk,
            "HAS_ADD": has_add, "GLU": glu, "NORM": norm, "config": cfg, "us": round(us, 3),
            "runner_up_us": None if runner_up is None else round(runner_up, 3)}


def entry_key(e: dict) -> tuple:
    _, tt = _modules()
    return (tt.KERNELS[e["kernel"]], e["variant"], e["N"], e["nblk"], e["HAS_ADD"], e["GLU"], e["NORM"])


def table_doc(entries: list[dict], extra: list[dict], command: str, gpu: str, versions: tuple[str, str],
              merge: dict | None = None) -> dict:
    """The table file's object: merge's entries with those of entries replacing any of the same key,
    merge's extra configs and these."""
    old = merge["entries"] if merge else []
    new_keys = {entry_key(e) for e in entries}
    kept = [e for e in old if entry_key(e) not in new_keys]
    extras = list(merge.get("extra", [])) if merge else []
    extras += [c for c in extra if c not in extras]
    doc = {"gpu": gpu, "triton": versions[0], "torch": versions[1],
           "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command if not merge else f"{merge['command']}; {command}",
           "entries": kept + entries}
    if extras:
        doc["extra"] = extras
    return doc


def write_table(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # a reader (or a timeout) never sees half a table


def parse_extra(s: str) -> list[tuple]:
    return [tuple(int(v) for v in part.split(",")) for part in s.split(";") if part.strip()]


def fmt_cfg(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def sweep_key(key: tuple, extra: list[tuple], l2: int, device, stop: float, pf: bool = False
              ) -> tuple[list, list[str]] | None:
    """[(cfg, µs)] fastest first and notes for one key, or None where the deadline came first."""
    import torch
    mv, tt = _modules()
    qtype, alt, N, nblk, *_ = key
    from sepedge import kernels as Kn
    w0 = random_packed(qtype, N, nblk * Kn.BLOCKS[qtype][0], device)
    n = max(1, math.ceil(4 * l2 / w0.nbytes))
    weights = [w0] + [Kn.Packed(w0.qtype, w0.K, *(None if a is None else a.clone() for a in w0[2:]))
                      for _ in range(n - 1)]
    fn = launcher(key, device)
    got, notes = [], []
    cfgs = [dict(zip(mv.TILE_PARAMS, t)) for t in candidates(key, extra)]
    if pf and mv.takes_prefetch(qtype, alt):  # each tile again with the next step's loads ahead of the sums
        cfgs += [c | {"PF": 1} for c in cfgs]
    for cfg in cfgs:
        if time.monotonic() > stop:
            return None
        try:
            got.append((cfg, time_config(fn, weights, cfg)))
        except Exception as e:  # out of resources, a compile error: this tile cannot run here
            first = (str(e).splitlines() or [""])[0][:120]
            notes.append(f"{fmt_cfg(cfg)}: left out ({type(e).__name__}: {first})")
            torch.cuda.synchronize()
    got.sort(key=lambda r: r[1])
    print(f"\n{tt.key_name(key)}: {w0.nbytes / 1e6:.1f} MB, {n} copies, "
          f"{LAUNCHES * math.ceil(n / LAUNCHES)} launches a replay")
    print(f"  {'config':48s} {'µs':>8s} {'GB/s':>7s}")
    for cfg, us in got:
        print(f"  {fmt_cfg(cfg):48s} {us:8.2f} {w0.nbytes / us / 1e3:7.0f}")
    for note in notes:
        print("  " + note)
    if len(got) > 1:
        print(f"  winner {fmt_cfg(got[0][0])}: {got[1][1] / got[0][1] - 1:.1%} faster than the runner-up")
    del weights, w0
    torch.cuda.empty_cache()
    return got, notes


def autotune_choice(key: tuple, device) -> str:
    """The config triton.autotune picks for the key in this process (--compare-autotune)."""
    mv, tt = _modules()
    qtype, alt, N, nblk, has_add, glu, norm = key
    from sepedge import kernels as Kn
    fn = launcher(key, device)
    lookup = tt.lookup
    tt.lookup = lambda *k: None  # a miss: the autotuner
    try:
        fn(random_packed(qtype, N, nblk * Kn.BLOCKS[qtype][0], device))
    finally:
        tt.lookup = lookup
    return str(getattr(mv._autotuned(qtype, glu, alt), "best_config", "?"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--fuse", default="attn", choices=["0", "attn", "1"], help="SEPEDGE_TRITON_FUSE of the keys")
    ap.add_argument("--out", type=Path, default=None, help="default kernels/tiles/<gpu slug>.json")
    ap.add_argument("--merge", type=Path, default=None, help="a table whose entries are kept (their keys not timed)")
    ap.add_argument("--extra", type=parse_extra, default=[], help='tiles beyond the candidates: "8,4,4;16,2,4,1,1"')
    ap.add_argument("--deadline", type=float, default=None, help="seconds: no key started after this")
    ap.add_argument("--pf", action="store_true", help="each Q4_K / Q6_K tile also with PF 1 (matvec.takes_prefetch)")
    ap.add_argument("--keys-only", action="store_true")
    ap.add_argument("--compare-autotune", action="store_true", help="also print what autotune picks for each key")
    args = ap.parse_args()
    stop = time.monotonic() + (args.deadline if args.deadline is not None else math.inf)
    if os.environ.get("SEPEDGE_TRITON_TUNE") == "0":
        ap.error("SEPEDGE_TRITON_TUNE=0 launches fixed tiles: no launch asks the table")
    import torch
    import triton
    mv, tt = _modules()
    keys: dict[tuple, int] = {}
    for m in args.models:
        found = decode_keys(m, args.fuse)
        print(f"{Path(m).name} (SEPEDGE_TRITON_FUSE={args.fuse}): {len(found)} keys")
        for k, c in found.items():
            print(f"  {tt.key_name(k)}: {c} launches a step")
            keys[k] = keys.get(k, 0) + c
    if args.keys_only:
        return 0
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    out = args.out or tt.TILES_DIR / f"{tt.gpu_slug(gpu)}.json"
    merge = json.loads(args.merge.read_text()) if args.merge and args.merge.exists() else None
    if merge:
        tt.load(args.merge)  # a malformed table is not merged into a new one
    done = {entry_key(e) for e in merge["entries"]} if merge else set()
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                   if k.startswith("SEPEDGE_TRITON_") and k != tt.TILES_ENV)
    command = (env + " " if env else "") + shlex.join(["python3", "benchmarks/triton_decode_tiles.py", *sys.argv[1:]])
    extra_cfgs = [dict(zip(mv.TILE_PARAMS, t)) for t in args.extra]
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"\n{gpu}: L2 {l2 / 2 ** 20:.0f} MiB, weights >= {4 * l2 / 2 ** 20:.0f} MiB a key; table {out}")
    entries, left = [], []
    for key in keys:
        if key in done:
            print(f"\n{tt.key_name(key)}: in {args.merge}, kept")
            continue
        if time.monotonic() > stop:
            left.append(key)
            continue
        r = sweep_key(key, args.extra, l2, device, stop, args.pf)
        if r is None:
            left.append(key)
            continue
        got, _ = r
        if not got:
            print(f"  no candidate ran: {tt.key_name(key)} left to autotune")
            continue
        entries.append(entry(key, got[0][0], got[0][1], got[1][1] if len(got) > 1 else None))
        if args.compare_autotune:
            print(f"  autotune in this process: {autotune_choice(key, device)}")
        write_table(out, table_doc(entries, extra_cfgs, command, gpu, (triton.__version__, torch.__version__), merge))
    if not entries and not merge:
        print("nothing measured: no table written")
        return 1
    write_table(out, table_doc(entries, extra_cfgs, command, gpu, (triton.__version__, torch.__version__), merge))
    tt.load(out)  # what was written reads back
    print(f"\n{out}: {len(entries)} keys measured, {len(done & set(keys))} kept from {args.merge}")
    for key in left:
        print(f"left out (deadline): {tt.key_name(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
