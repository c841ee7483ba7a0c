"""Latency and memory benchmarks on hardware profiles, each model in its own process."""

from .generation import GenerationSettings, benchmark_generation
from .runner import BenchSettings, benchmark, benchmark_model

__all__ = ["BenchSettings", "GenerationSettings", "benchmark", "benchmark_generation",
           "benchmark_model"]
