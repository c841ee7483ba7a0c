"""Offline teacher cache: build, load, fingerprint, resume, ranks, dataset."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import default_data_collator

from edgedistill.distill.teacher_cache import (META, TOPK_INDICES, TOPK_LOGPROBS,
                                               TeacherCacheDataset, build_teacher_cache,
                                               cache_fingerprint, load_teacher_cache)
from edgedistill.distill.token_kd import sparse_token_kd, teacher_topk
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_llama, make_llm_tokenizer

N, LENGTH, K = 10, 6, 5


@pytest.fixture(scope="module")
def teacher():
    return make_llama(num_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return make_llm_tokenizer()


@pytest.fixture(scope="module")
def data(teacher):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, teacher.config.vocab_size, (N, LENGTH), generator=g)
    mask = torch.ones(N, LENGTH, dtype=torch.long)
    mask[3, -2:] = 0
    ids[3, -2:] = 0
    return ids, mask


def build(teacher, data, folder, **kwargs):
    ids, mask = data
    options = dict(top_k=K, temperature=2.0, batch_size=3, shard_rows=4, progress=False)
    options.update(kwargs)
    options.setdefault("fingerprint", cache_fingerprint(teacher, None, ids, LENGTH,
                                                        options["top_k"], options["temperature"]))
    build_teacher_cache(teacher, ids, mask, folder, **options)
    return options["fingerprint"]


def shard_files(folder):
    return sorted(p.name for p in folder.glob("shard-*"))


def test_build_then_load_round_trips(teacher, tokenizer, data, tmp_path):
    ids, mask = data
    fp = cache_fingerprint(teacher, tokenizer, ids, LENGTH, K, 2.0)
    assert len(fp) == 16 and int(fp, 16) >= 0
    folder = build(teacher, data, tmp_path / "cache", fingerprint=fp)
    folder = tmp_path / "cache"
    assert shard_files(folder) == [f"shard-0000{i}.safetensors" for i in range(3)]  # 4 + 4 + 2 rows
    meta = json.loads((folder / META).read_text())
    assert meta["fingerprint"] == fp and meta["rows"] == N and meta["seq_length"] == LENGTH
    assert meta["top_k"] == K and meta["temperature"] == 2.0 and meta["shard_rows"] == 4
    logprobs, indices = load_teacher_cache(folder, fp)
    assert logprobs.dtype == torch.float16 and indices.dtype == torch.int32
    assert logprobs.shape == indices.shape == (N, LENGTH, K)
    with torch.inference_mode():
        hidden = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
        head = teacher.get_output_embeddings()
        direct_values, direct_indices = teacher_topk(hidden, head, K, 2.0)
    assert torch.equal(indices, direct_indices)
    torch.testing.assert_close(logprobs, direct_values, rtol=0, atol=2e-3)
    # they are the full-vocabulary log-probs at T = 2 (not renormalised over the top-k)
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits / 2.0, -1)
    torch.testing.assert_close(logprobs.float(), full.gather(-1, indices.long()), rtol=0, atol=2e-3)
    assert (logprobs.float().exp().sum(-1) < 1).all()
    # no pickle anywhere, and each shard says whose it is
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    with safe_open(str(folder / "shard-00000.safetensors"), framework="pt") as f:
        assert f.metadata()["fingerprint"] == fp


def test_fingerprint_changes_with_every_input(teacher, tokenizer, data):
    ids, _ = data
    base = cache_fingerprint(teacher, tokenizer, ids, LENGTH, K, 1.0)
    assert cache_fingerprint(teacher, tokenizer, ids.clone(), LENGTH, K, 1.0) == base
    other_ids = ids.clone()
    other_ids[0, 0] += 1
    other_weights = make_llama(num_layers=2)
    with torch.no_grad():
        other_weights.model.norm.weight[0] += 1e-3
    changed = {
        "weights": cache_fingerprint(other_weights, tokenizer, ids, LENGTH, K, 1.0),
        "k": cache_fingerprint(teacher, tokenizer, ids, LENGTH, K + 1, 1.0),
        "T": cache_fingerprint(teacher, tokenizer, ids, LENGTH, K, 2.0),
        "max_length": cache_fingerprint(teacher, tokenizer, ids, LENGTH + 1, K, 1.0),
        "data": cache_fingerprint(teacher, tokenizer, other_ids, LENGTH, K, 1.0),
        "tokenizer": cache_fingerprint(teacher, None, ids, LENGTH, K, 1.0),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)


def test_load_with_another_fingerprint_or_incomplete_raises(teacher, data, tmp_path):
    folder = tmp_path / "cache"
    fp = build(teacher, data, folder)
    with pytest.raises(EdgeDistillError, match="expected 0123456789abcdef") as info:
        load_teacher_cache(folder, "0123456789abcdef")
    assert "\n" not in str(info.value) and "rebuild" in str(info.value)
    (folder / META).unlink()
    with pytest.raises(EdgeDistillError, match="incomplete"):
        load_teacher_cache(folder, fp)
    with pytest.raises(EdgeDistillError, match="incomplete"):
        load_teacher_cache(tmp_path / "nothing", fp)


def test_building_with_another_fingerprint_replaces_the_shards(teacher, data, tmp_path):
    folder = tmp_path / "cache"
    old = build(teacher, data, folder, top_k=K)
    new = build(teacher, data, folder, top_k=K + 2)
    assert old != new
    assert shard_files(folder) == [f"shard-0000{i}.safetensors" for i in range(3)]
    logprobs, indices = load_teacher_cache(folder, new)
    assert logprobs.shape == (N, LENGTH, K + 2)
    with pytest.raises(EdgeDistillError):
        load_teacher_cache(folder, old)
    # fewer rows in a new data set: the old last shard goes too
    ids, mask = data
    fewer = (ids[:5], mask[:5])
    fp = build(teacher, fewer, folder)
    assert shard_files(folder) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert load_teacher_cache(folder, fp)[0].shape == (5, LENGTH, K)


class CountBatches:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_resume_recomputes_only_the_missing_shard(teacher, data, tmp_path):
    folder = tmp_path / "cache"
    fp = build(teacher, data, folder)
    reference = load_teacher_cache(folder, fp)
    kept = {name: (folder / name).stat().st_mtime_ns for name in ("shard-00000.safetensors",
                                                                   "shard-00002.safetensors")}
    (folder / "shard-00001.safetensors").unlink()
    (folder / META).unlink()
    # a killed run's leftovers: a half-written temp file and a truncated "shard" of another run
    (folder / "shard-00001.safetensors.tmp").write_bytes(b"\x00" * 10)
    (folder / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(EdgeDistillError, match="incomplete"):
        load_teacher_cache(folder, fp)
    counter = CountBatches(teacher.model)
    try:
        build(teacher, data, folder)
    finally:
        counter.handle.remove()
    # shard 1's 4 rows in batches of 3, plus the one-row head check (the base model alone,
    # then inside the full model)
    assert counter.calls == 2 + 2
    assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept
    assert not list(folder.glob("*.tmp"))
    for mine, theirs in zip(load_teacher_cache(folder, fp), reference):
        assert torch.equal(mine, theirs)
    # a complete cache: nothing to compute
    counter = CountBatches(teacher.model)
    try:
        build(teacher, data, folder)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


def test_damaged_shard_is_recomputed(teacher, data, tmp_path):
    folder = tmp_path / "cache"
    fp = build(teacher, data, folder)
    reference = load_teacher_cache(folder, fp)
    (folder / "shard-00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(EdgeDistillError, match="damaged"):
        load_teacher_cache(folder, fp)
    build(teacher, data, folder)
    for mine, theirs in zip(load_teacher_cache(folder, fp), reference):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_two_ranks_make_the_same_cache_as_one(teacher, data, tmp_path, order):
    single = build(teacher, data, tmp_path / "one")
    reference = load_teacher_cache(tmp_path / "one", single)
    folder = tmp_path / "two"
    first, second = order
    build(teacher, data, folder, rank=first, world_size=2)
    assert not (folder / META).exists()
    assert shard_files(folder) == (["shard-00000.safetensors", "shard-00002.safetensors"]
                                   if first == 0 else ["shard-00001.safetensors"])
    build(teacher, data, folder, rank=second, world_size=2)
    assert (folder / META).exists()
    for mine, theirs in zip(load_teacher_cache(folder, single), reference):
        assert torch.equal(mine, theirs)


def test_bad_arguments_raise(teacher, data, tmp_path):
    ids, mask = data
    with pytest.raises(EdgeDistillError, match="rank = 2"):
        build_teacher_cache(teacher, ids, mask, tmp_path, rank=2, world_size=2, progress=False)
    with pytest.raises(EdgeDistillError, match="top_k = 0"):
        build_teacher_cache(teacher, ids, mask, tmp_path, top_k=0, progress=False)
    with pytest.raises(EdgeDistillError, match="exceeds the teacher's vocabulary"):
        build_teacher_cache(teacher, ids, mask, tmp_path, top_k=10 ** 6, progress=False)
    with pytest.raises(EdgeDistillError, match="attention_mask"):
        build_teacher_cache(teacher, ids, mask[:, :-1], tmp_path, progress=False)


def test_a_teacher_that_post_processes_its_logits_is_refused(data, tmp_path):
    capped = make_llama(num_layers=1)
    plain_forward = capped.forward

    def forward(**kwargs):  # like Gemma 2's final soft-capping: logits != head(hidden)
        out = plain_forward(**kwargs)
        out.logits = 5.0 * torch.tanh(out.logits)
        return out

    capped.forward = forward
    with pytest.raises(EdgeDistillError, match="soft-caps or rescales"):
        build(capped, data, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("shard-*"))


def test_dataset_and_collator_give_a_trainable_batch(teacher, data, tmp_path):
    ids, mask = data
    fp = build(teacher, data, tmp_path / "cache")
    logprobs, indices = load_teacher_cache(tmp_path / "cache", fp)
    rows = [{"input_ids": ids[i].tolist(), "attention_mask": mask[i].tolist(),
             "labels": ids[i].tolist(), "text": "ignored"} for i in range(N)]
    dataset = TeacherCacheDataset(rows, logprobs, indices)
    assert len(dataset) == N
    batch = default_data_collator([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, LENGTH)
    assert batch["input_ids"].dtype == torch.long
    assert batch[TOPK_LOGPROBS].shape == batch[TOPK_INDICES].shape == (4, LENGTH, K)
    assert batch[TOPK_LOGPROBS].dtype == torch.float16 and batch[TOPK_INDICES].dtype == torch.int32
    assert torch.equal(batch[TOPK_INDICES], indices[:4])
    # the batch trains a student through the sparse loss
    student = make_llama(num_layers=1, seed=1).train()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sparse_token_kd(logits, batch[TOPK_LOGPROBS], batch[TOPK_INDICES],
                           batch["attention_mask"].bool(), "forward_kl", temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and student.model.embed_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(EdgeDistillError, match="rows"):
        TeacherCacheDataset(rows[:-1], logprobs, indices)
    short = TeacherCacheDataset([{"input_ids": [1, 2]}] * N, logprobs, indices)
    with pytest.raises(EdgeDistillError, match="fixed length"):
        short[0]
