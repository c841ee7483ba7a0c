"""Hardware profiles: YAML data files under ``bench/profiles/``, loaded by name."""

from __future__ import annotations

import difflib
import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import EdgeDistillError


@dataclass
class Profile:
    """Where a model is to run, and how a run on this host imitates it.

    ``threads``: intra-op threads (0: every core this process may use); there is one
    inter-op thread, because onnxruntime runs these graphs node after node (sequential
    execution), where more inter-op threads would sit idle. ``cpu_affinity``: pin
    the benchmark's processes to that many cores (0: no pinning). ``memory_budget_mb``: a model
    whose process grows past it is stopped and reported as over budget, as a phone's
    low-memory killer would stop it (0: no budget). ``target``: the device the profile stands
    for, named in the report next to the host it was measured on. ``mobile_artifact``: the
    pipeline also writes the int8 student in ORT format for ONNX Runtime Mobile
    (:mod:`edgedistill.mobile`).
    """

    name: str
    description: str = ""
    target: str = ""
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 0
    cpu_affinity: int = 0
    memory_budget_mb: int = 0
    mobile_artifact: bool = False
    quantization: dict = field(default_factory=dict)
    # the input shape benchmarked when a recipe or command does not set one
    batch_size: int = 1
    sequence_length: int = 128
    # the target device's peaks for a roofline projection (bench.roofline): int8_gops,
    # fp32_gflops, bandwidth_gbs and their source; no numbers: the target is this host
    roofline: dict = field(default_factory=dict)

    @property
    def num_threads(self) -> int:
        if self.threads:
            return self.threads
        # the cores this process may run on (a container or taskset may allow fewer than exist)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _profile_dir() -> Path:
    return Path(str(resources.files("edgedistill.bench") / "profiles"))


def list_profiles() -> list[Profile]:
    return [load_profile(p.stem) for p in sorted(_profile_dir().glob("*.yaml"))]


def load_profile(name: str) -> Profile:
    path = _profile_dir() / f"{name}.yaml"
    names = sorted(p.stem for p in _profile_dir().glob("*.yaml"))
    if name not in names:  # a name, never a path: "../x" must not reach another file
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise EdgeDistillError(f"profile '{name}' is unknown; {hint}available: {', '.join(names)}")
    raw = yaml.safe_load(path.read_text())
    try:
        return Profile(**raw)
    except TypeError as e:
        raise EdgeDistillError(f"{path}: invalid profile ({e})")


def check_available(profile: Profile) -> None:
    """Refuse a profile whose execution providers this host lacks (a GPU profile without a
    GPU): its numbers would be the CPU's under another name."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    missing = [p for p in profile.execution_providers if p not in available]
    if missing:
        raise EdgeDistillError(
            f"profile '{profile.name}' needs {', '.join(missing)}, which this host's "
            f"onnxruntime lacks (it has {', '.join(available)}); nothing was measured: run it "
            "where that device and onnxruntime build exist, or choose profile cpu")


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
