import logging
import os

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from safetensors.torch import load_file

from edgedistill.distill.losses import MATCH_LOSSES, hidden_mse, rkd_distance, soft_cross_entropy
from edgedistill.distill import teacher_outputs
from edgedistill.distill.teacher_outputs import add_teacher_logits
from edgedistill.errors import EdgeDistillError
from edgedistill.sources import cache_dir
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer


def tiny_dataset(tokenizer, n=48):
    texts, labels = make_texts(n)
    ds = Dataset.from_dict({"text": texts, "labels": [LABELS.index(x) for x in labels]})
    return ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def test_issue_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher_model = make_bert()
    student_model = make_student(teacher_model, num_layers=2)
    train_dataset = eval_dataset = tiny_dataset(tokenizer, n=64)  # 12 steps: one log at 10
    with pytest.warns(UserWarning, match="fp16=True needs a CUDA GPU"):
        args = DistillationTrainingArguments(output_dir="./results", num_train_epochs=3,
            per_device_train_batch_size=16, per_device_eval_batch_size=64, warmup_steps=500,
            weight_decay=0.01, learning_rate=2e-5, evaluation_strategy="steps", eval_steps=1000,
            save_steps=1000, logging_dir="./logs", logging_steps=10, temperature=2.0,
            alpha_ce=0.5, alpha_distill=0.5, fp16=True, report_to="none")
    assert args.eval_strategy == "steps" and not args.fp16
    trainer = DistillationTrainer(model=student_model, args=args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, tokenizer=tokenizer, teacher_model=teacher_model)
    trainer.train(); trainer.save_model("./student_model")
    assert os.path.isfile("student_model/model.safetensors")
    assert "eval_loss" in trainer.evaluate()
    logged = [h for h in trainer.state.log_history if "loss_distill" in h]
    assert logged and "loss_ce" in logged[0]


def _trainer(tmp_path, student, teacher, **kw):
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none",
                                         use_cpu=True, **kw)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher)


