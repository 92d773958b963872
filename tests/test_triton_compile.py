"""Every Triton kernel compiles for Hopper (sm_90) with the branches a GPU takes, on a machine without
one: the interpreter runs of test_triton_kernels.py record each launch (kernel, argument types,
constexpr switches), then Triton compiles each variant to a cubin with GPU=True and the early-launch
wait (PDL=1). The interpreter alone accepted code that did not compile (a plain global read by a
kernel: 14 GPU test failures found only on the GPU machine), and never runs the inline PTX."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_every_kernel_compiles_for_sm90(tmp_path):
    record = tmp_path / "launches.jsonl"
    # the interpreter's run, on the CPU even where a GPU is (its GPU-sized cases would crawl there)
    env = dict(os.environ, TRITON_INTERPRET="1", SEPEDGE_TRITON_RECORD=str(record), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not gpu", "-p", "no:cacheprovider",
                          "-p", "triton_compile", str(TESTS / "test_triton_kernels.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(TESTS / "triton_compile.py"), str(record), "--arch", "90"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    compiled = set(out.stdout.rsplit("kernels: ", 1)[1].split())
    # every kernel the package defines was launched by the kernel tests, so it was compiled here
    defined = set()
    for f in (ROOT / "kernels").glob("*.py"):
        text = f.read_text()
        for line in text.splitlines():
            if line.startswith("def ") and line.split("(")[0].endswith("_kernel"):
                defined.add(f"{f.stem}.{line[4:].split('(')[0]}")
    short = {c.split(".", 2)[-1] for c in compiled}  # sepedge.kernels.<module>.<name> -> <module>.<name>
    assert defined and defined <= short, f"never launched by the kernel tests: {sorted(defined - short)}"
