"""Prefill products of repacked weights on the GPU, 512 activation rows (pp512's chunk), the shapes of a
Llama-3-8B layer: TFLOP/s of the 8-bit kernel (int8 tl.dot per 32 values, autotuned), of the float16
kernel (weight tiles decoded to float16 in registers, K tiles of 64-128: each tile config and the
autotuned choice), and of cuBLAS on the weight already decoded to float16 (torch.matmul: the
tensor cores' pace without any decoding; what llama.cpp's dequantize-then-GEMM path reaches). Random
codes, sane scales; the float16 kernel's error against the 8-bit one.

    python benchmarks/triton_prefill_sweep.py [--json out.json] [--quick] [--types q4_k,q6_k] [--decoders 1,3]

--decoders: the float16 kernel's Q4_K / Q6_K tile decoders (SEPEDGE_TRITON_F16_DECODE, kernels/matmul.py)
timed one after the other on the same weight, each autotuned (and each config's row unless --quick); the
other types have decoder 1 only. --types: only these types' shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

from sepedge import kernels as K
from sepedge.kernels.quants import BLOCKS, NAMES, Q4_0, Q4_K, Q6_K, Q8_0, row_bytes

MM = K.matmul_mod
SHAPES = [(Q4_0, 6144, 4096), (Q4_0, 28672, 4096), (Q4_0, 4096, 14336), (Q4_K, 6144, 4096), (Q4_K, 28672, 4096),
          (Q6_K, 4096, 14336), (Q8_0, 4096, 4096)]


def random_weight(qtype: int, N: int, K_: int) -> torch.Tensor:
    block, size = BLOCKS[qtype]
    w = torch.randint(0, 256, (N, K_ // block, size), dtype=torch.uint8, device="cuda")
    d = (torch.randn(N, K_ // block, device="cuda") * 0.01).half().view(torch.uint8).view(N, K_ // block, 2)
    for o in {Q4_0: [0], Q8_0: [0], Q4_K: [0, 2], Q6_K: [208]}[qtype]:
        w[..., o:o + 2] = d
    return w.reshape(N, row_bytes(qtype, K_))


def tflops(fn, flop: float) -> float:
    return round(flop / (triton.testing.do_bench(fn, warmup=5, rep=20) * 1e-3) / 1e12, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="no per-config rows (the autotuned kernels only)")
    ap.add_argument("--types", default="", help="only these types, comma-separated (q4_0,q4_k,q6_k,q8_0)")
    ap.add_argument("--decoders", default="1,3", help="Q4_K / Q6_K float16 tile decoders, comma-separated")
    args = ap.parse_args()
    if not set(args.decoders.split(",")) <= {"1", "3"}:
        ap.error("--decoders: 1 (bytes) and 3 (int32 words)")
    M = 512
    rows = []
    types = {t.upper() for t in args.types.split(",") if t}
    for qtype, N, K_ in SHAPES:
        if types and NAMES[qtype] not in types:
            continue
        p = K.pack(random_weight(qtype, N, K_), qtype, K_)
        xf = torch.randn(M, K_, device="cuda")
        xq, xh = K.act_q8(xf), K.act_f16(xf)
        flop = 2 * M * N * K_
        res = {"type": NAMES[qtype], "N": N, "K": K_}
        ref = K.matmul(p, qtype, xq)
        res["int8"] = tflops(lambda: K.matmul(p, qtype, xq), flop)
        y = K.matmul(p, qtype, xh)
        res["f16 err vs int8"] = float((y - ref).abs().max() / ref.abs().max())
        decoders = [int(d) for d in args.decoders.split(",")] if qtype in (Q4_K, Q6_K) else [1]
        for dec in decoders:
            tag = "f16" if dec == 1 else f"f16 decoder{dec}"
            if dec != 1:  # the same tile values; the compiler may sum them in another order (an H200 did), so
                # the largest difference from decoder 1's product at one tile config, relative to its largest value
                one = MM.F16_TUNE_CONFIGS[0]
                y1 = MM.matmul_f16(p, xh, None, 0, *one, decode=1)
                res[f"{tag} diff vs decoder 1"] = float((MM.matmul_f16(p, xh, None, 0, *one, decode=dec) - y1).abs().max()
                                                        / y1.abs().max())
            res[tag] = tflops(lambda: MM.matmul_f16(p, xh, None, 0, decode=dec), flop)
            tuned = MM._tuned["f16" if dec == 1 else "f16w"].cache
            res[f"{tag} tuned"] = [f"{c.kwargs} w{c.num_warps} s{c.num_stages}" for k, c in tuned.items()
                                   if k[0] == N and k[1] == K_ and k[3] == qtype and len(k) > 5 and k[5] == dec]
        wf = K.dequantize_packed_ref(p).half()
        res["cublas f16"] = tflops(lambda: torch.matmul(xh.h, wf.T), flop)
        del wf
        if not args.quick:
            for dec in decoders:
                for bn, bm, bk, w, st in (MM.F16_TUNE_CONFIGS if dec == 1 else MM.F16_WORD_TUNE_CONFIGS):
                    name = f"f16 {bn}x{bm}x{bk} w{w} s{st}" + ("" if dec == 1 else f" decoder{dec}")
                    try:
                        res[name] = tflops(lambda: MM.matmul_f16(p, xh, None, 0, bn, bm, bk, w, st, decode=dec), flop)
                    except Exception as e:  # a config that does not compile or run must not lose the others
                        res[name] = type(e).__name__
        rows.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
