"""Registers and spills of the float16 prefill kernels for sm_90, on a machine without a GPU: each
autotune config of matmul_f16_kernel (the in-register decoders per repacked type, F16_TUNE_CONFIGS, and
F16_WORD_TUNE_CONFIGS for Q4_K / Q6_K's decoder 3; the plain float16 weight of the
dequantize-once route, DQ_TUNE_CONFIGS) and dequant_f16_kernel at its
launch tile, compiled by Triton with the pointers and strides marked 16-divisible (as Triton's JIT
specializes them at a launch: without it the loads are not vectorized and every config spills), then
`ptxas -v` on the PTX. Prints a markdown table.

    python benchmarks/triton_ptxas.py [--arch 90] [--types dq,q4_0,q8_0,q4_k,q6_k] [--f16-decode 1,3]
    python benchmarks/triton_ptxas.py --sass [--types q4_0,q8_0,q4_k,q6_k] [--f16-decode 1,3] [--configs all]
    python benchmarks/triton_ptxas.py --decode [--arch 90]

--f16-decode: the Q4_K / Q6_K tile decoders of SEPEDGE_TRITON_F16_DECODE (kernels/matmul.py) to compile:
1 (bytes) and / or 3 (int32 words; the default, as the launchers'). --sass: the machine code of
matmul_f16_kernel's K loop instead (the cubin disassembled by the nvdisasm that Triton's package
carries; the loop: the backward branch whose body holds the wgmma), its instructions per weight value a
thread decodes a step (BLOCK_N * BLOCK_K / (32 * warps)), by class: integer ALU (logic, shifts,
permutes, adds, selects), integer multiply-adds (IMAD, also the compiler's moves), I2F (int -> float
through the conversion unit), other conversions (I2FP, F2FP packs, HADD2.F32 float16 -> float32), float
arithmetic, loads (global, shared, cp.async, ldmatrix), shared stores, barriers, wgmma, uniform datapath
(once a warp) and the rest; for the first autotune config unless --configs all. The counts judge a
decoder before a GPU times it; they are not a time (latency, the wgmma's wait and the pipes' rates are
not in them).

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

# pointer types of the arguments as the launchers pass them (kernels/matmul.py: _f16_operand; decoder 3
# of Q4_K / Q6_K reads the code arrays as int32 words: WORD_PTRS)
WEIGHT_PTRS = {  # QS, QH, SC, D
    "dq": ("*fp16", "*fp16", "*fp16", "*fp16"),
    "q4_0": ("*u8", "*u8", "*fp16", "*fp16"),
    "q8_0": ("*u8", "*u8", "*fp16", "*fp16"),
    "q4_k": ("*u8", "*u8", "*u8", "*i32"),
    "q6_k": ("*u8", "*u8", "*i8", "*fp16"),
}
WORD_PTRS = {"q4_k": ("*i32", "*i32", "*u8", "*i32"), "q6_k": ("*i32", "*i32", "*i8", "*fp16")}
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


SASS_CLASSES = {  # SASS opcode (before its first dot) -> class
    "alu": {"IADD3", "VIADD", "IADD", "LOP3", "SHF", "PRMT", "LEA", "SEL", "ISETP", "IABS", "IMNMX", "VIMNMX",
            "BMSK", "SGXT", "FLO", "POPC", "BREV", "PLOP3", "P2R", "R2P", "MOV", "ICMP"},
    "imad": {"IMAD", "IMUL"},  # integer multiply-adds (also the compiler's moves and shifts: IMAD.MOV, IMAD.SHL)
    "I2F": {"I2F"},  # 8/16/32-bit int -> float through the conversion unit
    "conv": {"I2FP", "F2F", "F2FP", "F2I", "I2I"},  # and HADD2.F32 (float16 -> float32)
    "float": {"FFMA", "FMUL", "FADD", "FSEL", "FSETP", "FMNMX", "HADD2", "HMUL2", "HFMA2", "HSETP2", "HMNMX2"},
    "load": {"LDG", "LDS", "LDSM", "LDGSTS", "LDC", "LD"},
    "st.shared": {"STS"},
    "bar": {"BAR"},
    "wgmma": {"HGMMA", "WARPGROUP"},
}
SASS_ORDER = ["alu", "imad", "I2F", "conv", "float", "load", "st.shared", "bar", "wgmma", "uniform", "other"]


def nvdisasm_path() -> str:
    import os

    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")


def sass_loop(cubin: bytes) -> list[str]:
    """Opcodes of the K loop: the longest body from a label to a backward branch to it that holds a wgmma."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm_path(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", ln))}
    best: list[str] = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)]:i + 1]
            if any("GMMA" in b for b in body) and len(body) > len(best):
                best = body
    ops = []
    for ln in best:
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m and not m.group(1).startswith("NOP") and not re.search(r"@!PT\s", ln):  # not the no-ops
            ops.append(m.group(1))
    return ops


