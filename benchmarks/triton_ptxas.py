"""Registers and spills of the float16 prefill kernels for sm_90, on a machine without a GPU: each
autotune config of matmul_f16_kernel (the in-register decoders per repacked type, F16_TUNE_CONFIGS; the
plain float16 weight of the dequantize-once route, DQ_TUNE_CONFIGS) and dequant_f16_kernel at its
launch tile, compiled by Triton with the pointers and strides marked 16-divisible (as Triton's JIT
specializes them at a launch: without it the loads are not vectorized and every config spills), then
`ptxas -v` on the PTX. Prints a markdown table.

    python benchmarks/triton_ptxas.py [--arch 90] [--types dq,q4_0,q8_0,q4_k,q6_k]
    python benchmarks/triton_ptxas.py --decode [--arch 90]

--decode: the Q4_K / Q6_K decode products instead (kernels/matvec.py: each autotune config of
matvec_q4_k_kernel, matvec_q4_k_v2_kernel (SEPEDGE_TRITON_Q4K=1) and matvec_q6_k_kernel), with what the
PTX of the loop over blocks holds per step: global loads (16-byte vectors / others), cp.async (pipelined
loads), shared-memory loads and stores and barriers (layout conversions), dp4a.
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


LOOP_COUNTS = {"ld.global v4": r"ld\.global[.\w]*\.v4\.", "ld.global": r"ld\.global",
               "cp.async": r"cp\.async\.(?:ca|cg)", "ld.shared": r"ld\.shared|ldmatrix", "st.shared": r"st\.shared",
               "bar.sync": r"bar\.sync", "dp4a": r"dp4a"}


def loop_counts(ptx: str) -> dict:
    """Instructions of the innermost loop's body in the PTX (from its header label to its back edge)."""
    m = re.search(r"^(\$L__BB\d+_\d+):\s*// =>This Inner Loop Header", ptx, re.M)
    body = ptx[m.start():ptx.find("bra \t" + m.group(1) + ";", m.start())] if m else ""
    return {k: len(re.findall(v, body)) for k, v in LOOP_COUNTS.items()}


def decode_report(arch: int, ptxas: str) -> list[str]:
    mv = importlib.import_module("sepedge.kernels.matvec")
    rows = ["| kernel | tile (rows, blocks, warps, stages, pair) | registers | spill bytes | "
            + " | ".join(f"loop {k}" for k in LOOP_COUNTS) + " |", "|---|---|---:|---:|" + "---:|" * len(LOOP_COUNTS)]
    ptrs = {"Y": "*fp32", "QS": "*i32", "QH": "*i32", "SC": "*i32", "D": "*i32", "X32": "*i32", "XD": "*fp32",
            "XS": "*fp32", "ADD": "*fp32", "HQ": "*i8", "HD": "*fp32", "HS": "*fp32", "CNT": "*i32", "NW": "*fp32"}
    q6 = ptrs | {"SC": "*i8", "D": "*fp16"}
    kernels = [(mv.matvec_q4_k_kernel, [c + (1, 0) for c in mv.TUNE_CONFIGS[256]], ptrs),
               (mv.matvec_q4_k_v2_kernel, mv.Q4K_V2_TUNE_CONFIGS, ptrs),
               (mv.matvec_q6_k_kernel, [c + (1, 0) for c in mv.TUNE_CONFIGS[256]], q6),
               (mv.matvec_q6_k_kernel, [c + (0,) for c in mv.Q6K_STAGED_TUNE_CONFIGS if c[3] > 1], q6)]
    for fn, configs, types in kernels:
        flags = {"HAS_ADD", "GLU", "NORM", "STORE_Y", "GPU", "BLOCK_N", "NB", "PDL", "STAGES", "PAIR"}
        sig = {n: types.get(n, "fp32" if n == "eps" else "i32") for n in fn.arg_names if n not in flags}
        # pointers and strides 16-divisible, as the JIT specializes them (N, nblk, stride_y, stride_b: not)
        divisible = {n for n in sig if sig[n].startswith("*") or n in ("stride_qs", "stride_qh", "stride_sc",
                                                                       "stride_d", "stride_x")}
        for bn, nb, w, st, pair in configs:
            consts = {"HAS_ADD": False, "GLU": False, "NORM": False, "STORE_Y": True, "GPU": True, "BLOCK_N": bn,
                      "NB": nb, "PDL": 1 if arch >= 90 else 0}
            if "STAGES" in fn.arg_names:
                consts["STAGES"] = st
            if "PAIR" in fn.arg_names:
                consts["PAIR"] = pair
            k = compile_kernel(fn, sig, consts, divisible, arch, {"num_warps": w, "launch_pdl": arch >= 90})
            regs, spill = ptxas_report(k.asm["ptx"], ptxas, arch)
            lc = loop_counts(k.asm["ptx"])
            rows.append(f"| {fn.__name__} | {bn}, {nb}, {w}, {st}, {pair} | {regs} | {spill} | "
                        + " | ".join(str(lc[k]) for k in LOOP_COUNTS) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--types", default="dq,q4_0,q8_0,q4_k,q6_k")
    ap.add_argument("--decode", action="store_true", help="the Q4_K / Q6_K decode products instead")
    args = ap.parse_args()
    from triton.backends.nvidia.compiler import get_ptxas
    if args.decode:
        print("\n".join(decode_report(args.arch, get_ptxas(args.arch).path)))
        return 0
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
