"""Typed recipe: the blocks of edgedistill.recipe_blocks put together, safe YAML load/dump,
``--set`` overrides, validation with clear errors.

The blocks' dataclasses are the single source of every setting: the Python API, the YAML recipe
and the CLI's ``--set stage.field=value`` all go through them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .artifacts import write_atomic
from .errors import EdgeDistillError
from .recipe_blocks import (  # the blocks: a Recipe holds one of each
    BenchConfig,
    DataConfig,
    DistillConfig,
    DistributedConfig,
    EvaluateConfig,
    ExportConfig,
    QuantizeConfig,
    ReportConfig,
    SearchConfig,
    StudentConfig,
    TeacherConfig,
    TransferConfig,
    _f,
    check_field,
    limit_text,
)

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
DEFAULT_RECIPE = "drug-reviews-minilm.yaml"


@dataclass
class Recipe:
    version: int = _f(RECIPE_VERSION, "Recipe format version.")
    name: str = _f("run", "Run name, shown in the report.")
    task: str = _f("classification", "A registered task (edgedistill.tasks): classification, "
                                     "a text classifier scored by macro-F1; causal-lm, a "
                                     "language model scored by perplexity on held-out text; "
                                     "sentence-embedding, a sentence-transformers model scored "
                                     "by agreement with its teacher's embeddings; "
                                     "token-classification, a tagger scored by entity F1; "
                                     "question-answering, answers found in a context, scored "
                                     "by SQuAD's exact match and F1.")
    seed: int = _f(42, "Random seed for splits, initialisation and training.", ge=0)
    output_dir: str = _f("runs/run", "Where stage artifacts and the report go.")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def check(self, where: str = "") -> None:
        """Rules across blocks that hold for every task (a task's own rules are its
        ``check`` in edgedistill.tasks)."""
        d, q, gen = self.distill, self.quantize, self.transfer.generate
        if d.qat_epochs and q.tolerable_loss is not None:
            raise EdgeDistillError(f"{where}distill.qat_epochs: accuracy-aware tuning may ship "
                                   "another int8 scheme than the one trained for; remove "
                                   "quantize.tolerable_loss or distill.qat_epochs")
        if d.qat_epochs and (q.nodes_to_exclude or q.operators):
            raise EdgeDistillError(f"{where}distill.qat_epochs: the simulation rounds every "
                                   "Linear as default int8 does; remove quantize.nodes_to_exclude"
                                   " / quantize.operators")
        if gen.prompts and gen.lmbda and d.cache_teacher:
            raise EdgeDistillError(f"{where}transfer.generate.lmbda: on-policy sequences are "
                                   "scored by the live teacher; set distill.cache_teacher: false "
                                   "(or lmbda: 0)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- loading


def default_recipe_path() -> Path:
    return Path(str(resources.files("edgedistill") / "recipes" / DEFAULT_RECIPE))


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in default_recipe_path().parent.glob("*.yaml"))


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load`` only), apply ``key=value`` overrides, validate.

    ``path`` is a file, or the name of a recipe packaged with edgedistill (``smollm2-distill``).
    """
    path = Path(path) if path else default_recipe_path()
    if not path.is_file() and str(path) in packaged_recipes():
        path = default_recipe_path().parent / f"{path}.yaml"
    if not path.is_file():
        raise EdgeDistillError(f"{path}: recipe file not found; pass the path of a .yaml recipe "
                               f"or a packaged recipe's name ({', '.join(packaged_recipes())})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise EdgeDistillError(f"{where}: malformed YAML ({problem}); fix the syntax there")
    except UnicodeDecodeError:
        raise EdgeDistillError(f"{path}: recipe is not UTF-8 text")
    if raw is None:  # an empty or comment-only file: running the demo instead would surprise
        raise EdgeDistillError(f"{path}: the recipe is empty; write its blocks (edgedistill "
                               "settings lists them), or run `edgedistill run` without a recipe "
                               "for the packaged default")
    if not isinstance(raw, dict):
        raise EdgeDistillError(f"{path}: a recipe is a mapping of stage blocks, got {type(raw).__name__}")
    return recipe_from_dict(raw, str(path), overrides)


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``--set stage.field=value``; the value is parsed as YAML (4 -> int, x -> str)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise EdgeDistillError(f"--set {item!r}: expected key=value, e.g. distill.temperature=4")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise EdgeDistillError(f"--set {item!r}: {part!r} is not a block")
    block = Recipe  # an old spelling in the override names the new key: the override wins
    for part in parts[:-1]:
        block = typing.get_type_hints(block).get(part) if dataclasses.is_dataclass(block) else None
    renamed = getattr(block, "RENAMED", {}) if dataclasses.is_dataclass(block) else {}
    if parts[-1] in renamed:
        new = renamed[parts[-1]]
        log.warning("--set %s: %s is the old name of %s; write %s", key, parts[-1], new, new)
        parts[-1] = new
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def _rename_old_keys(cls, raw, source: str, prefix: str) -> None:
    """Rename, in place, the keys a block still reads under an old spelling (its ``RENAMED``),
    with a warning; both spellings at once are refused. Runs on the file's keys before the
    overrides are applied (which rename their own keys), so each setting lands on one key."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in raw:
            log.warning("%s: %s%s is the old name of %s%s; write %s (the old name will stop "
                        "working in a later version)", source, prefix, old, prefix, new, new)
            if new in raw and raw[new] != raw[old]:
                raise EdgeDistillError(f"{source}: {prefix}{old} and {prefix}{new} are the same "
                                       f"setting; keep {new} only")
            raw[new] = raw.pop(old)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _rename_old_keys(hints[f.name], raw.get(f.name), source, f"{prefix}{f.name}.")


def recipe_from_dict(raw: dict, source: str = "recipe",
                     overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe given as a dict, after applying ``key=value`` overrides to it."""
    if raw is None:
        raw = {}
    _rename_old_keys(Recipe, raw, source, "")
    for item in overrides or []:
        apply_override(raw, item)
    version = raw.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise EdgeDistillError(
            f"{source}: version: recipe version {version!r} is not supported; this edgedistill "
            f"reads version {RECIPE_VERSION}")
    recipe = _build(Recipe, raw, source, prefix="")
    try:
        _check_blocks(recipe, "")
    except EdgeDistillError as e:
        raise EdgeDistillError(f"{source}: {e}") from None
    return recipe


def _check_blocks(block, where: str) -> None:
    """Call ``check(where)`` of every block, list entries included, inner blocks first: a rule
    across blocks may rely on each block being valid on its own."""
    for f in dataclasses.fields(block):
        value = getattr(block, f.name)
        entries = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, entry in entries:
            if dataclasses.is_dataclass(entry):
                index = "" if i is None else f"[{i}]"
                _check_blocks(entry, f"{where}{f.name}{index}.")
    if hasattr(block, "check"):
        block.check(where)


def _build(cls, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise EdgeDistillError(f"{source}: {where}: expected a block of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise EdgeDistillError(f"{source}: {prefix}{key}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
        check_field(fields[key], kwargs[key], f"{source}: ", f"{prefix}{key}")
    return cls(**kwargs)


# a number as YAML 1.2 and people write it (1e-4, 5E-5, .5, 3.), not YAML 1.1's stricter form
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp, value: Any, source: str, where: str):
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise EdgeDistillError(
                f"{source}: {where}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise EdgeDistillError(f"{source}: {where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise EdgeDistillError(f"{source}: {where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as text
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise EdgeDistillError(
            f"{source}: {where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def field_help(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting, for ``--help`` output and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        item = (typing.get_args(tp) or [None])[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            rows += field_help(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if f.metadata.get("limits"):
            help_text += f" Must be {limit_text(f.metadata['limits'])}."
        rows.append((prefix + f.name, repr(default), help_text))
        if dataclasses.is_dataclass(item):  # a list of blocks: list what each entry takes
            rows += field_help(item, f"{prefix}{f.name}[].")
    return rows
