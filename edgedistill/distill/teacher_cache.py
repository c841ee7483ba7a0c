"""Offline teacher cache: the teacher's top-k log-probabilities per token, computed once.

Distilling a causal LM token by token needs the teacher's distribution at every position of
every training block. Running the teacher once and storing its top-k (at T = 1 a trained LM
usually puts most of its mass on a few dozen tokens) costs 6 bytes per token per k (float16
log-prob + int32 id) and removes the teacher from the training loop;
:func:`~edgedistill.distill.token_kd.sparse_token_kd` then trains on the coarsened ``k + 1``-bin
distributions. Plain top-k renormalised over the k tokens is a biased target (Anshumann et al.
2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"); here a tail bin
keeps the missing mass instead.

Layout of ``folder``::

    shard-00000.safetensors   rows [0, shard_rows): logprobs float16 (n, L, k), indices int32
    shard-00001.safetensors   ...                   (safetensors: no pickle)
    meta.json                 written last, once every shard exists

Each shard carries the cache's fingerprint (:func:`cache_fingerprint`) in its safetensors
header, so a shard made from another teacher, tokenizer, data, length, k or temperature is
recognised and recomputed, even one left by a killed run. Shards are written to a ``.tmp``
name and renamed into place (atomic), so a killed run leaves whole shards only, and a rerun
resumes from them.

Recipe block::

    distill: {distill_loss: forward_kl, temperature: 1.0, cache_teacher: true, cache_top_k: 64}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..errors import EdgeDistillError
from ..progress import Bar
from .token_kd import teacher_topk

TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_INDICES = "teacher_topk_indices"
META = "meta.json"
FORMAT = "edgedistill-teacher-cache-v1"
_ROW_KEYS = ("input_ids", "attention_mask", "labels")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# ------------------------------------------------------------------------------ fingerprint

def hash_tensor(h, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.device.type == "meta":
        raise EdgeDistillError("teacher cache: the teacher has weights on the meta device "
                               "(offloaded?); load it fully before caching")
    t = t.to("cpu").contiguous().reshape(-1)
    h.update(f"{t.dtype}:{tuple(tensor.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy().data)


def hash_weights(h, model: torch.nn.Module) -> None:
    """Feed ``model``'s weights to the hash ``h``: ``state_dict`` in name order (names,
    dtypes, shapes, bytes)."""
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        hash_tensor(h, tensor)


def hash_tokenizer(h, tokenizer, *before) -> None:
    """Feed ``tokenizer``'s vocabulary (sorted ``get_vocab()`` items) and special tokens to the
    hash ``h``, after the JSON-able values ``before``."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    h.update(json.dumps([*before, vocab, special], ensure_ascii=False).encode())