def sass_classes(ops: list[str]) -> dict:
    """Counts of sass_loop's opcodes by SASS_CLASSES (uniform: U*, once a warp)."""
    out = dict.fromkeys(SASS_ORDER, 0)
    for op in ops:
        base = op.split(".")[0]
        if op.startswith("HADD2.F32"):
            cls = "conv"
        elif base.startswith("U"):
            cls = "uniform"
        else:
            cls = next((c for c, names in SASS_CLASSES.items() if base in names), "other")
        out[cls] += 1
    return out


def f16_signature(t: str, decode: int) -> tuple[dict, set]:
    """matmul_f16_kernel's argument types for type t and decoder `decode`, and the 16-divisible ones."""
    qs, qh, sc, d = WORD_PTRS[t] if decode == 3 and t in WORD_PTRS else WEIGHT_PTRS[t]
    sig = {"Y": "*fp32", "QS": qs, "QH": qh, "SC": sc, "D": d, "XH": "*fp16", "XS": "*fp32", "ADD": "*fp32"}
    ints = ["M", "N", "K", "stride_qs", "stride_qh", "stride_sc", "stride_d", "stride_xh", "stride_ym", "stride_b",
            "M_KEY"]
    sig |= {n: "i32" for n in ints}
    return sig, set(sig) - {"M", "M_KEY"}


def f16_configs(mm, t: str, decode: int) -> list:
    """The autotune tiles of matmul_f16_kernel for type t and decoder `decode` (kernels/matmul.py)."""
    if t == "dq":
        return mm.DQ_TUNE_CONFIGS
    return mm.F16_WORD_TUNE_CONFIGS if decode == 3 and t in WORD_PTRS else mm.F16_TUNE_CONFIGS


def sass_report(arch: int, ptxas: str, types: list[str], decodes: list[int], all_configs: bool) -> list[str]:
    mm = importlib.import_module("sepedge.kernels.matmul")
    rows = ["| type | decoder | tile (N, M, K) | warps | stages | registers | spill bytes | values a thread a step | "
            "loop instructions a value | " + " | ".join(SASS_ORDER) + " |", "|---|---|---|---|---|---:|---:|---:|---:|"
            + "---:|" * len(SASS_ORDER)]
    for t in types:
        for dec in (decodes if t in WORD_PTRS else [1]):
            sig, divisible = f16_signature(t, dec)
            configs = f16_configs(mm, t, dec)
            for bn, bm, bk, w, st in (configs if all_configs else configs[:1]):
                consts = {"QTYPE": QTYPES[t], "HAS_ADD": True, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk,
                          "DECODE": dec, "GPU": True}
                k = compile_kernel(mm.matmul_f16_kernel, sig, consts, divisible, arch,
                                   {"num_warps": w, "num_stages": st})
                regs, spill = ptxas_report(k.asm["ptx"], ptxas, arch)
                ops = sass_loop(k.asm["cubin"])
                per = bn * bk / (32 * w)
                cls = sass_classes(ops)
                rows.append(f"| {t} | {dec} | {bn}, {bm}, {bk} | {w} | {st} | {regs} | {spill} | {per:.0f} | "
                            f"**{len(ops) / per:.2f}** | " + " | ".join(f"{cls[c] / per:.2f}" for c in SASS_ORDER)
                            + " |")
                print(rows[-1], flush=True)
    return rows


