"""Teacher generations for sequence-level distillation of decoder LLMs, cached on disk.

Token-level KD shows the student the teacher's distribution on *human* text. Sequence-level KD
(Kim & Rush 2016, "Sequence-Level Knowledge Distillation") also trains the student on the
teacher's *own* outputs: prompts cut from the training texts are continued by the teacher, and
the continuations become training rows. A small model then learns the sequences the teacher
actually produces (its mode), which usually suits it better than the full spread of human text.

Generalized KD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes") goes one step further: in a share ``lmbda`` of the batches the
*student* continues the prompts and the live teacher scores its continuation, so the student
also learns to recover from its own mistakes. The rows built here carry ``prompt_length`` so
that :class:`~edgedistill.distill.trainer.DistillationTrainer` can do that (``lmbda``).

Each row has the columns of :func:`edgedistill.data.lm_blocks` (``input_ids``,
``attention_mask``, ``labels``, all ``block_size`` long) plus ``prompt_length``: the prompt,
the continuation up to and including the first end-of-text token, then right padding.
``labels`` are -100 on the prompt and on the padding: the loss is on the continuation (the
prompt text is already in the ordinary training blocks).

With ``cache_dir``, the rows are stored as ``generations-<fingerprint>.safetensors`` (no
pickle); the fingerprint covers the teacher's weights, the tokenizer, the prompts and every
generation setting, and a rerun with the same inputs loads the file instead of running the
teacher. The file is written under a ``.part`` name and renamed into place, so a killed run
never leaves a half-written one.

Recipe block::

    transfer: {generate: {prompts: 2000, prompt_tokens: 32, new_tokens: 96, temperature: 1.0}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Sequence

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig

from ..errors import EdgeDistillError
from ..progress import track
from .teacher_cache import hash_tensor, hash_tokenizer, hash_weights

log = logging.getLogger(__name__)

PROMPT_LENGTH = "prompt_length"
FORMAT = "edgedistill-generations-v1"
_WHERE = "transfer.generate"


# ------------------------------------------------------------------------------ shared parts

def eos_ids(model, tokenizer=None) -> set[int]:
    """Every token id that ends a generation (a model may list several, e.g. Llama 3)."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def pad_id(model, tokenizer=None) -> int:
    """The id right padding uses: the tokenizer's pad token, else the model's, else EOS."""
    for value in (getattr(tokenizer, "pad_token_id", None),
                  getattr(getattr(model, "generation_config", None), "pad_token_id", None),
                  getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    eos = sorted(eos_ids(model, tokenizer))
    if not eos:
        raise EdgeDistillError(f"{type(model).__name__}: no pad and no end-of-text token id; "
                               "set tokenizer.pad_token or tokenizer.eos_token")
    return eos[0]


def sampling_config(new_tokens: int, temperature: float, top_p: float, pad: int,
                    eos: set[int]) -> GenerationConfig:
    """A generation config with these settings and nothing else.

    Passed with ``use_model_defaults=False``: a hub model's own generation defaults (top_k,
    repetition penalty, ...) would otherwise reshape the distribution being distilled.
    ``top_k=0`` leaves only temperature and top-p, as in GKD.
    """
    sample = temperature > 0
    extra = dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}
    return GenerationConfig(do_sample=sample, max_new_tokens=new_tokens, pad_token_id=pad,
                            eos_token_id=sorted(eos) or None, **extra)


def pack_row(prompt: list[int], generated: list[int], length: int, pad: int,
             eos: set[int]) -> dict:
    """One training row: prompt + continuation (cut after its first EOS), right-padded.

    ``generate`` pads sequences that finished early; what follows the first EOS is not text.
    """
    cont = list(generated)
    for i, token in enumerate(cont):
        if token in eos:
            cont = cont[:i + 1]
            break
    ids = (list(prompt) + cont)[:length]
    real, n_prompt = len(ids), len(prompt)
    padding = length - real
    return {"input_ids": ids + [pad] * padding,
            "attention_mask": [1] * real + [0] * padding,
            "labels": [-100] * n_prompt + ids[n_prompt:] + [-100] * padding,
            PROMPT_LENGTH: n_prompt}