def cache_fingerprint(teacher: torch.nn.Module, tokenizer, input_ids: torch.Tensor,
                      max_length: int, top_k: int, temperature: float,
                      attention_mask: torch.Tensor | None = None) -> str:
    """A 16-hex-digit sha256 of everything a cache depends on.

    Hashes the teacher's weights (``state_dict`` in name order: names, dtypes, shapes, bytes),
    the tokenizer's vocabulary (sorted ``get_vocab()`` items) and special tokens (``None``
    skips the tokenizer), the input ids (and attention mask, if given), ``max_length``,
    ``top_k`` and ``temperature``. Hashing reads every weight once (~1 GB/s: seconds for a 1B
    model).
    """
    h = hashlib.sha256(FORMAT.encode())
    hash_weights(h, teacher)
    if tokenizer is not None:
        hash_tokenizer(h, tokenizer)
    hash_tensor(h, input_ids.to(torch.int64))
    if attention_mask is not None:
        hash_tensor(h, attention_mask.to(torch.int64))
    h.update(json.dumps({"max_length": int(max_length), "top_k": int(top_k),
                         "temperature": float(temperature)}, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ build

def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:  # another rank got there first
        pass


def _shard_ok(path: Path, fingerprint: str, shape: tuple[int, int, int]) -> bool:
    """Whether ``path`` is a whole shard of this cache (right fingerprint and shapes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return False
            return all(tuple(f.get_slice(key).get_shape()) == shape
                       for key in ("logprobs", "indices"))
    except Exception:  # unreadable or truncated: not a shard of ours
        return False


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def _write_atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    try:
        os.replace(tmp, path)
    except FileNotFoundError:  # rank 0 cleaned it as a leftover; rank 0 writes meta.json then
        pass


def decoder_of(teacher: torch.nn.Module) -> torch.nn.Module:
    """The module whose output's ``last_hidden_state`` feeds the output head."""
    decoder = teacher.get_decoder() if hasattr(teacher, "get_decoder") else None
    if decoder is None or decoder is teacher:  # generic get_decoder falls back to the LM itself
        decoder = getattr(teacher, "base_model", None)
    if decoder is None or decoder is teacher:
        raise EdgeDistillError(
            f"teacher cache: cannot find the base model of {type(teacher).__name__}; "
            "pass a Hugging Face causal LM (e.g. AutoModelForCausalLM)")
    return decoder


def _check_head(teacher, decoder, head, input_ids, attention_mask) -> None:
    """Check on one row that ``head(last_hidden_state)`` gives the model's own logits.

    Some models post-process their logits (Gemma 2's soft-capping, Granite's or Cohere's
    scaling); a cache of the plain head's output would then silently be another distribution.
    """
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     use_cache=False).last_hidden_state
    ours = head(hidden).float()
    theirs = teacher(input_ids=input_ids, attention_mask=attention_mask,
                     use_cache=False).logits.float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
        raise EdgeDistillError(
            f"teacher cache: {type(teacher).__name__}'s logits are not its output embeddings "
            "applied to its last hidden state (it soft-caps or rescales them); token-level "
            "caching does not support this model yet, use another teacher")


def build_teacher_cache(teacher: torch.nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None, folder: str | Path,
                        top_k: int = 64, temperature: float = 1.0, fingerprint: str | None = None,
                        batch_size: int = 8, shard_rows: int = 256, rank: int = 0,
                        world_size: int = 1, progress: bool = True,
                        chunk_tokens: int = 256) -> Path:
    """Run the teacher over ``input_ids`` (N, L) once and store its top-k per token.

    Writes ``folder/shard-XXXXX.safetensors`` (rows ``[i * shard_rows, (i + 1) * shard_rows)``:
    ``logprobs`` float16 and ``indices`` int32, (rows, L, top_k)) and then ``meta.json``. Pass
    the ``fingerprint`` of :func:`cache_fingerprint` (``None`` computes one without the
    tokenizer); shards with another fingerprint (and a stale ``meta.json``) are removed and
    recomputed, whole shards with this one are kept (resume), leftover ``.tmp`` files removed.

    Distributed: rank ``r`` of ``world_size`` computes (and cleans) the shards ``i`` with
    ``i % world_size == r``, so the ranks never touch the same file. Whichever rank finds every
    shard present when it finishes writes ``meta.json`` (atomically, so two ranks writing it
    is harmless); after a barrier, every rank can :func:`load_teacher_cache`. If ranks finish
    at once and none saw the others' shards, calling this again on rank 0 after the barrier
    computes nothing and writes ``meta.json``.

    The teacher runs under ``inference_mode`` in eval mode on its own device: its base model
    (``get_decoder()`` or ``base_model``) gives the last hidden states, its
    ``get_output_embeddings()`` the logits (checked once against the full model's logits).
    Returns ``folder``.
    """
    folder = Path(folder)
    where = f"teacher cache {folder}"
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
            and not input_ids.is_floating_point()):
        raise EdgeDistillError(f"{where}: input_ids must be an integer tensor (rows, length), got "
                               f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise EdgeDistillError(
            f"{where}: attention_mask {tuple(attention_mask.shape)} and input_ids "
            f"{tuple(input_ids.shape)} differ; pass one mask per token")
    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("shard_rows", shard_rows),
                        ("world_size", world_size), ("chunk_tokens", chunk_tokens)):
        if not (isinstance(value, int) and value >= 1):
            raise EdgeDistillError(f"{where}: {name} = {value!r}; use an integer >= 1")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise EdgeDistillError(f"{where}: rank = {rank!r} with world_size = {world_size}; "
                               f"use 0 <= rank < world_size")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise EdgeDistillError(f"{where}: temperature = {temperature!r}; use a number > 0")
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is None:
        raise EdgeDistillError(f"{where}: {type(teacher).__name__} has no output embeddings; "
                               "pass a causal LM (e.g. AutoModelForCausalLM)")
    vocab = getattr(head, "out_features", None)
    if vocab is not None and top_k > vocab:
        raise EdgeDistillError(f"{where}: top_k = {top_k} exceeds the teacher's vocabulary "
                               f"({vocab}); use top_k <= {vocab}")

    rows, length = input_ids.shape
    fingerprint = fingerprint or cache_fingerprint(teacher, None, input_ids, length, top_k,
                                                   temperature, attention_mask)
    n_shards = math.ceil(rows / shard_rows)
    folder.mkdir(parents=True, exist_ok=True)

    def shape_of(i: int) -> tuple[int, int, int]:
        return (min(shard_rows, rows - i * shard_rows), length, top_k)

    meta = _read_meta(folder)
    if meta is not None and meta.get("fingerprint") != fingerprint:
        _remove(folder / META)   # stale; a new one is written once all shards exist
    # this rank's shards: clean leftovers, keep the whole ones of this cache
    todo = []
    for i in range(rank, n_shards, world_size):
        path = folder / _shard_name(i)
        for tmp in folder.glob(f"{_shard_name(i)}*.tmp"):
            _remove(tmp)
        if path.exists() and _shard_ok(path, fingerprint, shape_of(i)):
            continue
        _remove(path)
        todo.append(i)
    if rank == 0:  # shards past the end belong to no rank now: left by a larger data set
        for path in folder.glob("shard-*.safetensors*"):
            try:
                index = int(path.name[len("shard-"):].split(".")[0])
            except ValueError:
                continue
            if index >= n_shards:
                _remove(path)
        for tmp in folder.glob(f"{META}.*.tmp"):  # a meta.json write that was killed
            _remove(tmp)
    if todo:
        _remove(folder / META)   # a meta.json next to missing shards would lie
        _compute_shards(teacher, head, input_ids, attention_mask, folder, todo, shard_rows,
                        top_k, temperature, fingerprint, batch_size, chunk_tokens, progress,
                        desc=f"teacher cache (rank {rank})" if world_size > 1 else "teacher cache")

    # meta.json once every shard is a whole one of this cache (other ranks' may be missing
    # or still stale: their owners replace them); reading the headers is cheap
    if all(_shard_ok(folder / _shard_name(i), fingerprint, shape_of(i)) for i in range(n_shards)):
        meta = _meta(fingerprint, rows, length, top_k, temperature, shard_rows, n_shards)
        if _read_meta(folder) != meta:
            _write_atomic_json(folder / META, meta)
    return folder


