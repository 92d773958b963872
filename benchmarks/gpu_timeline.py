"""Where a GPU's wall time goes between its kernels: one profiled region (torch.profiler, CUPTI) reduced
to busy and idle time, the idle gaps, and for each gap whether the GPU waited for the host (the next
kernel's launch call began after the previous kernel had ended) or for itself (the launch was already
made: a dependency, a device-side wait), plus the host calls that block (synchronizations, allocations).

Used by benchmarks/triton_profile.py --timeline; `summarize` takes plain records so that it is tested
without a GPU (tests/test_bench_tools.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# host calls that put a kernel on the GPU's queue (runtime and driver API; Triton launches by the driver's)
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
                "cudaLaunchCooperativeKernel")
# host calls that wait for the GPU or may (an allocation can free cached memory, which synchronizes)
BLOCKING_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMalloc",
                  "cudaFree", "cudaMemcpy", "cuMemAlloc", "cuMemFree", "cudaMallocHost", "cudaHostAlloc",
                  "cuStreamSynchronize", "cuCtxSynchronize")


@dataclass
class Ev:
    name: str
    start: float   # µs, any common origin
    dur: float     # µs
    corr: int      # the correlation id that ties a kernel to its launch call (0: none)
    gpu: bool      # on the GPU's timeline (a kernel, copy or set), else a host call


def _is(name: str, calls: tuple) -> bool:
    return any(name == c or name.startswith(c + "_") for c in calls)


def summarize(events: list[Ev], wall_us: float, gap_us: float = 5.0, top: int = 8) -> dict:
    """Busy / idle time of the GPU over the region and its gaps of gap_us or more, each with its cause."""
    gpu = sorted((e for e in events if e.gpu), key=lambda e: e.start)
    launches = {e.corr: e for e in events if not e.gpu and e.corr and _is(e.name, LAUNCH_CALLS)}
    busy, end, last, gaps = 0.0, None, None, []  # last: the record whose end is the stretch's end
    for e in gpu:
        e_end = e.start + e.dur
        if end is not None and e.start >= end and e.start - end >= gap_us:
            call = launches.get(e.corr)
            cause = "unknown" if call is None else "host" if call.start >= end else "device"
            gaps.append((e.start - end, last.name, e.name, cause))
        if end is None or e.start >= end:  # a new busy stretch
            busy += e.dur
            end, last = e_end, e
        elif e_end > end:  # overlaps the stretch and outlasts it
            busy += e_end - end
            end, last = e_end, e
    blocking: dict[str, list] = {}
    for e in events:
        if not e.gpu and _is(e.name, BLOCKING_CALLS):
            n_t = blocking.setdefault(e.name, [0, 0.0])
            n_t[0] += 1
            n_t[1] += e.dur
    starts = sorted(e.start for e in launches.values())
    span = max(e.start + e.dur for e in gpu) - gpu[0].start if gpu else 0.0
    return {
        "wall_us": wall_us, "kernels": len(gpu), "busy_us": busy, "span_us": span,
        "idle_us": sum(g[0] for g in gaps), "gaps": len(gaps),
        "host_us": sum(g[0] for g in gaps if g[3] == "host"),
        "device_us": sum(g[0] for g in gaps if g[3] == "device"),
        "unknown_us": sum(g[0] for g in gaps if g[3] == "unknown"),
        "launch_interval_us": statistics.median(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else None,
        "kernel_us": statistics.median(e.dur for e in gpu) if gpu else None,
        "blocking": {k: (v[0], v[1]) for k, v in sorted(blocking.items(), key=lambda kv: -kv[1][1])},
        "top": sorted(gaps, key=lambda g: -g[0])[:top],
    }


def from_profile(prof) -> list[Ev]:
    """The records of a finished torch.profiler profile (kineto's events: kernels, copies, API calls)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        kind = e.activity_type() if hasattr(e, "activity_type") else ""
        gpu = str(e.device_type()).endswith("CUDA") or kind in ("kernel", "gpu_memcpy", "gpu_memset")
        out.append(Ev(e.name(), e.start_ns() / 1e3, e.duration_ns() / 1e3, int(e.correlation_id() or 0), gpu))
    return out


def markdown(s: dict, title: str) -> list[str]:
    pct = lambda x: f"{x / s['wall_us']:.0%}" if s["wall_us"] else "-"
    lines = [f"### {title}", "",
             f"wall {s['wall_us'] / 1e3:.2f} ms; GPU busy {s['busy_us'] / 1e3:.2f} ms ({pct(s['busy_us'])}) over "
             f"{s['kernels']} kernels and copies, first to last {s['span_us'] / 1e3:.2f} ms; idle in {s['gaps']} gaps: "
             f"{s['idle_us'] / 1e3:.2f} ms, waiting for the host {s['host_us'] / 1e3:.2f} ms, with the launch made "
             f"{s['device_us'] / 1e3:.2f} ms, cause unknown {s['unknown_us'] / 1e3:.2f} ms"]
    if s["launch_interval_us"] is not None:
        lines.append(f"median host time between launch calls {s['launch_interval_us']:.1f} µs; median kernel {s['kernel_us']:.1f} µs")
    if s["blocking"]:
        lines.append("blocking host calls: " + ", ".join(f"{k} x{n} ({t / 1e3:.2f} ms)" for k, (n, t) in s["blocking"].items()))
    if s["top"]:
        lines += ["", "| gap µs | after | before | waiting for |", "|---:|---|---|---|"]
        lines += [f"| {g:.1f} | {a[:50]} | {b[:50]} | {c} |" for g, a, b, c in s["top"]]
    return lines + [""]
