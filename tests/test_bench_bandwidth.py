"""Allreduce benchmarks report algbw and busbw by nccl-tests' definitions (hand-computed cases)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bandwidth import allreduce_bandwidth  # noqa: E402


@pytest.mark.parametrize("ranks, busbw", [(1, 0.0), (2, 25.0), (4, 37.5), (8, 43.75)])
def test_algbw_and_busbw_by_hand(ranks, busbw):
    # 100 MB in 4 ms: algbw 25 GB/s at any rank count; busbw = 25 x 2(n-1)/n
    bw = allreduce_bandwidth(100e6, 4e-3, ranks)
    assert bw["algbw_GBps"] == pytest.approx(25.0)
    assert bw["busbw_GBps"] == pytest.approx(busbw)


@pytest.mark.parametrize("seconds, ranks", [(0.0, 2), (-1.0, 2), (1.0, 0)])
def test_impossible_timings_are_refused(seconds, ranks):
    with pytest.raises(ValueError, match="seconds > 0 and ranks >= 1"):
        allreduce_bandwidth(1e6, seconds, ranks)


def test_gpu_report_writes_medians_bandwidth_and_failures(tmp_path, capsys):
    """The GPU benchmark's rank-0 report runs without a GPU: medians, both bandwidths, the ratio
    to NCCL's packed allreduce, the failed case and exit status 1."""
    from benchmarks._gpu_allreduce import report

    out = tmp_path / "gpu.json"
    times = {"NCCL allreduce packed f32 (no pack)": [3e-3, 1e-3, 2e-3],
             "hpcsgd nccl float16": [5e-3, 4e-3, 4e-3]}
    meta = dict(ranks=4, gpu="G", cupy="13", nccl=22000, quick=True, repeats=3, arrays=40, grad_bytes=100e6)
    args = SimpleNamespace(quick=True, repeats=3, out=str(out))
    rc = report(args, times, {"hpcsgd x": "RuntimeError: y"}, meta)
    assert rc == 1
    doc = json.loads(out.read_text())
    fp16 = doc["resnet50_gpu"]["hpcsgd nccl float16"]
    assert fp16["median_ms"] == pytest.approx(4.0)
    assert fp16["algbw_GBps"] == pytest.approx(25.0) and fp16["busbw_GBps"] == pytest.approx(37.5)
    assert fp16["ratio_to_nccl_packed"] == pytest.approx(2.0)
    assert doc["errors"] == {"hpcsgd x": "RuntimeError: y"} and doc["ranks"] == 4
    assert "FAILED: RuntimeError: y" in capsys.readouterr().out
