"""The teacher's outputs computed ahead of training, and what kind of model a teacher is."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..artifacts import write_atomic
from ..data import tokenize
from ..pooling import DENSE, carried, pool
from ..progress import track
from ..sources import cache_dir
from .teacher_cache import hash_weights

log = logging.getLogger(__name__)

# the column of a training set that holds the teacher's logits for each example
TEACHER_LOGITS = "teacher_logits"
# ... and the one holding a sentence embedder's embedding of each example
TEACHER_EMBEDDING = "teacher_embedding"
# the columns of a tokenized set that an encoder (classifier or embedder) reads
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# bumped when what the cache's files hold changes meaning
_LOGITS_FORMAT = "edgedistill-teacher-logits-v1"
_EMBEDDINGS_FORMAT = "edgedistill-teacher-embeddings-v1"


def logits_cache() -> Path:
    """Where the teacher's logits (and a sentence embedder's embeddings) are kept between
    runs: ``$EDGEDISTILL_LOGITS_CACHE``, else ``teacher-logits`` in the cache
    (``$EDGEDISTILL_CACHE``, ``~/.cache/edgedistill``)."""
    own = os.environ.get("EDGEDISTILL_LOGITS_CACHE")
    return Path(own) if own else cache_dir() / "teacher-logits"


def _fingerprint(teacher, dataset, inputs: list[str], kind: str = _LOGITS_FORMAT) -> str:
    """A sha256 of what the outputs of ``kind`` depend on: the teacher's weights (names,
    dtypes, shapes, bytes) and configuration (a sentence embedder's pooling included), and the
    token ids it reads. The folder it came from is left out, so a teacher copied elsewhere
    still finds its outputs; ~0.5 s for a 110M model. Its Python class is left out too: the
    pipeline builds it from the configuration (a wrapper around the same weights that changes
    the outputs needs its own EDGEDISTILL_LOGITS_CACHE)."""
    h = hashlib.sha256(kind.encode())
    hash_weights(h, teacher)
    config = getattr(teacher, "config", None)
    config = {k: v for k, v in (config.to_dict() if config else {}).items()
              if k != "_name_or_path"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for column in inputs:
        h.update(json.dumps([column, list(dataset[column])]).encode())
    return h.hexdigest()[:24]


def _cached(path: Path, name: str, rows: int) -> torch.Tensor | None:
    """The tensor ``name`` kept in ``path``, or None where there is no whole one of ``rows``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            outputs = f.get_tensor(name)
    except Exception:  # absent, or a file cut short: compute again
        return None
    return outputs if outputs.shape[0] == rows else None


def _keep(path: Path, name: str, outputs: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save({name: outputs}))  # a killed run leaves no file that looks whole
    except OSError as err:  # a full or read-only disk costs the next run the pass, not this one
        log.warning("teacher outputs not kept for later runs (%s); this run goes on", err)


def _teacher_pass(teacher, columns: dict[str, list], collator, batch_size: int, kind: str,
                  name: str, output) -> torch.Tensor:
    """``output(teacher, batch)`` for every row of ``columns`` (token ids as the teacher reads
    them), in row order: read from :func:`logits_cache` where a run kept them under the same
    fingerprint (``kind``), else computed, rows shortest first so a batch pads to texts of
    about its own length, and kept for the next run."""
    fingerprint = _fingerprint(teacher, columns, list(columns), kind)
    # logits files keep the plain name they had before other outputs shared the folder
    path = logits_cache() / (f"{fingerprint}.safetensors" if kind == _LOGITS_FORMAT
                             else f"{name}-{fingerprint}.safetensors")
    rows = len(columns["input_ids"])
    kept = _cached(path, name, rows)
    if kept is not None:
        log.info("teacher %s for %d rows read from %s", name, rows, path)
        return kept
    if not rows:
        return torch.empty(0)
    device = next(teacher.parameters()).device
    order = sorted(range(rows), key=lambda i: len(columns["input_ids"][i]))
    chunks = []
    teacher.eval()
    with torch.inference_mode():
        for start in track(range(0, rows, batch_size), f"teacher {name}"):
            batch = collator([{c: ids[i] for c, ids in columns.items()}
                              for i in order[start:start + batch_size]])
            chunks.append(output(teacher, {k: v.to(device) for k, v in batch.items()})
                          .float().cpu())
    by_length = torch.cat(chunks)
    outputs = torch.empty_like(by_length)
    outputs[torch.tensor(order)] = by_length
    _keep(path, name, outputs)
    return outputs


def add_teacher_logits(dataset, teacher, collator, batch_size: int = 64):
    """Return ``dataset`` with a ``teacher_logits`` column, computed once.

    The teacher is frozen and in eval mode, so its logits for an example are the same in every
    epoch; computing them once instead of in every training step cut the default recipe's
    distillation from 228 s to 160 s (the teacher's forward pass is most of a 2-layer
    student's step). Feature losses still need the live teacher's hidden states.

    They are also the same in the next run with the same teacher and rows (another student,
    other losses, a transfer set added, a repeated run): they are kept in :func:`logits_cache`
    under a fingerprint of the teacher's weights and the token ids, so an MPNet teacher labels
    8,000 tweets once (~7 min on 2 cores) rather than once per student.
    """
    plain = dataset.with_format(None)  # lists of ints, whatever format the caller set
    columns = {c: plain[c] for c in _INPUTS if c in dataset.column_names}
    logits = _teacher_pass(teacher, columns, collator, batch_size, _LOGITS_FORMAT, "logits",
                           lambda model, batch: model(**batch).logits)
    return dataset.add_column(TEACHER_LOGITS, logits.tolist())


def with_teacher_logits(tokenized, texts, teacher, tokenizer, teacher_tokenizer=None,
                        max_length: int = 128, batch_size: int = 64):
    """``tokenized`` (rows as the student reads them) with the teacher's logits for each row.

    A student with a tokenizer of its own (``teacher_tokenizer`` is then the teacher's) gets
    the logits the teacher gives the same ``texts`` (a Dataset with ``text`` and ``label``, in
    the order of ``tokenized``) read the teacher's way: a classifier's target is one per
    example, so the two readings need not line up token by token.
    """
    from transformers import DataCollatorWithPadding

    if teacher_tokenizer is None:
        return add_teacher_logits(tokenized, teacher, DataCollatorWithPadding(tokenizer),
                                  batch_size)
    scored = add_teacher_logits(tokenize(texts, teacher_tokenizer, max_length), teacher,
                                DataCollatorWithPadding(teacher_tokenizer), batch_size)
    return tokenized.add_column(TEACHER_LOGITS, scored[TEACHER_LOGITS])


def teacher_embeddings(teacher, tokenizer, texts: list[str], max_length: int = 128,
                       batch_size: int = 64) -> list[list[float]]:
    """The sentence embedder ``teacher``'s embedding of each text (its pooling carried in its
    config), computed once: the teacher is frozen, so the targets are the same every epoch.

    Kept between runs beside the logits, by the same rule (:func:`add_teacher_logits`): the
    same teacher over the same texts serves another student, another loss or a rerun without
    its pass (about 4 minutes for all-mpnet-base-v2 over 6,000 tweets on 2 cores)."""
    from transformers import DataCollatorWithPadding

    pooling = carried(teacher.config)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    columns = {c: encoded[c] for c in _INPUTS if c in encoded}

    def embed(model, batch):
        return pool(model(**batch).last_hidden_state, batch["attention_mask"], pooling,
                    getattr(model, DENSE, None))

    return _teacher_pass(teacher, columns, DataCollatorWithPadding(tokenizer), batch_size,
                         _EMBEDDINGS_FORMAT, "embeddings", embed).tolist()


def is_causal_lm(model) -> bool:
    """Whether ``model`` (possibly wrapped by DDP) is a transformers causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = getattr(model, "module", model)
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
