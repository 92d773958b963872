"""Prefill products of repacked weights on the GPU: TFLOP/s of the packed int8 kernel per tile, warps and
pipeline depth (num_stages), against the byte-wise kernel on the file's bytes and torch's int8 matrix
product (torch._int_mm, codes only: the tensor cores' ceiling without scales). Random codes, sane
scales, 512 activation rows (pp512's chunk).

    python benchmarks/triton_prefill_sweep.py [--json out.json]
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
from sepedge.kernels import matmul as MM_mod  # noqa: F401  (the module, for its kernels)
from sepedge.kernels.quants import BLOCKS, NAMES, Q4_0, Q4_K, Q6_K, row_bytes

MM = sys.modules["sepedge.kernels.matmul"]
VARIANTS = [(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 1), (128, 64, 8, 3), (64, 128, 8, 1),
            (64, 128, 8, 3), (128, 128, 8, 1)]


def random_weight(qtype: int, N: int, K_: int) -> torch.Tensor:
    block, size = BLOCKS[qtype]
    w = torch.randint(0, 256, (N, K_ // block, size), dtype=torch.uint8, device="cuda")
    d = (torch.randn(N, K_ // block, device="cuda") * 0.01).half().view(torch.uint8).view(N, K_ // block, 2)
    off = {Q4_0: [0], Q4_K: [0, 2], Q6_K: [208]}[qtype]
    for o in off:
        w[..., o:o + 2] = d
    return w.reshape(N, row_bytes(qtype, K_))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    M = 512
    rows = []
    for qtype, N, K_ in ((Q4_0, 4096, 4096), (Q4_0, 14336, 4096), (Q4_K, 4096, 4096), (Q6_K, 4096, 4096)):
        w = random_weight(qtype, N, K_)
        p = K.pack(w, qtype, K_)
        x = K.act_q8(torch.randn(M, K_, device="cuda"))
        flop = 2 * M * N * K_
        ref = K.matmul(w, qtype, x, packed=False)
        res = {"type": NAMES[qtype], "N": N, "K": K_}
        t = triton.testing.do_bench(lambda: K.matmul(w, qtype, x, packed=False), warmup=5, rep=20) * 1e-3
        res["bytes-kernel"] = flop / t / 1e12
        a = x.q.contiguous()
        b = torch.randint(-8, 8, (K_, N), dtype=torch.int8, device="cuda")
        t = triton.testing.do_bench(lambda: torch._int_mm(a, b), warmup=5, rep=20) * 1e-3
        res["torch._int_mm"] = flop / t / 1e12
        for bm, bn, warps, stages in VARIANTS:
            y = torch.empty(M, N, device="cuda")
            qs = p.qs.view(torch.uint8)
            qh = p.qh.view(torch.uint8) if p.qh is not None else qs
            sc = p.sc if p.sc is not None else p.d

            def run():
                MM.matmul_packed_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
                    y, qs, qh, sc, p.d, x.q, x.d, x.s, y, M, N, K_, qs.stride(0), qh.stride(0), sc.stride(0),
                    p.d.stride(0), y.stride(0), 0, 0, QTYPE=qtype, HAS_ADD=False, BLOCK_M=bm, BLOCK_N=bn, KSUB=1,
                    num_warps=warps, num_stages=stages)
            try:
                run()
                err = float((y - ref).abs().max() / ref.abs().max())
                t = triton.testing.do_bench(run, warmup=5, rep=20) * 1e-3
                res[f"{bm}x{bn} w{warps} s{stages}"] = round(flop / t / 1e12, 1)
                res[f"{bm}x{bn} w{warps} s{stages} err"] = err
            except Exception as e:  # a variant that does not compile or run must not lose the others
                res[f"{bm}x{bn} w{warps} s{stages}"] = f"{type(e).__name__}"
        rows.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