def _meta(fingerprint, rows, length, top_k, temperature, shard_rows, n_shards) -> dict:
    return {"format": FORMAT, "fingerprint": fingerprint, "rows": rows, "seq_length": length,
            "top_k": top_k, "temperature": float(temperature), "shard_rows": shard_rows,
            "shards": [_shard_name(i) for i in range(n_shards)]}


def _compute_shards(teacher, head, input_ids, attention_mask, folder, todo, shard_rows, top_k,
                    temperature, fingerprint, batch_size, chunk_tokens, progress, desc) -> None:
    decoder = decoder_of(teacher)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    checked = False
    total = sum(min(shard_rows, len(input_ids) - i * shard_rows) for i in todo)
    try:
        with torch.inference_mode(), Bar(desc, total, show=progress) as bar:
            for i in todo:
                start, stop = i * shard_rows, min((i + 1) * shard_rows, len(input_ids))
                values, indices = [], []
                for b in range(start, stop, batch_size):
                    ids = input_ids[b:min(b + batch_size, stop)].to(device)
                    am = (None if attention_mask is None
                          else attention_mask[b:b + len(ids)].to(device))
                    if not checked:
                        _check_head(teacher, decoder, head, ids[:1], None if am is None else am[:1])
                        checked = True
                    hidden = decoder(input_ids=ids, attention_mask=am,
                                     use_cache=False).last_hidden_state
                    v, k = teacher_topk(hidden, head, top_k, temperature, chunk_tokens)
                    values.append(v.cpu())
                    indices.append(k.cpu())
                    bar.advance(len(ids))
                path = folder / _shard_name(i)
                tmp = path.with_name(f"{path.name}.tmp")
                save_file({"logprobs": torch.cat(values).contiguous(),
                           "indices": torch.cat(indices).contiguous()},
                          str(tmp), metadata={"fingerprint": fingerprint, "format": FORMAT,
                                              "shard": str(i), "first_row": str(start)})
                os.replace(tmp, path)
    finally:
        teacher.train(was_training)


