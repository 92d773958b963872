"""The benchmarks' own arithmetic that needs no GPU: benchmarks/gpu_timeline.py's reduction of a
profiled timeline (busy and idle time, gaps and their causes) on hand-made records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_timeline import Ev, markdown, summarize  # noqa: E402

GAP_US = 5.0


def timeline() -> list[Ev]:
    return [
        Ev("cuLaunchKernel", 0.0, 3.0, 1, False), Ev("k_a", 4.0, 10.0, 1, True),        # A: 4..14
        Ev("cuLaunchKernel", 6.0, 3.0, 2, False), Ev("k_b", 34.0, 6.0, 2, True),        # B launched before A ended: 20 µs device gap
        Ev("cudaMalloc", 41.0, 8.0, 0, False),
        Ev("cuLaunchKernel", 50.0, 2.0, 3, False), Ev("k_c", 52.0, 10.0, 3, True),      # C launched after B ended at 40: 12 µs host gap
        Ev("cuLaunchKernel", 53.0, 2.0, 4, False), Ev("k_d", 55.0, 20.0, 4, True),      # D overlaps C and outlasts it: busy to 75
        Ev("cuLaunchKernel", 56.0, 2.0, 5, False), Ev("k_e", 78.0, 1.0, 5, True),       # 3 µs: under the threshold
        Ev("k_f", 90.0, 2.0, 99, True),                                                  # no launch call seen: 11 µs unknown
        Ev("cudaStreamSynchronize", 60.0, 30.0, 0, False),
    ]


def test_timeline_busy_idle_and_causes():
    s = summarize(timeline(), wall_us=100.0, gap_us=GAP_US)
    assert s["kernels"] == 6
    assert s["busy_us"] == pytest.approx(10 + 6 + 23 + 1 + 2)   # C and D as one stretch of 52..75
    assert s["span_us"] == pytest.approx(92 - 4)
    assert s["gaps"] == 3
    assert s["device_us"] == pytest.approx(20) and s["host_us"] == pytest.approx(12) and s["unknown_us"] == pytest.approx(11)
    assert s["idle_us"] == pytest.approx(43)
    assert [g[3] for g in s["top"]] == ["device", "host", "unknown"]
    assert s["top"][0][1:3] == ("k_a", "k_b") and s["top"][2][1:3] == ("k_e", "k_f")  # k_d ended the stretch k_e follows
    assert s["blocking"] == {"cudaStreamSynchronize": (1, 30.0), "cudaMalloc": (1, 8.0)}
    assert s["launch_interval_us"] == pytest.approx(4.5)  # launch calls at 0, 6, 50, 53, 56: intervals 6, 44, 3, 3
    text = "\n".join(markdown(s, "t"))
    assert "waiting for the host 0.01 ms" in text and "| 20.0 | k_a | k_b | device |" in text


def test_timeline_threshold_and_empty():
    s = summarize(timeline(), wall_us=100.0, gap_us=25.0)
    assert s["gaps"] == 0 and s["idle_us"] == 0
    e = summarize([], wall_us=1.0)
    assert e["kernels"] == 0 and e["busy_us"] == 0 and e["launch_interval_us"] is None and e["top"] == []
