"""Decode and prefill products of sepedge.kernels on the GPU: achieved weight bandwidth of the
matrix-vector products (bytes of the GGUF weight / time) and throughput of the tiled products, for an
8B-sized layer (4096 x 4096 and 14336 x 4096), every tensor type. Prints a table and writes
benchmarks/results/triton_kernels.md.

    python benchmarks/triton_kernels.py            # the defaults of the launchers
    python benchmarks/triton_kernels.py --sweep    # block sizes, 14336 x 4096, written to triton_sweep.md
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton.runtime.errors
import triton.testing

from sepedge.kernels import matmul, matvec  # installed, or a PYTHONPATH folder holding sepedge/kernels
from sepedge.kernels.quants import BLOCKS, NAMES, row_bytes

SHAPES = [(4096, 4096), (14336, 4096)]
PREFILL_TOKENS = 512


def random_weight(qtype: int, N: int, K: int) -> torch.Tensor:
    """Random bytes with small f16 scales (their values do not change the speed)."""
    w = torch.randint(0, 256, (N, row_bytes(qtype, K)), dtype=torch.uint8, device="cuda")
    if qtype in (0, 1, 30):  # float weights: real numbers, no NaN patterns
        dt = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[qtype]
        w = torch.randn(N, K, device="cuda").to(dt).view(torch.uint8)
    return w


def sweep() -> None:
    """The block sizes the launchers' defaults were chosen from: the best four (matvec) and three
    (matmul, 512 tokens) per type."""
    N, K = SHAPES[1]
    lines = [f"# sepedge.kernels block-size sweep on {torch.cuda.get_device_name()}, {N} x {K}", "",
             "`python benchmarks/triton_kernels.py --sweep`; (GB/s or TFLOP/s, block sizes), best first.", ""]
    for qtype in (1, 2, 8, 12, 14):
        w = random_weight(qtype, N, K)
        x = torch.randn(1, K, device="cuda")
        res = []
        for bn, bk in itertools.product([1, 2, 4, 8, 16], [256, 512, 1024]):
            t = triton.testing.do_bench(lambda: matvec(w, qtype, x, block_n=bn, block_k=bk), warmup=10, rep=40)
            res.append((w.numel() / t / 1e6, bn, bk))
        res.sort(reverse=True)
        lines.append(f"- matvec {NAMES[qtype]} (block_n, block_k): " + ", ".join(f"{g:.0f} {bn, bk}" for g, bn, bk in res[:4]))
        xp = torch.randn(PREFILL_TOKENS, K, device="cuda")
        res = []
        for bm, bn, bk in [(64, 64, 64), (128, 64, 64), (64, 128, 64), (128, 128, 64), (64, 64, 256), (64, 128, 128)]:
            try:
                t = triton.testing.do_bench(lambda: matmul(w, qtype, xp, block_m=bm, block_n=bn, block_k=bk),
                                            warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:  # the tile does not fit in shared memory
                continue
            res.append((2 * N * K * PREFILL_TOKENS / t / 1e9, bm, bn, bk))
        res.sort(reverse=True)
        lines.append(f"- matmul {NAMES[qtype]} (block_m, block_n, block_k): "
                     + ", ".join(f"{g:.1f} {bm, bn, bk}" for g, bm, bn, bk in res[:3]))
        print(lines[-2], lines[-1], sep="\n", flush=True)
    (Path(__file__).resolve().parent / "results" / "triton_sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    if "--sweep" in sys.argv:
        return sweep()
    gpu = torch.cuda.get_device_name()
    rows = []
    for qtype in BLOCKS:
        for N, K in SHAPES:
            w = random_weight(qtype, N, K)
            x1 = torch.randn(1, K, device="cuda")
            xp = torch.randn(PREFILL_TOKENS, K, device="cuda")
            t_mv = triton.testing.do_bench(lambda: matvec(w, qtype, x1), warmup=25, rep=100)
            t_mm = triton.testing.do_bench(lambda: matmul(w, qtype, xp), warmup=25, rep=100)
            gbs = w.numel() / (t_mv * 1e-3) / 1e9
            tflops = 2 * N * K * PREFILL_TOKENS / (t_mm * 1e-3) / 1e12
            rows.append((NAMES[qtype], f"{N}x{K}", f"{t_mv * 1e3:.1f}", f"{gbs:.0f}", f"{t_mm * 1e3:.0f}", f"{tflops:.1f}"))
            print(*rows[-1], sep="\t", flush=True)
    head = ("type", "N x K", "matvec µs", "matvec GB/s", f"matmul {PREFILL_TOKENS} µs", "matmul TFLOP/s")
    lines = [f"# sepedge.kernels products on {gpu}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; `python benchmarks/triton_kernels.py`; "
             "median of triton.testing.do_bench. GB/s = GGUF weight bytes / matvec time.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    out = Path(__file__).resolve().parent / "results" / "triton_kernels.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
