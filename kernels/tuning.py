"""The tiles Triton's autotuner chose in this process, per kernel and shape key. Each process tunes anew
from a few timed launches per candidate, so two processes can settle on different tiles when candidates
run close; a benchmark records the choice beside its rates to tell a slow process's tiles from a fast
one's (benchmarks/results/triton_bench.md: Triton rows 8-9% apart between processes, each process's own
repetitions within 2%). Launches that take their tile from a measured table (tile_table.py) never reach
the autotuner: they are listed under the table's file, so a row says which tiles it ran."""

from __future__ import annotations

import importlib

from . import tile_table

# the modules, not the package's functions of the same names (kernels/__init__.py exports those)
_MODULES = ("matmul", "matvec")


def tuned_configs() -> dict[str, dict[str, str]]:
    """{"module:kernel:variant": {shape key: the chosen config}} of every autotuned launcher used so far in
    this process (empty under the interpreter, which runs fixed tiles), and {"tiles:<table file>": {key:
    config}} of the keys the measured table served."""
    out: dict[str, dict[str, str]] = {}
    for short in _MODULES:
        mod = importlib.import_module(f"{__package__}.{short}")
        for variant, tuner in mod._tuned.items():
            name = getattr(getattr(tuner, "fn", None), "__name__", "kernel")
            label = f"{short}:{name}:{variant}"
            out[label] = {repr(key): str(cfg) for key, cfg in tuner.cache.items()}
    path, served = tile_table.served()
    if served:
        out[f"tiles:{path}"] = {tile_table.key_name(key): ", ".join(f"{k}: {v}" for k, v in cfg.items())
                                for key, cfg in served.items()}
    return out
