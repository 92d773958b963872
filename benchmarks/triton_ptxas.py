"""Registers and spills of the float16 prefill kernels for sm_90, on a machine without a GPU: each
autotune config of matmul_f16_kernel (the in-register decoders per repacked type, F16_TUNE_CONFIGS; the
plain float16 weight of the dequantize-once route, DQ_TUNE_CONFIGS) and dequant_f16_kernel at its
launch tile, compiled by Triton with the pointers and strides marked 16-divisible (as Triton's JIT
specializes them at a launch: without it the loads are not vectorized and every config spills), then
`ptxas -v` on the PTX. Prints a markdown table.

    python benchmarks/triton_ptxas.py [--arch 90] [--types dq,q4_0,q8_0,q4_k,q6_k]
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile

# pointer types of the arguments as the launchers pass them (kernels/matmul.py: _f16_operand)
WEIGHT_PTRS = {  # QS, QH, SC, D
    "dq": ("*fp16", "*fp16", "*fp16", "*fp16"),
    "q4_0": ("*u8", "*u8", "*fp16", "*fp16"),
    "q8_0": ("*u8", "*u8", "*fp16", "*fp16"),
    "q4_k": ("*u8", "*u8", "*u8", "*i32"),
    "q6_k": ("*u8", "*u8", "*i8", "*fp16"),
}
QTYPES = {"dq": 1, "q4_0": 2, "q8_0": 8, "q4_k": 12, "q6_k": 14}


def ptxas_report(ptx: str, ptxas: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas -v."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1000:])
    regs = int(re.search(r"Used (\d+) registers", out.stderr).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out.stderr).group(1))
    return regs, spill


def compile_kernel(fn, sig: dict, consts: dict, divisible: set, arch: int, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    s = dict(sig) | {k: "constexpr" for k in consts}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return triton.compile(ASTSource(fn, s, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--types", default="dq,q4_0,q8_0,q4_k,q6_k")
    args = ap.parse_args()
    from triton.backends.nvidia.compiler import get_ptxas
    mm = importlib.import_module("sepedge.kernels.matmul")
    ptxas = get_ptxas(args.arch).path
    rows = ["| kernel | type | tile (N, M, K) | warps | stages | registers | spill bytes |",
            "|---|---|---|---|---|---:|---:|"]
    for t in args.types.split(","):
        qs, qh, sc, d = WEIGHT_PTRS[t]
        sig = {"Y": "*fp32", "QS": qs, "QH": qh, "SC": sc, "D": d, "XH": "*fp16", "XS": "*fp32", "ADD": "*fp32"}
        ints = ["M", "N", "K", "stride_qs", "stride_qh", "stride_sc", "stride_d", "stride_xh", "stride_ym", "stride_b",
                "M_KEY"]
        sig |= {n: "i32" for n in ints}
        divisible = set(sig) - {"M", "M_KEY"}
        for bn, bm, bk, w, st in (mm.DQ_TUNE_CONFIGS if t == "dq" else mm.F16_TUNE_CONFIGS):
            consts = {"QTYPE": QTYPES[t], "HAS_ADD": True, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk}
            k = compile_kernel(mm.matmul_f16_kernel, sig, consts, divisible, args.arch,
                               {"num_warps": w, "num_stages": st})
            regs, spill = ptxas_report(k.asm["ptx"], ptxas, args.arch)
            rows.append(f"| matmul_f16 | {t} | {bn}, {bm}, {bk} | {w} | {st} | {regs} | {spill} |")
            print(rows[-1], flush=True)
        if t != "dq":
            dsig = {"OUT": "*fp16", "QS": qs, "QH": qh, "SC": sc, "D": d}
            dsig |= {n: "i32" for n in ("N", "K", "stride_qs", "stride_qh", "stride_sc", "stride_d", "stride_o")}
            consts = {"QTYPE": QTYPES[t], "BLOCK_N": 32, "BLOCK_K": 256}  # dequantize_f16's GPU tile
            k = compile_kernel(mm.dequant_f16_kernel, dsig, consts, set(dsig), args.arch, {"num_warps": 4})
            regs, spill = ptxas_report(k.asm["ptx"], ptxas, args.arch)
            rows.append(f"| dequant_f16 | {t} | 32, -, 256 | 4 | - | {regs} | {spill} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
