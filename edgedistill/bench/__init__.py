"""Latency and memory benchmarks on hardware profiles, each model in its own process."""

from .profiles import Profile, list_profiles, load_profile
from .runner import benchmark, benchmark_model

__all__ = ["Profile", "benchmark", "benchmark_model", "list_profiles", "load_profile"]