def sass_opcodes(arch: int, t: str, decode: int, config: tuple) -> dict:
    """{opcode: count} of one config's K loop (the full opcodes, for reading a change)."""
    mm = importlib.import_module("sepedge.kernels.matmul")
    sig, divisible = f16_signature(t, decode)
    bn, bm, bk, w, st = config
    consts = {"QTYPE": QTYPES[t], "HAS_ADD": True, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "DECODE": decode,
              "GPU": True}
    k = compile_kernel(mm.matmul_f16_kernel, sig, consts, divisible, arch, {"num_warps": w, "num_stages": st})
    out: dict = {}
    for op in sass_loop(k.asm["cubin"]):
        out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def decode_report(arch: int, ptxas: str) -> list[str]:
    mv = importlib.import_module("sepedge.kernels.matvec")
    rows = ["| kernel | tile (rows, blocks, warps, stages, pair, prefetch) | registers | spill bytes | "
            + " | ".join(f"loop {k}" for k in LOOP_COUNTS) + " |", "|---|---|---:|---:|" + "---:|" * len(LOOP_COUNTS)]
    ptrs = {"Y": "*fp32", "QS": "*i32", "QH": "*i32", "SC": "*i32", "D": "*i32", "X32": "*i32", "XD": "*fp32",
            "XS": "*fp32", "ADD": "*fp32", "HQ": "*i8", "HD": "*fp32", "HS": "*fp32", "CNT": "*i32", "NW": "*fp32"}
    q6 = ptrs | {"SC": "*i8", "D": "*fp16"}
    # prefetch: the K-quant kernels' PF (the next step's loads in flight while a step is summed)
    kernels = [(mv.matvec_q4_k_kernel, [c + (1, 0, pf) for pf in (0, 1) for c in mv.TUNE_CONFIGS[256]], ptrs),
               (mv.matvec_q4_k_v2_kernel, [c + (0,) for c in mv.Q4K_V2_TUNE_CONFIGS], ptrs),
               (mv.matvec_q6_k_kernel, [c + (1, 0, pf) for pf in (0, 1) for c in mv.TUNE_CONFIGS[256]], q6),
               (mv.matvec_q6_k_kernel, [c + (0, 0) for c in mv.Q6K_STAGED_TUNE_CONFIGS if c[3] > 1], q6)]
    for fn, configs, types in kernels:
        flags = {"HAS_ADD", "GLU", "NORM", "STORE_Y", "GPU", "BLOCK_N", "NB", "PDL", "STAGES", "PAIR", "PF"}
        sig = {n: types.get(n, "fp32" if n == "eps" else "i32") for n in fn.arg_names if n not in flags}
        # pointers and strides 16-divisible, as the JIT specializes them (N, nblk, stride_y, stride_b: not)
        divisible = {n for n in sig if sig[n].startswith("*") or n in ("stride_qs", "stride_qh", "stride_sc",
                                                                       "stride_d", "stride_x")}
        for bn, nb, w, st, pair, pf in configs:
            consts = {"HAS_ADD": False, "GLU": False, "NORM": False, "STORE_Y": True, "GPU": True, "BLOCK_N": bn,
                      "NB": nb, "PDL": 1 if arch >= 90 else 0}
            if "STAGES" in fn.arg_names:
                consts["STAGES"] = st
            if "PAIR" in fn.arg_names:
                consts["PAIR"] = pair
            if "PF" in fn.arg_names:
                consts["PF"] = pf
            k = compile_kernel(fn, sig, consts, divisible, arch, {"num_warps": w, "launch_pdl": arch >= 90})
            regs, spill = ptxas_report(k.asm["ptx"], ptxas, arch)
            lc = loop_counts(k.asm["ptx"])
            rows.append(f"| {fn.__name__} | {bn}, {nb}, {w}, {st}, {pair}, {pf} | {regs} | {spill} | "
                        + " | ".join(str(lc[k]) for k in LOOP_COUNTS) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--types", default="dq,q4_0,q8_0,q4_k,q6_k")
    ap.add_argument("--decode", action="store_true", help="the Q4_K / Q6_K decode products instead")
    ap.add_argument("--f16-decode", default="3", help="SEPEDGE_TRITON_F16_DECODE decoders, comma-separated")
    ap.add_argument("--sass", action="store_true", help="the K loop's machine instructions a value instead")
    ap.add_argument("--configs", default="first", choices=["first", "all"], help="--sass: autotune configs")
    args = ap.parse_args()
    from triton.backends.nvidia.compiler import get_ptxas
    if args.decode:
        print("\n".join(decode_report(args.arch, get_ptxas(args.arch).path)))
        return 0
    mm = importlib.import_module("sepedge.kernels.matmul")
    ptxas = get_ptxas(args.arch).path
    decodes = [int(v) for v in args.f16_decode.split(",")]
    if not set(decodes) <= {1, 3}:
        ap.error("--f16-decode: decoders 1 (bytes) and 3 (int32 words)")
    if args.sass:
        types = args.types.split(",") if args.types != ap.get_default("types") else ["q4_0", "q8_0", "q4_k", "q6_k"]
        print("\n".join(sass_report(args.arch, ptxas, types, decodes, args.configs == "all")))
        return 0
    rows = ["| kernel | type | decoder | tile (N, M, K) | warps | stages | registers | spill bytes |",
            "|---|---|---|---|---|---|---:|---:|"]
    for t in args.types.split(","):
        for dec in (decodes if t in WORD_PTRS else [1]):
            sig, divisible = f16_signature(t, dec)
            for bn, bm, bk, w, st in f16_configs(mm, t, dec):
                consts = {"QTYPE": QTYPES[t], "HAS_ADD": True, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk,
                          "DECODE": dec, "GPU": True}
                k = compile_kernel(mm.matmul_f16_kernel, sig, consts, divisible, args.arch,
                                   {"num_warps": w, "num_stages": st})
                regs, spill = ptxas_report(k.asm["ptx"], ptxas, args.arch)
                rows.append(f"| matmul_f16 | {t} | {dec} | {bn}, {bm}, {bk} | {w} | {st} | {regs} | {spill} |")
                print(rows[-1], flush=True)
            if t != "dq":
                qs, qh, sc, d = (sig[n] for n in ("QS", "QH", "SC", "D"))
                dsig = {"OUT": "*fp16", "QS": qs, "QH": qh, "SC": sc, "D": d}
                dsig |= {n: "i32" for n in ("N", "K", "stride_qs", "stride_qh", "stride_sc", "stride_d", "stride_o")}
                # dequantize_f16's GPU tile
                consts = {"QTYPE": QTYPES[t], "BLOCK_N": 32, "BLOCK_K": 256, "DECODE": dec, "GPU": True}
                k = compile_kernel(mm.dequant_f16_kernel, dsig, consts, set(dsig), args.arch, {"num_warps": 4})
                regs, spill = ptxas_report(k.asm["ptx"], ptxas, args.arch)
                rows.append(f"| dequant_f16 | {t} | {dec} | 32, -, 256 | 4 | - | {regs} | {spill} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
