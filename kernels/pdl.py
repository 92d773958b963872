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

`SEPEDGE_TRITON_PDL`: 1 (the default), 2 (also the decode products ask L2 for their first tile of
weights before they wait: `prefetch_l2`, so that those bytes are on the chip when the wait ends), 0
(launched one after the other; A/B). GPUs before sm_90, other vendors and the interpreter never use it.
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


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the line of each pointer where mask holds (one instruction an element, no result
    waited for): a kernel's first weight tile, before it waits for the kernel before it."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def pdl_launch(device) -> dict:
    """The launch arguments of a PDL kernel on `device` (a torch.device or tensor): the kernel's PDL
    constexpr (0 off, 1 on, 2 on with the first tile's L2 prefetch) and, where on, Triton's launch_pdl
    option."""
    dev = getattr(device, "device", device)
    mode = os.environ.get(PDL_ENV, "1")
    if dev.type != "cuda" or mode not in ("1", "2"):
        return {"PDL": 0}
    key = (dev.type, dev.index)
    if key not in _capable:
        import torch
        _capable[key] = torch.version.hip is None and torch.cuda.get_device_capability(dev)[0] >= 9
    return {"PDL": int(mode), "launch_pdl": True} if _capable[key] else {"PDL": 0}
