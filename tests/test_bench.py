import shutil

import pytest

from edgedistill.bench.runner import BenchSettings, benchmark, benchmark_model
from edgedistill.bench.stats import Latency
from edgedistill.errors import EdgeDistillError


def test_latency_percentiles():
    lat = Latency.from_seconds([0.001 * i for i in range(1, 101)])
    assert lat.count == 100
    assert lat.p50_ms == pytest.approx(50.5)
    assert lat.p99_ms == pytest.approx(99.01)
    assert lat.min_ms == pytest.approx(1.0) and lat.max_ms == pytest.approx(100.0)
    assert lat.throughput_per_s == pytest.approx(1000 / 50.5)


def test_benchmark_in_fresh_processes_taking_turns(tiny_teacher_dir, tmp_path):
    settings = BenchSettings(warmup=1, iterations=5, min_seconds=0.05, sequence_length=32,
                             real_length_samples=3, max_length=32, rounds=2)
    twin = tmp_path / "twin"
    shutil.copytree(tiny_teacher_dir, twin)
    results = benchmark([tiny_teacher_dir, twin], "cpu", ["good pain relief", "bad dose"],
                        settings, progress=False)
    assert [r["path"] for r in results] == [str(tiny_teacher_dir), str(twin)]
    result = results[0]
    assert result["backend"] == "pytorch" and result["rounds"] == 2
    assert len(result["round_p50_ms"]) == 2
    assert result["latency"]["count"] >= 10  # both rounds pooled
    assert result["latency_real_lengths"]["count"] == 4
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    assert result["size_mb"] > 0 and result["threads"] >= 1


def test_sequence_longer_than_the_model(tiny_teacher_dir):
    with pytest.raises(EdgeDistillError, match="exceeds the 64 positions"):
        benchmark_model(tiny_teacher_dir, "cpu", settings=BenchSettings(sequence_length=128))
    with pytest.raises(EdgeDistillError, match="model folder does not exist"):
        benchmark([tiny_teacher_dir.parent / "missing"])
