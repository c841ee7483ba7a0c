"""Latency statistics, in milliseconds."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Latency:
    count: int
    mean_ms: float
    stdev_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float  # samples per second at the measured batch size
    # the 0th, 1st, ..., 100th percentiles: the whole distribution, for the report's plot,
    # without keeping every sample
    percentiles_ms: list[float]

    @classmethod
    def from_seconds(cls, seconds: list[float], batch_size: int = 1) -> "Latency":
        ms = np.asarray(seconds, dtype=float) * 1000.0
        if ms.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        percentiles = [round(float(v), 4) for v in np.percentile(ms, np.arange(101))]
        return cls(count=int(ms.size), mean_ms=float(ms.mean()),
                   stdev_ms=float(statistics.stdev(ms)) if ms.size > 1 else 0.0,
                   p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95), p99_ms=float(p99),
                   min_ms=float(ms.min()), max_ms=float(ms.max()),
                   throughput_per_s=float(batch_size * 1000.0 / ms.mean()),
                   percentiles_ms=percentiles)

    def to_dict(self) -> dict:
        return asdict(self)
