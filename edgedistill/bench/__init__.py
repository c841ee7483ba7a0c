"""Latency and memory benchmarks on hardware profiles, each model in its own process."""

from .generation import GenerationSettings, benchmark_generation
from .profiles import Profile, list_profiles, load_profile
from .runner import benchmark, benchmark_model

__all__ = ["GenerationSettings", "Profile", "benchmark", "benchmark_generation", "benchmark_model",
           "list_profiles", "load_profile"]
