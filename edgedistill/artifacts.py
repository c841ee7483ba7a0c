"""Model folders on disk: finding the graph, measuring what ships, copying what a deployment
needs beside it, and writing files so that a killed process never leaves a half-written one
under the final name.

The ground floor: every stage writes artifact folders through these helpers, so the rules
(which file is the model, what counts towards its size, what travels with it) are written once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Files a deployment needs next to the graph: the tokenizer, the label names, and for a causal
# LM its generation defaults (eos, pad) and chat template.
SIDECAR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "tokenizer.model", "merges.txt",
                 "generation_config.json", "chat_template.jinja")

# the settings file of a PyTorch model packed by Intel Neural Compressor (quantization.weight_only)
WEIGHT_ONLY_SETTINGS = "weight_only.json"
# an OpenVINO model: its graph (XML), the weights beside it (.bin) and the settings it runs with
OPENVINO_XML = "openvino_model.xml"
OPENVINO_SETTINGS = "openvino_config.json"
# an onnxruntime-genai package: the graph with the settings its Generator runs it by, and the
# name of that backend in runtimes and reports
GENAI_CONFIG = "genai_config.json"
GENAI_BACKEND = "onnxruntime-genai"


def onnx_file(folder: str | Path) -> Path | None:
    """The ONNX file in ``folder`` (quantized models keep optimum's ``model_quantized.onnx``)."""
    files = sorted(Path(folder).glob("*.onnx"))
    return files[0] if files else None


def openvino_file(folder: str | Path) -> Path | None:
    """The OpenVINO graph in ``folder`` (its weights are the .bin of the same name)."""
    path = Path(folder) / OPENVINO_XML
    return path if path.is_file() else None


def backend_of(folder: str | Path) -> str:
    if onnx_file(folder) is not None:
        return GENAI_BACKEND if (Path(folder) / GENAI_CONFIG).is_file() else "onnxruntime"
    return "openvino" if openvino_file(folder) is not None else "pytorch"


def size_on_disk_mb(folder: str | Path) -> float:
    """Size of the weights a device has to ship (model files, not tokenizer or configs)."""
    folder = Path(folder)
    onnx, xml = onnx_file(folder), openvino_file(folder)
    if onnx is not None:  # the graph and its external weights (optimum: _data, others .data)
        files = [onnx, *folder.glob(onnx.name + "_data"), *folder.glob(onnx.name + ".data")]
    elif xml is not None:
        files = [xml, xml.with_suffix(".bin")]
    else:
        files = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files) / 1e6


def copy_sidecars(source: Path, target: Path) -> None:
    """Copy :data:`SIDECAR_FILES` that ``source`` has and ``target`` lacks, so every model
    folder the pipeline writes can be deployed (or benchmarked) on its own."""
    for name in SIDECAR_FILES:
        if (source / name).is_file() and not (target / name).is_file():
            shutil.copy2(source / name, target / name)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed into
    place: readers (and a rerun after a kill) see the old file or the new one, never half.
    The temporary name carries the process id, so concurrent writers do not collide."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise


def publish_folder(partial: Path, final: Path) -> None:
    """Move a completely written folder to its final name, replacing an older one there."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