def with_generations(blocks: datasets.Dataset, generated: datasets.Dataset) -> datasets.Dataset:
    """``blocks`` (from lm_blocks, ``prompt_length`` 0) followed by the ``generated`` rows, in
    one data set (the order a teacher cache built over it must follow)."""
    if PROMPT_LENGTH not in blocks.column_names:
        blocks = blocks.add_column(PROMPT_LENGTH, [0] * len(blocks))
    return datasets.concatenate_datasets([blocks, generated.cast(blocks.features)])


# -------------------------------------------------------------------------------- the work

def check_generation_settings(prompts, prompt_tokens, new_tokens, temperature, top_p,
                              block_size, batch_size) -> None:
    for name, value in (("prompts", prompts), ("prompt_tokens", prompt_tokens),
                        ("new_tokens", new_tokens), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            where = "transfer.batch_size" if name == "batch_size" else f"{_WHERE}.{name}"
            raise EdgeDistillError(f"{where}: {value!r}; use an integer >= 1")
    if not temperature >= 0:
        raise EdgeDistillError(f"{_WHERE}.temperature: {temperature!r}; use a number >= 0 "
                               "(0: greedy)")
    if not 0 < top_p <= 1:
        raise EdgeDistillError(f"{_WHERE}.top_p: {top_p!r}; use 0 < top_p <= 1 (1: off)")
    if prompt_tokens + new_tokens > block_size:
        raise EdgeDistillError(
            f"{_WHERE}.prompt_tokens + new_tokens = {prompt_tokens} + {new_tokens} exceeds "
            f"data.max_length = {block_size}: a generated row must fit one training block; "
            "lower them or raise data.max_length")


def _choose_prompts(tokenizer, texts, prompts, prompt_tokens, seed) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    # one token more than the prompt, so every prompt is the beginning of a longer text
    eligible = [i for i, row in enumerate(ids) if len(row) > prompt_tokens]
    if not eligible:
        raise EdgeDistillError(
            f"{_WHERE}.prompts: none of the {len(texts)} training texts has more than "
            f"{_WHERE}.prompt_tokens = {prompt_tokens} tokens, so no prompt can be cut; "
            "lower prompt_tokens or use longer texts")
    chosen = sorted(random.Random(seed).sample(eligible, min(prompts, len(eligible))))
    if len(chosen) < prompts:
        log.warning("%s.prompts: %d requested but only %d training texts have more than %d "
                    "tokens; generating %d", _WHERE, prompts, len(eligible), prompt_tokens,
                    len(chosen))
    return [ids[i][:prompt_tokens] for i in chosen]


def _fingerprint(teacher, tokenizer, prompt_ids: torch.Tensor, settings: dict) -> str:
    """16 hex digits of sha256 over the teacher's weights (as the teacher cache hashes them),
    the tokenizer's vocabulary and special tokens, the prompts and the settings."""
    h = hashlib.sha256(FORMAT.encode())
    hash_weights(h, teacher)
    hash_tokenizer(h, tokenizer, type(tokenizer).__name__)
    hash_tensor(h, prompt_ids)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch ``batch`` of a seeded generation: stable across runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch}".encode()).digest()[:8], "big") >> 1


def _generate(teacher, prompt_ids: torch.Tensor, config: GenerationConfig, seed: int,
              batch_size: int) -> list[list[int]]:
    """The continuations (token ids after the prompt, as generate returns them)."""
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out: list[list[int]] = []
    starts = range(0, len(prompt_ids), batch_size)
    # fork_rng: seeding here must not change the random stream of the training that follows
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for b, start in enumerate(track(starts, "teacher generations")):
                ids = prompt_ids[start:start + batch_size].to(device)
                torch.manual_seed(batch_seed(seed, b))
                seq = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       generation_config=config, use_model_defaults=False)
                out += seq[:, ids.shape[1]:].cpu().tolist()
    finally:
        teacher.train(was_training)
    return out


