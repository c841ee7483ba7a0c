"""How a sentence embedder turns token states into one vector per text, read from and written
as sentence-transformers' folder files.

A sentence-transformers model folder keeps its transformer at the top (``config.json``,
weights, tokenizer) and lists its modules in ``modules.json``: the Pooling module's settings
sit in ``1_Pooling/config.json``, and a ``Normalize`` module, when listed, scales each
embedding to unit length. edgedistill reads those once, when the task loads a teacher, and
carries them in the model's own config as ``sentence_pooling`` (so a student made from the
teacher, its checkpoints and its exported graph keep them); a saved embedder gets the
sentence-transformers files again, so the library itself can load it.

The ground floor: the runtime, the export and the trainer all pool through :func:`pool`.
It uses tensor methods only (no torch import), so an ONNX benchmark process never loads
torch by importing this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EdgeDistillError

# the model config's key that carries the pooling (config.json of every folder edgedistill saves)
CONFIG_KEY = "sentence_pooling"
# the poolings of the common sentence-transformers models (max and weighted-mean pooling are
# rare, and not built)
MODES = ("mean", "cls")
# sentence-transformers' Pooling config flag of each mode
_ST_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"        # mean over the real tokens, or the first token ([CLS])
    normalize: bool = False   # unit length, so a dot product is the cosine similarity

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgeDistillError(f"{CONFIG_KEY}.mode: '{self.mode}' is not supported; "
                                   f"valid: {', '.join(MODES)}")


def read_pooling(folder: str | Path) -> Pooling | None:
    """The pooling of the embedder in ``folder``: from its config's ``sentence_pooling`` (a
    folder edgedistill saved), else from sentence-transformers' ``modules.json``; None when the
    folder has neither (not a sentence embedder)."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        carried = json.loads(config.read_text()).get(CONFIG_KEY)
        if carried:
            return Pooling(**carried)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
        if pooling is None:
            return None
        settings = json.loads((folder / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgeDistillError(f"{folder}: its sentence-transformers pooling files cannot be "
                               f"read ({e}); repair modules.json and the Pooling module's "
                               "config.json") from None
    on = [mode for mode, flag in _ST_FLAGS.items() if settings.get(flag)]
    other = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v
             and k not in _ST_FLAGS.values()]
    if len(on) != 1 or other:
        raise EdgeDistillError(
            f"{folder}: its pooling ({', '.join(on + other) or 'none'}) is not one that "
            f"edgedistill exports; it pools by one of {', '.join(MODES)}")
    return Pooling(on[0], any(m.get("type") == _NORMALIZE for m in modules))


def require_pooling(folder: str | Path, where: str) -> Pooling:
    pooling = read_pooling(folder)
    if pooling is None:
        raise EdgeDistillError(
            f"{where}: {folder} has no pooling information (no modules.json with a Pooling "
            "module, no sentence_pooling in config.json); use a sentence-transformers model "
            "folder, or add 1_Pooling/config.json and modules.json to it")
    return pooling


def carry(config, pooling: Pooling) -> None:
    """Keep ``pooling`` in a transformers config (saved with it in config.json)."""
    setattr(config, CONFIG_KEY, asdict(pooling))


def carried(config) -> Pooling | None:
    value = getattr(config, CONFIG_KEY, None)
    return Pooling(**value) if value else None


def pool(hidden, mask, pooling: Pooling):
    """Sentence embeddings (batch, width) from token states (batch, length, width) and the
    attention mask (batch, length), as sentence-transformers' Pooling (+ Normalize) computes
    them: padding never counts."""
    if pooling.mode == "cls":
        out = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if pooling.normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return out


def write_sentence_transformers_files(folder: str | Path, pooling: Pooling, width: int,
                                      max_length: int) -> None:
    """Write the files that make ``folder`` (a saved transformers encoder) a
    sentence-transformers model with this pooling (``SentenceTransformer(folder)`` loads it)."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    settings = {"word_embedding_dimension": width,
                **{flag: mode == pooling.mode for mode, flag in _ST_FLAGS.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
