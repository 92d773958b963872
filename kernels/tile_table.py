"""The decode products' tiles measured once per GPU, the way decode runs them, in place of the tile
triton.autotune picks anew in every process.

The autotuner times each candidate from a few isolated launches of one weight (L2 flushed, gaps between
launches, no PDL, no CUDA graph), and where candidates run close processes settle on different ones:
8B Q4_K_M tg128 measured 258.7-279.5 t/s between processes on the H200, each process's own repetitions
within 2%. Decode runs ~64 different weights back to back in a CUDA graph with PDL, each cold from HBM.
benchmarks/triton_decode_tiles.py times every candidate that way and writes kernels/tiles/<gpu slug>.json;
matvec._packed_launch takes a launch's tile from that table where it has the launch's key and autotunes
as before where it has not.

    {"gpu": "NVIDIA H200", "triton": "3.4.0", "torch": "2.8.0", "made": ISO time, "command": the sweep's,
     "extra": [configs measured beyond the autotuners' candidates (optional)],
     "entries": [{"kernel": "q4_k", "variant": false, "N": 6144, "nblk": 16, "HAS_ADD": false, "GLU": false,
                  "NORM": false, "config": {"BLOCK_N": 8, "NB": 4, "num_warps": 4}, "us": 4.1,
                  "runner_up_us": 4.3}, ...]}

kernel: the packed type; variant: SEPEDGE_TRITON_Q4K's alt flag (matvec.tune_alt); N, nblk, HAS_ADD, GLU,
NORM: the autotuners' key; config: the launch's meta-parameters (matvec.TILE_PARAMS; STAGES and PAIR
where the kernel of the key takes them), one of that key's candidates (matvec.tune_configs) or of "extra",
and PF 0 / 1 where the kernel takes it (matvec.takes_prefetch: the next step's loads before a step's sums).

SEPEDGE_TRITON_TILES: unset or empty: this GPU's table, where the file exists; "0": none (autotune);
a path: that file. Read once per process (a decode CUDA graph keeps the tiles it was captured with).
Only launches that would autotune ask the table: SEPEDGE_TRITON_TUNE=0 (fixed tiles) and explicit tiles
pass it by, as they pass the autotuner by.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sepedge.errors import SepedgeError

from .quants import Q4_0, Q4_K, Q6_K, Q8_0

TILES_ENV = "SEPEDGE_TRITON_TILES"
TILES_DIR = Path(__file__).resolve().parent / "tiles"
KERNELS = {"q4_0": Q4_0, "q8_0": Q8_0, "q4_k": Q4_K, "q6_k": Q6_K}
HEADER = {"gpu": str, "triton": str, "torch": str, "made": str, "command": str, "entries": list}
FLAGS = ("HAS_ADD", "GLU", "NORM")


class TileTableError(SepedgeError, ValueError):
    """A tile table that cannot be used: missing, not JSON, or an entry out of shape; the message names the
    file and the fault."""


def gpu_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200": the table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(device_name: str) -> Path | None:
    """The table SEPEDGE_TRITON_TILES names for a GPU of this name, or None (autotune)."""
    v = os.environ.get(TILES_ENV, "")
    if v == "0":
        return None
    if v:
        if not Path(v).is_file():
            raise TileTableError(f"{v}: no such file ({TILES_ENV})")
        return Path(v)
    path = TILES_DIR / f"{gpu_slug(device_name)}.json"
    return path if path.is_file() else None


def key_name(key: tuple) -> str:
    qtype, alt, N, nblk, has_add, glu, norm = key
    name = {q: n for n, q in KERNELS.items()}[qtype]
    return f"{name}{' alt' if alt else ''} N={N} nblk={nblk} HAS_ADD={has_add:d} GLU={glu:d} NORM={norm:d}"


def _get(obj: dict, field: str, types, fault) -> object:
    if field not in obj:
        raise fault(f"no field {field!r}")
    v = obj[field]
    # bool is an int in Python: a number field must not take true/false, nor a flag 0/1
    if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
        raise fault(f"{field!r} is {json.dumps(v)}, not {' or '.join(t.__name__ for t in types)}")
    return v


def _config(c, fault) -> dict:
    """A config object's meta-parameters, checked for their names and values."""
    if not isinstance(c, dict):
        raise fault(f"config {json.dumps(c)} is not an object")
    from .matvec import TILE_PARAMS
    unknown = set(c) - set(TILE_PARAMS) - {"PF"}
    if unknown:
        raise fault(f"config has unknown fields {sorted(unknown)}")
    for f in TILE_PARAMS[:3]:
        v = _get(c, f, (int,), fault)
        if v <= 0 or v & (v - 1):  # a tl.arange extent or a warp count
            raise fault(f"config {f} {v} is not a power of two")
    for f, ok in (("STAGES", lambda v: v >= 1), ("PAIR", lambda v: v in (0, 1)), ("PF", lambda v: v in (0, 1))):
        if f in c and not ok(_get(c, f, (int,), fault)):
            raise fault(f"config {f} {c[f]} is out of range")
    return dict(c)