def _load(path: Path, fingerprint: str) -> tuple[dict, dict] | None:
    """The cached rows and record, or None when ``path`` is missing, damaged or not ours."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                raise ValueError("fingerprint differs")
            columns = {k: f.get_tensor(k).tolist() for k in
                       ("input_ids", "attention_mask", "labels", PROMPT_LENGTH)}
        record = json.loads(meta["record"])
        if len({len(v) for v in columns.values()} | {record["sequences"]}) != 1:
            raise ValueError("row counts differ")
        return columns, record
    except Exception as e:  # unreadable, truncated or foreign: make it again
        log.warning("ignoring damaged generations cache %s (%s); generating again", path,
                    " ".join(str(e).split()))
        return None


def _save(path: Path, columns: dict, record: dict, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file({k: torch.tensor(v, dtype=torch.int64) for k, v in columns.items()}, str(tmp),
              metadata={"format": FORMAT, "fingerprint": fingerprint,
                        "record": json.dumps(record)})
    os.replace(tmp, path)


def teacher_generations(teacher, tokenizer, texts: Sequence[str], *, prompts: int,
                        prompt_tokens: int, new_tokens: int, temperature: float = 1.0,
                        top_p: float = 1.0, seed: int = 0, block_size: int,
                        batch_size: int = 16, cache_dir: Path | None = None
                        ) -> tuple[datasets.Dataset, dict]:
    """The teacher's continuations of ``prompts`` prompts cut from ``texts``, as training rows.

    A seeded sample of the texts with more than ``prompt_tokens`` tokens (no special tokens
    added, as in ``lm_blocks``) gives the prompts: their first ``prompt_tokens`` ids, so all
    prompts have one length and need no padding. The teacher (eval mode, no gradients, on its
    own device) continues them ``batch_size`` at a time with ``transformers``' ``generate``:
    sampling at ``temperature`` with nucleus ``top_p`` (temperature 0: greedy), at most
    ``new_tokens`` tokens, each batch seeded from ``seed`` and its index (reproducible).

    Returns the rows (see the module docstring) and a record: ``sequences`` (rows made),
    ``requested``, ``prompt_tokens``, ``new_tokens``, ``generated_tokens`` (continuation tokens
    in all rows), ``mean_continuation_tokens``, ``temperature``, ``top_p``, ``seed``,
    ``teacher_seconds`` and ``cached``. On a cache hit the teacher does not run:
    ``cached`` is True and ``teacher_seconds`` is 0.0 (the time *this* call spent in the
    teacher), the rest as when the rows were made.
    """
    check_generation_settings(prompts, prompt_tokens, new_tokens, temperature, top_p,
                              block_size, batch_size)
    prompt_ids = torch.tensor(_choose_prompts(tokenizer, texts, prompts, prompt_tokens, seed),
                              dtype=torch.int64)
    pad, eos = pad_id(teacher, tokenizer), eos_ids(teacher, tokenizer)
    settings = {"prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
                "block_size": block_size, "pad": pad, "eos": sorted(eos),
                # sampled ids depend on how prompts are batched (one seed per batch)
                "batch_size": batch_size}

    path = fingerprint = None
    if cache_dir is not None:
        fingerprint = _fingerprint(teacher, tokenizer, prompt_ids, settings)
        path = Path(cache_dir) / f"generations-{fingerprint}.safetensors"
        hit = _load(path, fingerprint)
        if hit is not None:
            columns, record = hit
            log.info("teacher generations: %d rows from %s", record["sequences"], path)
            return datasets.Dataset.from_dict(columns), {**record, "teacher_seconds": 0.0,
                                                         "cached": True}

    config = sampling_config(new_tokens, temperature, top_p, pad, eos)
    started = time.perf_counter()
    continuations = _generate(teacher, prompt_ids, config, seed, batch_size)
    seconds = time.perf_counter() - started
    rows = [pack_row(p, c, block_size, pad, eos) for p, c in zip(prompt_ids.tolist(),
                                                                 continuations)]
    columns = {k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels",
                                                 PROMPT_LENGTH)}
    generated = sum(sum(m) for m in columns["attention_mask"]) - prompt_tokens * len(rows)
    record = {"sequences": len(rows), "requested": prompts, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "generated_tokens": generated,
              "mean_continuation_tokens": round(generated / len(rows), 2),
              "temperature": float(temperature), "top_p": float(top_p), "seed": seed,
              "teacher_seconds": round(seconds, 3), "cached": False}
    if path is not None:
        _save(path, columns, record, fingerprint)
    return datasets.Dataset.from_dict(columns), record


__all__ = ["PROMPT_LENGTH", "pack_row", "sampling_config", "teacher_generations",
           "with_generations"]
