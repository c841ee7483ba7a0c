"""The transfer set: extra training inputs that only the teacher labels.

Distillation pays off when the teacher labels far more inputs than people did: DistilBERT was
distilled on a large unlabelled corpus, TinyBERT augmented its task data about 20x. This module
builds those inputs for a text classifier and labels them with the teacher's soft targets:

- variants of the training texts (word edits, LLM paraphrases: edgedistill.distill.augmentation);
- :func:`load_unlabelled`: text from files, a ``save_to_disk`` folder or a column of the
  training data, with every evaluation / test text removed;
- :func:`build_transfer_set`: both, tokenized like the training split and carrying the
  teacher's logits (computed once by :func:`~edgedistill.distill.trainer.add_teacher_logits`),
  plus a record for the report (size, source mix, augmentation methods, teacher seconds);
- :func:`join_transfer`: the training split and the transfer set as one training set.

Transfer rows have no gold label: their ``labels`` are ``IGNORE_INDEX`` (-100), the
``ignore_index`` of ``F.cross_entropy``, so the trainer's hard-label loss skips them and only the
distillation loss (and any feature losses, from the live teacher) learns from them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

from ..data import tokenize
from ..errors import EdgeDistillError
from ..packaged_data import PACKAGED_DATASETS, packaged_dataset_files, text_cleaner
from ..sources import resolve_model
from .augmentation import (
    DEFAULT_METHODS,
    Variant,
    augment,
    check_augment_settings,
    load_wordnet,
    normalise,
)
from .teacher_generations import check_generation_settings
from .teacher_outputs import is_causal_lm, with_teacher_logits

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: rows the hard-label loss skips
_LOADERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".txt": "text"}
def check_transfer_settings(cfg, max_length: int) -> None:
    """Refuse a recipe's ``transfer`` block (a ``recipe_blocks.TransferConfig``) before any training
    when it cannot work: one line naming the setting and the fix. Ranges are the recipe
    fields' limits, checked when the recipe was read; what only one task takes (augmentation,
    teacher generations) its task's preflight checks."""
    aug, gen = cfg.augment, cfg.generate
    methods = check_augment_settings(aug.factor, aug.methods, "transfer.augment.")
    for i, u in enumerate(cfg.unlabelled):
        if u.source in PACKAGED_DATASETS:
            packaged_dataset_files(u.source)  # one line when its package is not installed
        elif u.source != "train" and not Path(u.source).expanduser().exists():
            raise EdgeDistillError(f"transfer.unlabelled[{i}].source: {u.source or '(empty)'}: no "
                                   "such file or folder; give a text file, a data file, a "
                                   "save_to_disk folder, a packaged data set or 'train'")
    if "substitute" in methods and aug.factor:
        load_wordnet()
    if aug.paraphrases:
        resolve_model(aug.paraphraser)  # one line when it is neither local nor packaged
    if gen.prompts:
        check_generation_settings(gen.prompts, gen.prompt_tokens, gen.new_tokens,
                                  gen.temperature, gen.top_p, max_length, cfg.batch_size)


# --------------------------------------------------------------------------- unlabelled text