# ------------------------------------------------------------------------------------- load

def load_teacher_cache(folder: str | Path, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's ``(logprobs float16 (N, L, k), indices int32 (N, L, k))``, all in memory.

    Raises :class:`EdgeDistillError` if ``meta.json`` is missing (the cache is incomplete), the
    fingerprint differs (the teacher, tokenizer, data, length, k or temperature changed) or a
    shard is missing or damaged; in each case :func:`build_teacher_cache` repairs it.
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise EdgeDistillError(
            f"teacher cache {folder}: no readable {META}, so the cache is incomplete (interrupted, "
            "or other ranks still running); run build_teacher_cache again with the same settings "
            "to finish it")
    if meta.get("fingerprint") != fingerprint:
        raise EdgeDistillError(
            f"teacher cache {folder}: built for fingerprint {meta.get('fingerprint')}, expected "
            f"{fingerprint} (the teacher, tokenizer, data, max_length, top_k or temperature "
            "changed); run build_teacher_cache to rebuild it")
    values, indices = [], []
    for name in meta["shards"]:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != fingerprint:
                    raise ValueError("fingerprint differs")
                values.append(f.get_tensor("logprobs"))
                indices.append(f.get_tensor("indices"))
        except Exception as e:
            raise EdgeDistillError(
                f"teacher cache {path}: missing or damaged ({' '.join(str(e).split())}); run "
                "build_teacher_cache again to recompute it") from None
    logprobs, ids = torch.cat(values), torch.cat(indices)
    expected = (meta["rows"], meta["seq_length"], meta["top_k"])
    if tuple(logprobs.shape) != expected or tuple(ids.shape) != expected:
        raise EdgeDistillError(
            f"teacher cache {folder}: shards hold {tuple(logprobs.shape)}, {META} says {expected}; "
            "delete the folder and build the cache again")
    return logprobs, ids


# ---------------------------------------------------------------------------------- dataset

class TeacherCacheDataset(Dataset):
    """Training rows plus the teacher's cached top-k, for ``default_data_collator``.

    ``rows``: a list (or ``datasets.Dataset``) of dicts with ``input_ids`` and optionally
    ``attention_mask`` and ``labels`` (lists or tensors of the cache's fixed length), in the
    order the cache was built from. Each item is those as int64 tensors plus
    :data:`TOPK_LOGPROBS` (float16 (L, k)) and :data:`TOPK_INDICES` (int32 (L, k)); other keys
    pass through unchanged.
    """

    def __init__(self, rows: Sequence[dict], logprobs: torch.Tensor, indices: torch.Tensor):
        if len(rows) != len(logprobs) or logprobs.shape != indices.shape:
            raise EdgeDistillError(
                f"teacher cache dataset: {len(rows)} rows but the cache holds "
                f"{tuple(logprobs.shape)} log-probs and {tuple(indices.shape)} indices; build the "
                "cache from these rows")
        self.rows, self.logprobs, self.indices = rows, logprobs, indices

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.rows[i])
        for key in _ROW_KEYS:
            if key in item:
                item[key] = torch.as_tensor(item[key], dtype=torch.long)
                if item[key].shape != self.logprobs.shape[1:2]:
                    raise EdgeDistillError(
                        f"teacher cache dataset: row {i} has {key} of shape "
                        f"{tuple(item[key].shape)}, the cache length {self.logprobs.shape[1]}; "
                        "pad or cut rows to the cache's fixed length")
        item[TOPK_LOGPROBS] = self.logprobs[i]
        item[TOPK_INDICES] = self.indices[i]
        return item


__all__ = ["META", "TOPK_INDICES", "TOPK_LOGPROBS", "TeacherCacheDataset", "build_teacher_cache",
           "cache_fingerprint", "load_teacher_cache"]
