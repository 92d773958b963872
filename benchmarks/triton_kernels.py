"""Decode and prefill products of sepedge.kernels on the GPU: achieved weight bandwidth of the
matrix-vector products (bytes of the GGUF weight / time) and throughput of the tiled products, for an
8B-sized layer (4096 x 4096 and 14336 x 4096), every tensor type. Prints a table and writes
benchmarks/results/triton_kernels.md.

    python benchmarks/triton_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sepedge.kernels import matmul, matvec  # noqa: E402
from sepedge.kernels.quants import BLOCKS, NAMES, row_bytes  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096)]
PREFILL_TOKENS = 512


def random_weight(qtype: int, N: int, K: int) -> torch.Tensor:
    """Random bytes with small f16 scales (their values do not change the speed)."""
    w = torch.randint(0, 256, (N, row_bytes(qtype, K)), dtype=torch.uint8, device="cuda")
    if qtype in (0, 1, 30):  # float weights: real numbers, no NaN patterns
        dt = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[qtype]
        w = torch.randn(N, K, device="cuda").to(dt).view(torch.uint8)
    return w


def main() -> None:
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
