"""Programmatic dependent launch (PDL) for the kernels of a decode step.

A decode step is ~10 launches a layer, each a few microseconds of work; in a CUDA graph the next
kernel's programs start only after the previous kernel has finished and its launch has been
processed, ~1.4 us a boundary on the H200 (the kernels' sum against the step: 2.76 against 3.21 ms,
8B Q4_0; benchmarks/results/triton_kernels.md). With PDL (Hopper and later) a kernel is launched
while the one before still runs: its programs become resident and wait at `griddepcontrol.wait`
(Triton's gdc_wait) until the previous grid has completed and its writes are visible, so the launch
and the block scheduling overlap the previous kernel's tail (sepedge's CUDA core does the same:
se-cuda.h, the chained launches).

The rule every kernel launched with `pdl_launch` keeps: `pdl_wait` comes before its first read of
anything an earlier kernel wrote and before its first write (an earlier kernel may still read the
buffer). Only the weights, which no kernel writes, may be read before it. After the wait the kernel
lets the next one launch (gdc_launch_dependents), so at most one kernel waits ahead of the one that
runs and the waiting programs never take a running kernel's place on the multiprocessors.

Measured on the H200 (benchmarks/results/triton_kernels.md): tg128 8B Q4_0 +5.4%, Q4_K_M +4.9%.
The products asking L2 for their first weight tile before the wait gained nothing more (the kernel
before them already has the memory busy) and were taken out.

`SEPEDGE_TRITON_PDL=0` launches one after the other (A/B). GPUs before sm_90, other vendors and the
interpreter never use it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PDL_ENV = "SEPEDGE_TRITON_PDL"
_capable: dict = {}  # (type, index) -> an NVIDIA GPU of sm_90 or later


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel of the stream (its writes visible), then let the next launch."""
    if PDL > 0:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch(device) -> dict:
    """The launch arguments of a PDL kernel on `device` (a torch.device or tensor): the kernel's PDL
    constexpr (0 off, 1 on) and, where on, Triton's launch_pdl option."""
    dev = getattr(device, "device", device)
    if dev.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return {"PDL": 0}
    key = (dev.type, dev.index)
    if key not in _capable:
        import torch
        _capable[key] = torch.version.hip is None and torch.cuda.get_device_capability(dev)[0] >= 9
    return {"PDL": 1, "launch_pdl": True} if _capable[key] else {"PDL": 0}
