"""Prefill products of repacked weights on the GPU, 512 activation rows (pp512's chunk), the shapes of a
Llama-3-8B layer: TFLOP/s of the 8-bit kernel (int8 tl.dot per 32 values, autotuned), of the float16
kernel (weight tiles decoded to float16 in registers, K tiles of 64-128: each tile config and the
autotuned choice), and of cuBLAS on the weight already decoded to float16 (torch.matmul: the
tensor cores' pace without any decoding; what llama.cpp's dequantize-then-GEMM path reaches). Random
codes, sane scales; the float16 kernel's error against the 8-bit one.

    python benchmarks/triton_prefill_sweep.py [--json out.json] [--quick]
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
    args = ap.parse_args()
    M = 512
    rows = []
    for qtype, N, K_ in SHAPES:
        p = K.pack(random_weight(qtype, N, K_), qtype, K_)
        xf = torch.randn(M, K_, device="cuda")
        xq, xh = K.act_q8(xf), K.act_f16(xf)
        flop = 2 * M * N * K_
        res = {"type": NAMES[qtype], "N": N, "K": K_}
        ref = K.matmul(p, qtype, xq)
        res["int8"] = tflops(lambda: K.matmul(p, qtype, xq), flop)
        y = K.matmul(p, qtype, xh)
        res["f16 err vs int8"] = float((y - ref).abs().max() / ref.abs().max())
        res["f16"] = tflops(lambda: K.matmul(p, qtype, xh), flop)
        tuned = MM._tuned["f16"].cache
        res["f16 tuned"] = [str(c) for k, c in tuned.items() if k[0] == N and k[1] == K_ and qtype in k]
        wf = K.dequantize_packed_ref(p).half()
        res["cublas f16"] = tflops(lambda: torch.matmul(xh.h, wf.T), flop)
        del wf
        if not args.quick:
            for bn, bm, bk, w, st in MM.F16_TUNE_CONFIGS:
                try:
                    res[f"f16 {bn}x{bm}x{bk} w{w} s{st}"] = tflops(
                        lambda: MM.matmul_f16(p, xh, None, 0, bn, bm, bk, w, st), flop)
                except Exception as e:  # a config that does not compile or run must not lose the others
                    res[f"f16 {bn}x{bm}x{bk} w{w} s{st}"] = type(e).__name__
        rows.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
