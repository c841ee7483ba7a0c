"""Hardware profiles: YAML data files under ``edgedistill/profiles/``, loaded by name and
resolved once per run, against this host, into a :class:`Target` that every stage receives
whole (threads, providers, int8 preset for this host's instruction set, memory budget, input
shape, peaks)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import EdgeDistillError
from .host import host_isa, usable_cores
from .runtime.session import check_openvino_precision

# optimum's int8 presets, by instruction set
PRESETS = ("avx512_vnni", "avx512", "avx2", "arm64")

# The runtimes an int8 student ships on. onnxruntime's is the one every profile ships (the phone
# artifact, the roofline and quantization-aware distillation read its graph); OpenVINO's, made
# by NNCF from the fp32 export, runs on x86 and ARM CPUs (its CPU plugin).
RUNTIMES = ("onnxruntime", "openvino")

# What a profile's ``quantization`` block may set beyond ``preset`` and ``per_channel``, and the
# values each takes. Left out, optimum's preset decides (reduce_range is off in all of them;
# on avx2, whose u8 x s8 multiply-add can saturate 16-bit sums with full-range weights, 7-bit
# weights make the int8 model compute the exact integer math, which mobile-arm64 needs; for
# the cpu profile it changed nothing that matters: two tweets-mpnet students' int8 macro-F1
# moved by -0.0014 and +0.0048, their agreement with fp32 by -0.0005 and +0.0025).
PRESET_OPTIONS = {"reduce_range": (True, False), "format": ("QDQ", "QOperator"),
                  "activations": ("uint8", "int8"), "weights": ("int8", "uint8"),
                  "fuse": (True, False), "fp16": (True, False)}


@dataclass
class Profile:
    """Where a model is to run, and how a run on this host imitates it, as the YAML file says.

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
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime"])
    openvino_precision: str = "f32"
    quantization: dict = field(default_factory=dict)
    # the input shape benchmarked when a recipe or command does not set one
    batch_size: int = 1
    sequence_length: int = 128
    # the target device's peaks for a roofline projection (bench.roofline): int8_gops,
    # fp32_gflops, bandwidth_gbs and their source; no numbers: the target is this host
    roofline: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A profile resolved on this host: what every stage reads instead of the profile's name.

    ``threads`` is a number (the profile's 0 became the usable cores); ``int8`` is the profile's
    concrete int8 scheme (``preset`` never 'auto', ``per_channel``, ``fuse`` and its preset
    options, 'auto' made the host's instruction set; :meth:`int8_for` applies a recipe's
    choices).
    """

    name: str
    device: str
    providers: tuple[str, ...]
    threads: int
    cpu_affinity: int
    memory_budget_mb: int
    mobile_artifact: bool
    batch_size: int
    sequence_length: int
    roofline: dict
    int8: dict
    runtimes: tuple[str, ...] = ("onnxruntime",)
    openvino_precision: str = "f32"

    @property
    def fp16(self) -> bool:
        """The profile asks for an fp16 model too (a GPU's)."""
        return bool(self.int8.get("fp16"))

    def int8_for(self, quantize=None) -> dict:
        """The int8 scheme for a quantize block (a recipe's ``QuantizeConfig``; profiles sit
        beside the recipe module and do not import it): the profile's, with the block's preset,
        per_channel and fuse on top where it sets them (None and 'auto' leave the profile's)."""
        settings = dict(self.int8)
        if quantize is not None:
            chosen = {"preset": None if quantize.preset == "auto" else quantize.preset,
                      "per_channel": quantize.per_channel, "fuse": quantize.fuse}
            settings.update({k: v for k, v in chosen.items() if v is not None})
        return _checked_int8(settings, self.name)

    def runtimes_for(self, quantize=None, supported: tuple[str, ...] = RUNTIMES) -> tuple[str, ...]:
        """The runtimes a run's int8 student ships on: the quantize block's ``runtimes`` where
        it sets them (each must be one the task ``supported``), else the profile's that the
        task supports."""
        asked = getattr(quantize, "runtimes", None)
        if not asked:
            return tuple(r for r in self.runtimes if r in supported)
        other = [r for r in asked if r not in supported]
        if other:
            raise EdgeDistillError(f"quantize.runtimes: {', '.join(other)} is not a runtime this "
                                   f"task ships; valid: {', '.join(supported)}")
        return _checked_runtimes(asked, "quantize.runtimes", self.name, self.providers)


def _profile_dir() -> Path:
    return Path(str(resources.files("edgedistill") / "profiles"))


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


def _checked_int8(settings: dict, profile: str) -> dict:
    """An int8 block made concrete and checked: 'auto' becomes the host's best instruction set,
    unknown keys and values are refused, per-channel weights and fusion default to on."""
    settings = dict(settings)
    if settings.get("preset", "auto") == "auto":
        settings["preset"] = host_isa()
    if settings["preset"] not in PRESETS:
        raise EdgeDistillError(
            f"quantize.preset: '{settings['preset']}' is unknown; valid: auto, {', '.join(PRESETS)}")
    for key, value in settings.items():
        if key in PRESET_OPTIONS and value not in PRESET_OPTIONS[key]:
            raise EdgeDistillError(
                f"profile '{profile}': quantization.{key} '{value}' is invalid; valid: "
                f"{', '.join(map(str, PRESET_OPTIONS[key]))}")
        if key not in PRESET_OPTIONS and key not in ("preset", "per_channel"):
            raise EdgeDistillError(
                f"profile '{profile}': quantization.{key} is unknown; valid: preset, "
                f"per_channel, {', '.join(PRESET_OPTIONS)}")
    settings.setdefault("per_channel", True)
    settings.setdefault("fuse", True)
    return settings


def _checked_runtimes(runtimes, where: str, profile: str, providers) -> tuple[str, ...]:
    """Runtimes refused where unknown, without onnxruntime, or OpenVINO on a profile that
    measures another device than the CPU (OpenVINO runs on the CPU here)."""
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise EdgeDistillError(f"{where}: '{unknown[0]}' is unknown; valid: {', '.join(RUNTIMES)}")
    if "onnxruntime" not in runtimes:
        raise EdgeDistillError(f"{where}: onnxruntime is missing; every profile ships the "
                               f"onnxruntime int8 student (list it first: [onnxruntime, "
                               f"{', '.join(runtimes)}])")
    other = [p for p in providers if p != "CPUExecutionProvider"]
    if "openvino" in runtimes and other:
        raise EdgeDistillError(f"{where}: openvino runs on the CPU here and profile '{profile}' "
                               f"measures {', '.join(other)}; drop openvino or choose profile cpu")
    return tuple(dict.fromkeys(runtimes))


def resolve_target(profile: str | Profile | Target = "cpu") -> Target:
    """Resolve a profile (its name, or a loaded one) on this host; a Target is returned as it
    is."""
    if isinstance(profile, Target):
        return profile
    p = load_profile(profile) if isinstance(profile, str) else profile
    return Target(name=p.name, device=p.target, providers=tuple(p.execution_providers),
                  threads=p.threads or usable_cores(), cpu_affinity=p.cpu_affinity,
                  memory_budget_mb=p.memory_budget_mb, mobile_artifact=p.mobile_artifact,
                  batch_size=p.batch_size, sequence_length=p.sequence_length,
                  roofline=dict(p.roofline), int8=_checked_int8(p.quantization, p.name),
                  runtimes=_checked_runtimes(p.runtimes, f"profile '{p.name}': runtimes", p.name,
                                             p.execution_providers),
                  openvino_precision=check_openvino_precision(
                      p.openvino_precision, f"profile '{p.name}': openvino_precision"))


def check_available(target: Target) -> None:
    """Refuse a target whose execution providers this host lacks (a GPU profile without a
    GPU): its numbers would be the CPU's under another name."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    missing = [p for p in target.providers if p not in available]
    if missing:
        raise EdgeDistillError(
            f"profile '{target.name}' needs {', '.join(missing)}, which this host's "
            f"onnxruntime lacks (it has {', '.join(available)}); nothing was measured: run it "
            "where that device and onnxruntime build exist, or choose profile cpu")
