"""Facts about the machine this process runs on: CPU model, int8 instruction set, usable
cores, memory, library versions. The environment is stamped into every manifest and report."""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path

LIBRARIES = ("edgedistill", "torch", "transformers", "optimum", "optimum-onnx", "onnx",
             "onnxruntime", "onnxruntime-genai", "openvino", "nncf", "datasets", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def host_isa() -> str:
    """The best int8 instruction set on this host, as optimum names its presets."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": usable_cores(),
        "memory_gb": round(memory_gb, 1) if memory_gb else None,
        "int8_isa": host_isa(),
        "libraries": versions,
    }