def test_compute_loss_is_the_weighted_sum(tmp_path):
    teacher = make_bert(num_layers=4)
    student = make_student(teacher, num_layers=2)
    torch.manual_seed(1)
    with torch.no_grad():  # make the student differ from the teacher's head
        student.classifier.weight.normal_()
    trainer = _trainer(tmp_path, student, teacher, temperature=3.0, alpha_ce=0.3,
                       alpha_distill=0.7, matches=[
                           {"loss": "hidden_mse", "strategy": "uniform", "weight": 0.5},
                           {"loss": "rkd_distance", "weight": 0.2}])
    batch = {"input_ids": torch.tensor([[2, 6, 7, 8, 3], [2, 9, 10, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
             "labels": torch.tensor([0, 2])}
    student.eval()
    loss = trainer.compute_loss(student, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True)
        t = teacher(**inputs, output_hidden_states=True)
    ce = torch.nn.functional.cross_entropy(s.logits, batch["labels"])
    kd = soft_cross_entropy(s.logits, t.logits, 3.0)
    mask = batch["attention_mask"]
    # the student kept teacher blocks [0, 3]: each learns from the block it was copied from
    hidden = (hidden_mse(s.hidden_states[1], t.hidden_states[1], mask)
              + hidden_mse(s.hidden_states[2], t.hidden_states[4], mask)) / 2
    rkd = rkd_distance(_pooled(s.hidden_states[2], mask), _pooled(t.hidden_states[4], mask))
    assert loss.item() == pytest.approx((0.3 * ce + 0.7 * kd + 0.5 * hidden + 0.2 * rkd).item(),
                                        rel=1e-5)


def test_a_batch_the_teacher_alone_labels_learns_from_the_teacher(tmp_path):
    """Rows labelled -100 (teacher-labelled extra text) add no cross-entropy; a batch of only
    such rows is the distillation loss alone, not NaN (which would stop training)."""
    teacher = make_bert(num_layers=4)
    student = make_student(teacher, num_layers=2)
    trainer = _trainer(tmp_path, student, teacher, temperature=2.0, alpha_ce=0.5,
                       alpha_distill=0.5)
    inputs = {"input_ids": torch.tensor([[2, 6, 7, 8, 3], [2, 9, 10, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    student.eval()
    with torch.no_grad():
        kd = soft_cross_entropy(student(**inputs).logits, teacher(**inputs).logits, 2.0)
    loss = trainer.compute_loss(student, {**inputs, "labels": torch.tensor([-100, -100])})
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.5 * kd.item(), rel=1e-5)
    loss.backward()  # and it trains: the student's weights get gradients
    assert student.classifier.weight.grad is not None


def _pooled(hidden, mask):
    mask = mask.unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_labels_only_without_teacher_uses_class_weights(tmp_path):
    student = make_bert(num_layers=1)
    batch = {"input_ids": torch.tensor([[2, 6, 3], [2, 7, 3]]), "labels": torch.tensor([0, 2])}
    trainer = _trainer(tmp_path, student, None, class_weights=[1.0, 1.0, 3.0])
    loss = trainer.compute_loss(student.eval(), batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits, batch["labels"], weight=torch.tensor([1.0, 1.0, 3.0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_incompatible_models_fail_before_training(tmp_path):
    with pytest.raises(EdgeDistillError, match="outputs differ"):
        _trainer(tmp_path, make_bert(num_labels=2), make_bert(num_labels=3))
    with pytest.raises(EdgeDistillError, match="vocabularies differ"):
        _trainer(tmp_path, make_bert(vocab_size=50), make_bert(), alpha_distill=0.0)
    with pytest.raises(EdgeDistillError, match=r"matches\[0\]: 'attention_kl' compares"):
        _trainer(tmp_path, make_student(make_bert(), num_layers=2, init="random",
                                        hidden_size=16, num_attention_heads=2),
                 make_bert(), matches=[{"loss": "attention_kl"}])


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(EdgeDistillError, match="temperature"):
        DistillationTrainingArguments(output_dir=str(tmp_path), temperature=0)
    with pytest.raises(EdgeDistillError, match="did you mean"):
        DistillationTrainingArguments(output_dir=str(tmp_path), distill_loss="soft_crossentropy")


def test_precomputed_teacher_logits_match_the_live_teacher(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert()
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():
        student.classifier.weight.mul_(-1.0)  # so the student disagrees with the teacher
    collator = DataCollatorWithPadding(tokenizer)
    cached = add_teacher_logits(tiny_dataset(tokenizer, 16), teacher, collator)
    batch = collator([cached[i] for i in range(8)])
    live_batch = {k: v for k, v in batch.items() if k != "teacher_logits"}
    trainer = _trainer(tmp_path, student, teacher, temperature=2.0)
    live = trainer.compute_loss(student.eval(), live_batch)
    assert trainer.compute_loss(student, batch).item() == pytest.approx(live.item(), rel=1e-5)

    # Through a whole Trainer run without a teacher: the column must reach compute_loss.
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none",
                                         num_train_epochs=1, logging_steps=1,
                                         per_device_train_batch_size=8)
    run = DistillationTrainer(model=student, args=args, train_dataset=cached,
                              data_collator=collator)
    run.train()
    assert any("loss_distill" in h for h in run.state.log_history)


def test_teacher_logits_are_kept_for_the_next_run_with_the_same_teacher_and_rows(
        tmp_path, monkeypatch, caplog):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher, collator = make_bert(), DataCollatorWithPadding(tokenizer)
    rows = tiny_dataset(tokenizer, 40)  # texts of 5-14 words: batches sorted by length
    first = add_teacher_logits(rows, teacher, collator, batch_size=8)
    # row by row, as the model reads each example alone: the sorted batches kept the order
    with torch.no_grad():
        for i in (0, 17, 39):
            alone = teacher(input_ids=torch.tensor([rows[i]["input_ids"]])).logits[0]
            assert torch.allclose(torch.tensor(first[i]["teacher_logits"]), alone, atol=1e-5)
    files = list((tmp_path / "teacher-logits").glob("*.safetensors"))
    assert len(files) == 1

    def refuse(**batch):  # the same teacher, but running it fails the test
        raise AssertionError("the teacher ran although its logits were kept")

    with monkeypatch.context() as patch:
        patch.setattr(teacher, "forward", refuse)
        again = add_teacher_logits(rows, teacher, collator, batch_size=8)
        # the rows in torch format (as a caller may hand them over) are the same rows
        rows.set_format("torch")
        kept = add_teacher_logits(rows, teacher, collator).with_format(None)["teacher_logits"]
        rows.reset_format()
        assert kept == list(first["teacher_logits"])
    assert list(again["teacher_logits"]) == list(first["teacher_logits"])

    # other weights, or other rows: computed again, into a file of their own
    other = make_bert(seed=1)
    changed = add_teacher_logits(rows, other, collator)
    assert list(changed["teacher_logits"]) != list(first["teacher_logits"])
    add_teacher_logits(rows.select(range(20)), teacher, collator)
    assert len(list((tmp_path / "teacher-logits").glob("*.safetensors"))) == 3
    # a file cut short (a run killed while writing it) is not read: the teacher runs again
    files[0].write_bytes(files[0].read_bytes()[:40])
    with monkeypatch.context() as patch, pytest.raises(AssertionError, match="the teacher ran"):
        patch.setattr(teacher, "forward", refuse)
        add_teacher_logits(rows, teacher, collator)
    # where nothing can be written (a full disk), the run goes on without keeping them
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(teacher_outputs, "write_atomic", full)
    with caplog.at_level(logging.WARNING, logger=teacher_outputs.__name__):
        recomputed = list(add_teacher_logits(rows, teacher, collator)["teacher_logits"])
    assert "not kept for later runs" in caplog.text
    assert torch.allclose(torch.tensor(recomputed), torch.tensor(list(first["teacher_logits"])),
                          atol=1e-5)


@pytest.fixture(scope="module")
def logits_cache_of_a_module_fixture():
    return teacher_outputs.logits_cache()  # set up before any test's own fixtures


def test_module_fixtures_keep_teacher_logits_out_of_the_users_cache(
        logits_cache_of_a_module_fixture):
    assert not logits_cache_of_a_module_fixture.is_relative_to(cache_dir())


def test_matches_without_a_live_teacher_are_refused(tmp_path):
    with pytest.raises(EdgeDistillError, match="matches need teacher_model"):
        _trainer(tmp_path, make_bert(num_layers=1), None, matches=[{"loss": "hidden_mse"}])


MATCH_OPTIONS = {"minilm_relation": {"relation_heads": 4}}


@pytest.mark.parametrize("name", sorted(MATCH_LOSSES))
def test_each_match_loss_teaches_a_random_student(tmp_path, name):
    """A narrower random student (width 16 vs 32: projections or width-free relations) trained
    on one match loss alone gets closer to the teacher; gradients reach the student (and its
    projection) and never the teacher."""
    teacher = make_bert(num_layers=4, seed=0)
    torch.manual_seed(1)
    student = make_student(teacher, num_layers=2, init="random", hidden_size=16,
                           intermediate_size=32)
    trainer = _trainer(tmp_path, student, teacher, alpha_ce=0.0, alpha_distill=0.0, matches=[
        {"loss": name, "strategy": "uniform" if name.startswith(("hidden", "attention")) else None,
         "options": MATCH_OPTIONS.get(name, {})}])
    texts, _ = make_texts(16, seed=3)
    tokenizer = make_tokenizer(tmp_path / "tok")
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.eval()  # no dropout: the loss should fall steadily
    losses = []
    for _ in range(25):
        loss = trainer.compute_loss(student, batch)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    if MATCH_LOSSES[name].same_width:
        assert next(student.distill_projections.parameters()).grad is not None
    assert losses[-1] < 0.7 * losses[0], losses


def test_projections_train_with_the_student_but_are_not_saved(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert(num_layers=4)
    student = make_student(teacher, num_layers=2, init="random", hidden_size=16,
                           intermediate_size=32)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "run"), report_to="none", num_train_epochs=1,
        per_device_train_batch_size=8, save_strategy="epoch", logging_steps=1,
        matches=[{"loss": "hidden_mse", "strategy": "uniform"}])
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher,
                                  train_dataset=tiny_dataset(tokenizer, 16), tokenizer=tokenizer)
    before = student.distill_projections["0"].weight.clone()
    trainer.train()
    assert not torch.equal(before, student.distill_projections["0"].weight)
    assert any("loss_hidden_mse" in h for h in trainer.state.log_history)
    checkpoint = next((tmp_path / "run").glob("checkpoint-*"))
    assert any(k.startswith("distill_projections") for k in load_file(checkpoint / "model.safetensors"))
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert not any(k.startswith("distill_projections") for k in saved)
    assert hasattr(student, "distill_projections")  # still there for more training
    reloaded = type(student).from_pretrained(tmp_path / "student")
    assert not hasattr(reloaded, "distill_projections")


@pytest.mark.parametrize("grouped", [False, True])
def test_group_by_length_batches_rows_of_like_length(tmp_path, grouped):
    """distill.group_by_length reaches the Trainer: its training batches then hold rows of
    similar length, so they carry less padding than shuffled ones (rows of 4 to 40 tokens)."""
    from datasets import ClassLabel, DatasetDict

    from edgedistill.data import TaskData
    from edgedistill.distill.training import _arguments
    from edgedistill.recipe_blocks import DistillConfig
    from edgedistill.tasks import get_task

    tokenizer = make_tokenizer(tmp_path / "tok")
    words = [f"w{i % 9}" for i in range(40)]
    texts = [" ".join(words[:2 + (i * 7) % 38]) for i in range(256)]
    train = Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(256)]}).cast_column(
        "label", ClassLabel(names=LABELS))
    data = TaskData(DatasetDict(train=train, validation=train, test=train), LABELS)
    args = _arguments(get_task("classification"), DistillConfig(batch_size=16,
                      group_by_length=grouped), data, tmp_path, 0, None, "distill.")
    ds = train.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    trainer = DistillationTrainer(model=make_bert(num_layers=1), args=args, train_dataset=ds,
                                  eval_dataset=ds, data_collator=DataCollatorWithPadding(tokenizer))
    batches = list(trainer.get_train_dataloader())
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sum(len(b["input_ids"]) for b in batches) == 256  # every row, once
    assert (padded / real < 1.3) if grouped else (padded / real > 1.6)  # 1.19 vs 1.73


@pytest.mark.parametrize("values, greater, still_learning", [
    ([0.797, 0.843], True, True), ([0.794, 0.837, 0.839], True, False),
    ([0.80, 0.78], True, False), ([3.0, 2.9], False, True), ([3.0, 2.995], False, False)])
def test_a_last_epoch_counts_as_still_learning_only_beyond_the_noise(values, greater,
                                                                     still_learning):
    from types import SimpleNamespace

    from edgedistill.distill.training import _selection

    history = [{"eval_macro_f1": v} for v in values]
    args = SimpleNamespace(metric_for_best_model="macro_f1", greater_is_better=greater)
    assert _selection(history, args)["last_epoch_improved"] is still_learning
