"""Compile the Triton kernels for a GPU the machine does not have: the check of the code that the
interpreter never runs (CI has no GPU, and `TRITON_INTERPRET=1` executes kernels as Python: it accepts
a plain global where compiled code needs a constexpr, and never takes the `GPU` branches with their
inline PTX). Two steps, two processes, because the interpreter is chosen when the kernels are decorated:

    TRITON_INTERPRET=1 SEPEDGE_TRITON_RECORD=launches.jsonl python -m pytest -p triton_compile tests/test_triton_kernels.py
        (as a pytest plugin, tests/ on sys.path: every launch's kernel, argument types and constexpr
        values, one JSON line per new one)
    python tests/triton_compile.py launches.jsonl [--arch 90]
        (each recorded kernel compiled to a cubin by Triton's own ptxas, with GPU=True and, where the
        kernel has it, PDL=1 and launch_pdl: the variants a Hopper GPU runs; prints one line a kernel)

Used by tests/test_triton_compile.py.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys

RECORD_ENV = "SEPEDGE_TRITON_RECORD"
TILE_CONSTS = {"NB", "BM", "BN", "BK", "GROUP_M"}  # besides BLOCK_*
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
           "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}


def _arg_type(v) -> str | None:
    import torch
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[str(v.dtype).removeprefix("torch.")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _constexpr_params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if "constexpr" in str(p.annotation)]


# ---------------------------------------------------------------------------------------------
# step 1: a pytest plugin that records the launches of an interpreter run

def pytest_configure(config):
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    from triton.runtime.interpreter import InterpretedFunction
    run, seen = InterpretedFunction.run, set()

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = list(inspect.signature(fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        consts = set(_constexpr_params(fn))
        spec = {"module": fn.__module__, "name": fn.__name__, "sig": {}, "consts": {},
                "num_warps": kwargs.get("num_warps", 4)}
        for p in params:
            if p.name in consts:
                v = kwargs.get(p.name, bound.get(p.name, p.default))
                spec["consts"][p.name] = v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
            else:
                spec["sig"][p.name] = _arg_type(kwargs.get(p.name, bound.get(p.name)))
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            with open(path, "a") as f:
                f.write(key + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


# ---------------------------------------------------------------------------------------------
# step 2: compile what was recorded

def compile_all(path: str, arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    specs, done, failed = [], set(), 0
    for line in open(path):
        s = json.loads(line)
        consts = dict(s["consts"])
        if "GPU" in consts:
            consts["GPU"] = True  # the branches the interpreter never takes
        if "PDL" in consts:
            consts["PDL"] = 1 if arch >= 90 else 0
        # one variant per combination of the kernel's switches: tile sizes and warps change the code's
        # shapes, not which code there is (and each compile takes seconds)
        flags = {k: v for k, v in consts.items() if not (k.startswith("BLOCK") or k in TILE_CONSTS)}
        key = json.dumps([s["module"], s["name"], s["sig"], flags], sort_keys=True)
        if key not in done:
            done.add(key)
            specs.append((s, consts))
    names = set()
    for s, consts in specs:
        fn = getattr(importlib.import_module(s["module"]), s["name"])
        sig = {n: ("constexpr" if n in consts else t) for n, t in s["sig"].items()} | {n: "constexpr" for n in consts}
        options = {"num_warps": s["num_warps"]}
        if consts.get("PDL"):
            options["launch_pdl"] = True
        try:
            triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=options)
            names.add(f"{s['module']}.{s['name']}")
        except Exception as e:  # noqa: BLE001 - every failure is reported with its kernel
            failed += 1
            print(f"FAILED {s['module']}.{s['name']} {consts}: {type(e).__name__}: {str(e)[-1500:]}")
    print(f"compiled {len(specs) - failed} of {len(specs)} variants, kernels: {' '.join(sorted(names))}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("record")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    return compile_all(args.record, args.arch)


if __name__ == "__main__":
    sys.exit(main())
