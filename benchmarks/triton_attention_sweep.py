"""Prefill attention on the GPU: a 512-token chunk over an f16 cache (Llama-3-8B's 32 query and 8 kv
heads of 128) per dot precision and tile, time and max error against a float64 reference.

    python benchmarks/triton_attention_sweep.py
"""

from __future__ import annotations

import sys

import torch
import triton.testing

from sepedge import kernels as K


def main() -> int:
    torch.manual_seed(0)
    T, n_past, H, H_kv, D = 512, 0, 32, 8, 128
    k = (torch.randn(1024, H_kv, D, device="cuda") * 2).half()
    v = torch.randn(1024, H_kv, D, device="cuda").half()
    cells = torch.randperm(1024, device="cuda")[:n_past + T].int()
    q = torch.randn(T, H, D, device="cuda")
    ref = K.attention_prefill_ref(q.double().cpu(), k.cpu(), v.cpu(), cells.cpu(), n_past).cuda()
    for prec, bm, bn, warps in (("ieee", 64, 64, 4), ("tf32x3", 64, 64, 4), ("tf32x3", 64, 32, 4), ("tf32x3", 128, 64, 8),
                                ("tf32", 64, 64, 4), ("ieee", 32, 32, 4)):
        f = lambda: K.attention_prefill(q, k, v, cells, n_past, block_m=bm, block_n=bn, precision=prec)  # noqa: E731
        try:
            err = float((f().double() - ref).abs().max())
            t = triton.testing.do_bench(f, warmup=5, rep=20)
            print(f"{prec:7s} {bm}x{bn}: {t * 1e3:8.1f} us per layer, x32 layers {t * 32:6.1f} ms, max err {err:.2e}",
                  flush=True)
        except Exception as e:
            print(prec, bm, bn, type(e).__name__, str(e)[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