def load(path: str | os.PathLike) -> dict[tuple, dict]:
    """{(packed type, alt, N, nblk, HAS_ADD, GLU, NORM): meta-parameters of the launch} of a table file;
    TileTableError where the file or an entry is malformed."""
    from .matvec import TILE_PARAMS, takes_prefetch, tune_configs
    path = Path(path)

    def fault_at(where: str):
        return lambda msg: TileTableError(f"{path}: {where}{msg}")

    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise TileTableError(f"{path}: cannot be read: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise TileTableError(f"{path}: not JSON: {e}") from None
    fault = fault_at("")
    if not isinstance(doc, dict):
        raise fault("not a JSON object")
    for field, t in HEADER.items():
        _get(doc, field, (t,), fault)
    extra = [_config(c, fault_at(f"extra {i}: ")) for i, c in enumerate(doc.get("extra", []))]
    tiles: dict[tuple, dict] = {}
    for i, e in enumerate(doc["entries"]):
        fault = fault_at(f"entry {i}: ")
        if not isinstance(e, dict):
            raise fault("not an object")
        kernel = _get(e, "kernel", (str,), fault)
        if kernel not in KERNELS:
            raise fault(f"kernel {kernel!r} is not one of {list(KERNELS)}")
        qtype, alt = KERNELS[kernel], _get(e, "variant", (bool,), fault)
        N, nblk = _get(e, "N", (int,), fault), _get(e, "nblk", (int,), fault)
        if N <= 0 or nblk <= 0:
            raise fault(f"N {N}, nblk {nblk}: not a shape")
        has_add, glu, norm = (_get(e, f, (bool,), fault) for f in FLAGS)
        _get(e, "us", (int, float), fault)
        if e.get("runner_up_us") is not None:
            _get(e, "runner_up_us", (int, float), fault)
        if alt and not (qtype == Q4_K or qtype == Q6_K and not glu):
            raise fault(f"{kernel} has no variant kernel or tiles{' for GLU' if glu else ''}")
        if glu and norm:
            raise fault("GLU and NORM together: no launch has both")
        cfg = _config(e.get("config"), fault)
        if "PF" in cfg and not takes_prefetch(qtype, alt):
            raise fault(f"{kernel}{' (variant)' if alt else ''} takes no PF")
        candidates = tune_configs(qtype, glu, alt)
        n = len(candidates[0])
        fields = set(TILE_PARAMS[:n])  # the kernel's meta-parameters, exactly (PF aside)
        allowed = set(candidates) | {tuple(c[p] for p in TILE_PARAMS[:n]) for c in extra if set(c) - {"PF"} == fields}
        if set(cfg) - {"PF"} != fields or tuple(cfg[p] for p in TILE_PARAMS[:n]) not in allowed:
            raise fault(f"config {json.dumps(cfg)} is not among the launch's candidates (matvec.tune_configs, "
                        "the table's extra)")
        if glu and cfg["BLOCK_N"] % 64:  # a GLU program owns whole 8-bit blocks of 32 gate rows and their up rows
            raise fault(f"config BLOCK_N {cfg['BLOCK_N']} of a GLU launch is not a multiple of 64")
        key = (qtype, alt, N, nblk, has_add, glu, norm)
        if key in tiles:
            raise fault(f"a second entry for {key_name(key)}")
        tiles[key] = cfg
    return tiles


_active: tuple | None = None  # (path or None, tiles), once read
_served: dict[tuple, dict] = {}  # the keys the table has answered in this process


def active(device) -> tuple[Path | None, dict]:
    """The table of this process (read at the first call) and its tiles."""
    global _active
    if _active is None:
        import torch
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        path = table_path(name)
        _active = (path, load(path) if path else {})
    return _active


def lookup(device, qtype: int, alt: bool, N: int, nblk: int, has_add: bool, glu: bool, norm: bool) -> dict | None:
    """The measured meta-parameters of a decode product's launch, or None where the table has none."""
    key = (qtype, alt, N, nblk, has_add, glu, norm)
    tile = active(device)[1].get(key)
    if tile is not None:
        _served[key] = tile
    return tile


def served() -> tuple[Path | None, dict[tuple, dict]]:
    """The table read in this process (None: none) and the keys it served so far."""
    return (_active[0] if _active else None), dict(_served)
