"""Sequence-level KD: teacher generations (rows, seeding, cache) and on-policy batches (GKD)."""

import logging

import datasets
import pytest
import torch
from transformers import default_data_collator

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from edgedistill.data import lm_blocks
from edgedistill.distill.teacher_generations import PROMPT_LENGTH, teacher_generations, with_generations
from edgedistill.distill.teacher_cache import (TOPK_INDICES, TOPK_LOGPROBS, TeacherCacheDataset,
                                               build_teacher_cache, cache_fingerprint,
                                               load_teacher_cache)
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_llama, make_llm_tokenizer, make_texts

BLOCK, PROMPT, NEW = 12, 4, 6
EOS = 3


@pytest.fixture(scope="module")
def teacher():
    return make_llama(num_layers=2)


@pytest.fixture(scope="module")
def tok():
    return make_llm_tokenizer()


@pytest.fixture(scope="module")
def texts():
    return make_texts(40)[0]


def generate(teacher, tok, texts, **kw):
    base = dict(prompts=8, prompt_tokens=PROMPT, new_tokens=NEW, block_size=BLOCK, batch_size=3)
    return teacher_generations(teacher, tok, texts, **{**base, **kw})


def test_rows_are_prompt_then_continuation_with_labels_on_the_continuation(teacher, tok, texts):
    rows, record = generate(teacher, tok, texts)
    blocks = lm_blocks(datasets.Dataset.from_dict({"text": texts}), tok, BLOCK)
    assert rows.column_names == blocks.column_names + [PROMPT_LENGTH]
    starts = {tuple(ids[:PROMPT]) for ids in tok(texts, add_special_tokens=False)["input_ids"]
              if len(ids) > PROMPT}
    real = 0
    for row in rows:
        ids, mask, labels = row["input_ids"], row["attention_mask"], row["labels"]
        assert len(ids) == len(mask) == len(labels) == BLOCK and row[PROMPT_LENGTH] == PROMPT
        assert tuple(ids[:PROMPT]) in starts
        n = sum(mask)
        assert mask == [1] * n + [0] * (BLOCK - n) and PROMPT < n <= PROMPT + NEW
        assert ids[n:] == [0] * (BLOCK - n)          # the pad id
        assert labels == [-100] * PROMPT + ids[PROMPT:n] + [-100] * (BLOCK - n)
        assert EOS not in ids[PROMPT:n - 1]           # cut at the first end-of-text
        assert n == PROMPT + NEW or ids[n - 1] == EOS
        real += n - PROMPT
    assert record["sequences"] == record["requested"] == 8 and not record["cached"]
    assert record["generated_tokens"] == real
    assert record["mean_continuation_tokens"] == pytest.approx(real / 8, abs=0.01)
    assert record["teacher_seconds"] > 0


def test_seeded_sampling_is_reproducible_and_the_seed_matters(teacher, tok, texts):
    a, _ = generate(teacher, tok, texts, seed=1)
    b, _ = generate(teacher, tok, texts, seed=1)
    c, _ = generate(teacher, tok, texts, seed=2)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]