def _spec(spec) -> dict:
    if isinstance(spec, (str, Path)):
        spec = {"source": str(spec)}
    spec = dict(spec)
    unknown = set(spec) - {"source", "column", "split", "max_samples", "seed"}
    if unknown or "source" not in spec:
        raise EdgeDistillError(f"unlabelled: {spec}: give source (a file, a save_to_disk folder, "
                               "or 'train') and optionally column, split, max_samples, seed"
                               + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    return spec


def _read(source: str, column: str, split: str, train) -> tuple[Dataset, str]:
    """The rows of an unlabelled source and the column holding its text."""
    if source == "train":
        if train is None:
            raise EdgeDistillError("unlabelled.source: 'train' needs the training data")
        return (train if isinstance(train, Dataset) else Dataset.from_dict(dict(train))), column
    if isinstance(source, str) and source in PACKAGED_DATASETS:  # movie-dialogs, say
        if PACKAGED_DATASETS[source].text_column is None:
            texts = [name for name, entry in PACKAGED_DATASETS.items() if entry.text_column]
            raise EdgeDistillError(f"unlabelled.source: {source} holds tagged words, not texts; "
                                   f"use one of {', '.join(texts)} or a file of texts")
        files = packaged_dataset_files(source)
        if split not in files:
            raise EdgeDistillError(f"unlabelled.split: {source} has no split '{split}' "
                                   f"(has: {', '.join(files)})")
        # its converted files' own column: the user never sees their names
        source, column = str(files[split]), PACKAGED_DATASETS[source].text_column
    paths = [Path(p).expanduser() for p in (source if isinstance(source, list) else [source])]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise EdgeDistillError(f"unlabelled.source: {', '.join(missing)}: no such file or folder")
    if len(paths) == 1 and paths[0].is_dir():
        ds = load_from_disk(str(paths[0]))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise EdgeDistillError(f"unlabelled.split: {source} has no split '{split}' "
                                       f"(has: {', '.join(ds)})")
            ds = ds[split]
        return ds, column
    suffixes = {p.suffix.lower() for p in paths}
    kind = _LOADERS.get(suffixes.pop()) if len(suffixes) == 1 else None
    if kind is None:
        raise EdgeDistillError(f"unlabelled.source: {source}: use files of one type among "
                               f"{', '.join(_LOADERS)} or a save_to_disk folder")
    kw = {"delimiter": "\t"} if paths[0].suffix.lower() == ".tsv" else {}
    try:
        ds = load_dataset(kind, data_files=[str(p) for p in paths], split="train", **kw)
    except Exception as e:  # an empty or malformed file
        raise EdgeDistillError(f"unlabelled.source: {source}: could not load ({type(e).__name__}:"
                               f" {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return ds, "text" if kind == "text" else column  # a .txt file is one text per line


def load_unlabelled(spec, train=None, exclude: Sequence[str] = (), max_samples: int | None = None,
                    seed: int = 0) -> list[str]:
    """Texts from ``spec``, with evaluation text and duplicates removed.

    ``spec`` is a path or a mapping ``{source, column='text', split='train', max_samples, seed}``;
    ``source`` is a .txt file (one text per line), a csv / tsv / json / jsonl / parquet file
    (or a list of them) read with ``datasets``, a ``save_to_disk`` folder, or ``'train'``: a
    column of ``train`` (the training split as loaded, a Dataset or a dict of columns).
    A text whose whitespace-normalised form is in ``exclude`` (pass the validation and test
    texts) is dropped, so evaluation text never enters training; so are empty texts and
    repeats. Then, if more than ``max_samples`` are left, a ``seed``-ed random sample is kept.
    """
    spec = _spec(spec)
    max_samples, seed = spec.get("max_samples", max_samples), spec.get("seed", seed)
    if max_samples is not None and max_samples < 1:
        raise EdgeDistillError(f"unlabelled.max_samples: {max_samples} must be >= 1")
    source = spec["source"]
    ds, column = _read(source, spec.get("column", "text"), spec.get("split", "train"), train)
    if column not in ds.column_names:
        raise EdgeDistillError(f"unlabelled.column: '{column}' is not a column of {source} "
                               f"(columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise EdgeDistillError(f"unlabelled.source: {source} has no rows")
    banned = {normalise(t) for t in exclude}
    # cleaned as the same set's labelled rows are, so its evaluation texts are recognised
    clean = text_cleaner(source)
    kept, seen, overlap = [], set(), 0
    for i, text in enumerate(ds[column]):
        if text is None:
            continue
        if not isinstance(text, str):
            raise EdgeDistillError(f"unlabelled.column: '{column}' of {source}, row {i}: "
                                   f"expected text, got {type(text).__name__}")
        text = clean(text) if clean else text
        key = normalise(text)
        overlap += key in banned
        if key and key not in banned and key not in seen:
            seen.add(key)
            kept.append(text.strip())
    if max_samples is not None and len(kept) > max_samples:
        kept = Dataset.from_dict({"text": kept}).shuffle(seed=seed).select(
            range(max_samples))["text"]
    log.info("unlabelled %s: %d of %d rows kept (%d evaluation or labelled texts left out)",
             source, len(kept), len(ds), overlap)
    return list(kept)


# --------------------------------------------------------------------------- transfer set

def _teacher(teacher_dir_or_model):
    if not isinstance(teacher_dir_or_model, (str, Path)):
        return teacher_dir_or_model.eval()
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir_or_model)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def build_transfer_set(texts: Sequence[str], teacher_dir_or_model, tokenizer, *,
                       factor: int = 0, methods: Sequence[str] = DEFAULT_METHODS,
                       seed: int = 0,
                       unlabelled: Mapping[str, Sequence[str]] | Sequence[str] = (),
                       exclude: Sequence[str] = (), max_length: int = 128,
                       batch_size: int = 64, logits: bool = True,
                       synonyms: Callable[[str], Sequence[str]] | None = None,
                       paraphrased: Sequence[Variant] = (),
                       teacher_tokenizer=None) -> tuple[Dataset, dict]:
    """Augmented variants of the training ``texts`` plus ``unlabelled`` texts (a list, or a
    mapping of source name to list for the report's source mix), labelled by the teacher.

    Rows are tokenized as the training split is (:func:`edgedistill.data.tokenize`, truncated
    to ``max_length``) and carry ``labels = IGNORE_INDEX`` and, with ``logits``, the teacher's
    ``teacher_logits`` from :func:`~edgedistill.distill.trainer.add_teacher_logits` (the same
    column the training split gets, so :func:`join_transfer` can stack them). With feature
    losses (``distill.matches``) the trainer runs the live teacher on every batch anyway,
    hidden states included, so ``logits=False`` saves the pass. ``transfer_source`` and
    ``transfer_method`` say where each row came from (dropped by :func:`join_transfer`).
    Rows equal (after whitespace normalisation) to a training text, to an ``exclude`` text
    (validation / test) or to an earlier row are dropped. A student with its own tokenizer
    passes the teacher's as ``teacher_tokenizer``: the teacher labels the texts read its way.

    Returns the Dataset and a record: ``size``, ``sources`` (rows per source), ``methods``
    (augmented rows per method), ``skipped_variants``, ``dropped``, ``teacher_seconds``.
    """
    teacher = _teacher(teacher_dir_or_model)
    if is_causal_lm(teacher):
        raise EdgeDistillError("transfer: a language model needs no transfer set: every token "
                               "of its training text is already teacher-labelled; add the "
                               "unlabelled text to its training data instead")
    # masked words are written as the teacher reads a mask: its label of the variant counts
    mask = (teacher_tokenizer or tokenizer).mask_token
    variants = augment(texts, factor, seed, methods, mask, synonyms)
    skipped = factor * sum(1 for t in texts if t.split()) - len(variants)
    variants += list(paraphrased)  # written beforehand by paraphrase()
    if not isinstance(unlabelled, Mapping):
        unlabelled = {"unlabelled": unlabelled}
    rows = [("augmented", v.method, v.text) for v in variants]
    rows += [(f"unlabelled:{name}", "", t) for name, group in unlabelled.items() for t in group]
    kept, dropped = new_rows(rows, texts, exclude)
    sources, methods_used, text_col = (list(c) for c in zip(*kept)) if kept else ([], [], [])
    texts_ds = Dataset.from_dict({"text": text_col, "label": [IGNORE_INDEX] * len(kept)})
    ds = tokenize(texts_ds, tokenizer, max_length)
    seconds = 0.0
    if logits and len(ds):
        start = time.perf_counter()
        ds = with_teacher_logits(ds, texts_ds, teacher, tokenizer, teacher_tokenizer,
                                 max_length, batch_size)
        seconds = time.perf_counter() - start
    ds = ds.add_column("transfer_source", sources).add_column("transfer_method", methods_used)
    record = {"size": len(ds), "sources": dict(Counter(sources)),
              "methods": dict(Counter(m for m in methods_used if m)),
              "factor": factor, "seed": seed,
              "skipped_variants": skipped,
              "dropped": dict(dropped), "teacher_seconds": round(seconds, 3)}
    return ds, record


def new_rows(rows: Sequence[tuple], texts: Sequence[str],
             exclude: Sequence[str]) -> tuple[list[tuple], Counter]:
    """``rows`` (tuples whose last item is a text) without those equal, after whitespace
    normalisation, to an ``exclude`` text (validation / test), to a training ``texts`` or to
    an earlier row, or empty; and how many were dropped for each reason."""
    banned = {normalise(t) for t in exclude}
    seen, kept = {normalise(t) for t in texts}, []
    dropped = Counter()
    for row in rows:
        key = normalise(row[-1])
        if key in banned:
            dropped["evaluation"] += 1
        elif not key or key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, dropped


def join_transfer(train: Dataset, transfer: Dataset) -> Dataset:
    """The tokenized training split followed by the transfer rows, with the training split's
    columns (a ``teacher_logits`` column only where the training split has one)."""
    extra = transfer.remove_columns([c for c in transfer.column_names
                                     if c not in train.column_names])
    missing = sorted(set(train.column_names) - set(extra.column_names))
    if missing:
        raise EdgeDistillError(f"transfer: the transfer set lacks the training columns "
                               f"{', '.join(missing)}; build it with the same tokenizer and "
                               "teacher-logits setting")
    if isinstance(train.features.get("labels"), ClassLabel):
        # a ClassLabel column is meant for valid class ids; -100 is not one
        train = train.cast_column("labels", Value("int64"))
    return concatenate_datasets([train, extra.cast(train.features)])