def test_greedy_matches_a_manual_greedy_decode(teacher, tok, texts):
    rows, record = generate(teacher, tok, texts, temperature=0.0, prompts=3, new_tokens=5)
    assert record["temperature"] == 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"][:PROMPT]])
        with torch.no_grad():
            for _ in range(5):
                nxt = teacher(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
                if int(nxt) == EOS:
                    break
        assert row["input_ids"][:ids.shape[1]] == ids[0].tolist()
        assert sum(row["attention_mask"]) == ids.shape[1]


class Counting(torch.nn.Module):
    """The teacher, counting its generate calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def generate(self, **kw):
        self.calls += 1
        return self.model.generate(**kw)


def test_cache_hit_skips_the_teacher_and_any_change_misses(teacher, tok, texts, tmp_path,
                                                            caplog):
    counted = Counting(teacher)
    first, rec1 = generate(counted, tok, texts, cache_dir=tmp_path)
    calls = counted.calls
    assert calls == 3  # 8 prompts, 3 a batch
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("generations-")  # no .part left

    again, rec2 = generate(counted, tok, texts, cache_dir=tmp_path)
    assert counted.calls == calls and rec2["cached"] and rec2["teacher_seconds"] == 0.0
    assert again.to_dict() == first.to_dict()
    assert {k: v for k, v in rec2.items() if k not in ("cached", "teacher_seconds")} == \
        {k: v for k, v in rec1.items() if k not in ("cached", "teacher_seconds")}

    generate(counted, tok, texts, cache_dir=tmp_path, top_p=0.9)
    assert counted.calls == 2 * calls and len(list(tmp_path.iterdir())) == 2

    files[0].write_bytes(files[0].read_bytes()[:100])  # a damaged file: made again
    with caplog.at_level(logging.WARNING):
        redone, rec3 = generate(counted, tok, texts, cache_dir=tmp_path)
    assert counted.calls == 3 * calls and not rec3["cached"] and "damaged" in caplog.text
    assert redone.to_dict() == first.to_dict()
    assert generate(counted, tok, texts, cache_dir=tmp_path)[1]["cached"]


def test_fewer_long_texts_than_requested_uses_all_and_says_so(teacher, tok, caplog):
    texts = ["good great fine awful bad", "pain relief", "worse better headache sleep dose day"]
    with caplog.at_level(logging.WARNING):
        rows, record = generate(teacher, tok, texts, prompts=5)
    assert record["requested"] == 5 and record["sequences"] == len(rows) == 2
    assert "only 2" in caplog.text


@pytest.mark.parametrize("kw, message", [
    (dict(prompt_tokens=8, new_tokens=5), r"prompt_tokens \+ new_tokens = 8 \+ 5 exceeds "
                                          r"data.max_length = 12"),
    (dict(prompt_tokens=11, new_tokens=1), "transfer.generate.prompts: none of the"),
    (dict(prompts=0), "transfer.generate.prompts"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_settings_that_cannot_work_fail_with_one_clear_line(teacher, tok, kw, message):
    texts = ["good great fine awful bad worse better headache sleep dose"]  # 10 tokens
    with pytest.raises(EdgeDistillError, match=message) as e:
        generate(teacher, tok, texts, **kw)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- training on them

def train_data(teacher, tok, texts):
    blocks = lm_blocks(datasets.Dataset.from_dict({"text": texts}), tok, BLOCK)
    rows, _ = generate(teacher, tok, texts, prompts=16)
    return with_generations(blocks, rows), len(blocks)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                distill_loss="forward_kl", temperature=1.0, per_device_train_batch_size=8,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", max_steps=4, seed=3)
    return DistillationTrainingArguments(**{**base, **kw})


def finite_losses(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses and all(torch.isfinite(torch.tensor(losses)))


def test_padded_generated_rows_give_the_same_loss_live_or_cached(teacher, tok, texts, tmp_path):
    train, n_blocks = train_data(teacher, tok, texts)
    assert train[n_blocks - 1][PROMPT_LENGTH] == 0 and train[n_blocks][PROMPT_LENGTH] == PROMPT
    ids, mask = torch.tensor(train["input_ids"]), torch.tensor(train["attention_mask"])
    # as the pipeline does: one cache over the blocks and the generated rows after them
    fp = cache_fingerprint(teacher, tok, ids, BLOCK, 24, 1.0, mask)
    build_teacher_cache(teacher, ids, mask, tmp_path / "cache", top_k=24, fingerprint=fp,
                        progress=False)
    cached = TeacherCacheDataset(train, *load_teacher_cache(tmp_path / "cache", fp))
    student = make_student(teacher, num_layers=1)
    live = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path))
    student.train()
    batch = default_data_collator([cached[i] for i in range(n_blocks - 2, n_blocks + 6)])
    live_batch = {k: v for k, v in batch.items() if k not in (TOPK_LOGPROBS, TOPK_INDICES)}
    a = float(live.compute_loss(student, live_batch).detach())
    b = float(live.compute_loss(student, batch).detach())  # top-k = whole vocabulary: same targets
    assert a == pytest.approx(b, rel=2e-3)
    # what sits in the padding changes nothing: it is masked out and after every real token
    noisy = dict(live_batch, input_ids=torch.where(batch["attention_mask"].bool(),
                                                   batch["input_ids"], 7))
    assert float(live.compute_loss(student, noisy).detach()) == pytest.approx(a, rel=1e-5)

    for teacher_model, data in ((teacher, train), (None, cached)):
        trainer = DistillationTrainer(model=make_student(teacher, num_layers=1), args=args(
            tmp_path), teacher_model=teacher_model, train_dataset=data,
            data_collator=default_data_collator)
        trainer.train()
        assert finite_losses(trainer)


def watch(trainer):
    """Record the batches _on_policy turns into student generations."""
    seen = []
    original = trainer._on_policy

    def spy(model, inputs, prompt_length):
        out = original(model, inputs, prompt_length)
        seen.append((inputs, dict(out), prompt_length))  # the loss pops labels from out
        return out

    trainer._on_policy = spy
    return seen


def test_on_policy_batches_are_continued_by_the_student(teacher, tok, texts, tmp_path):
    train, _ = train_data(teacher, tok, texts)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                                  args=args(tmp_path, lmbda=1.0, generation_new_tokens=5),
                                  train_dataset=train, data_collator=default_data_collator)
    seen = watch(trainer)
    scored = []
    hidden = trainer._teacher_hidden
    trainer._teacher_hidden = lambda inputs: scored.append(inputs["input_ids"]) or hidden(inputs)
    trainer.train()
    assert finite_losses(trainer)
    assert trainer._on_policy_batches == len(seen) > 0
    assert trainer.state.log_history[-2]["on_policy_batches"] == len(seen)
    changed = 0
    for before, after, p in seen:
        assert any(torch.equal(after["input_ids"], s) for s in scored)  # the teacher scores it
        plain, gen = p == 0, p > 0
        for k in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(after[k][plain], before[k][plain])
        assert torch.equal(after["input_ids"][gen, :PROMPT], before["input_ids"][gen, :PROMPT])
        assert (after["labels"][gen, :PROMPT] == -100).all()
        real = after["attention_mask"][gen].sum(1)
        assert (real > PROMPT).all() and (real <= PROMPT + 5).all()
        changed += int((after["input_ids"][gen] != before["input_ids"][gen]).any(1).sum())
    assert changed > 0


def test_lmbda_zero_never_generates(teacher, tok, texts, tmp_path):
    train, _ = train_data(teacher, tok, texts)
    trainer = DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                                  args=args(tmp_path, max_steps=2), train_dataset=train,
                                  data_collator=default_data_collator)
    seen = watch(trainer)
    trainer.train()
    assert seen == [] and trainer._on_policy_batches == 0 and finite_losses(trainer)
    assert not any("on_policy_batches" in h for h in trainer.state.log_history)


def test_on_policy_without_a_live_teacher_fails_clearly(teacher, tok, texts, tmp_path):
    train, n = train_data(teacher, tok, texts)
    fake = torch.zeros(len(train), BLOCK, 2)
    cached = TeacherCacheDataset(train, fake.half(), fake.int())
    with pytest.raises(EdgeDistillError, match="lmbda: on-policy batches need the live teacher"):
        DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                            args=args(tmp_path, lmbda=0.5), train_dataset=cached)
    with pytest.raises(EdgeDistillError, match="lmbda: on-policy batches need the live teacher"):
        DistillationTrainer(model=make_student(teacher, num_layers=1),
                            args=args(tmp_path, lmbda=0.5), train_dataset=train)
    # top-k arriving in a batch some other way is caught when the batch is on-policy
    student = make_student(teacher, num_layers=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=args(tmp_path, lmbda=1.0))
    student.train()
    with pytest.raises(EdgeDistillError, match="cached teacher top-k"):
        trainer.compute_loss(student, default_data_collator([cached[n], cached[n + 1]]))


@pytest.mark.parametrize("kw, message", [
    (dict(lmbda=1.5), "lmbda"), (dict(generation_top_p=0.0), "generation_top_p"),
    (dict(generation_temperature=-0.1), "generation_temperature"),
    (dict(generation_new_tokens=0), "generation_new_tokens"),
])
def test_on_policy_settings_are_checked(tmp_path, kw, message):
    with pytest.raises(EdgeDistillError, match=message):
        args(tmp_path, **kw)
