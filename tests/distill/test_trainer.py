import os
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from edgedistill.distill.losses import hidden_mse, soft_cross_entropy
from edgedistill.distill.trainer import add_teacher_logits
from edgedistill.errors import EdgeDistillError
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
            alpha_ce=0.5, alpha_distil=0.5, fp16=True, report_to="none")
    assert args.eval_strategy == "steps" and not args.fp16
    trainer = DistillationTrainer(model=student_model, args=args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, tokenizer=tokenizer, teacher_model=teacher_model)
    trainer.train(); trainer.save_model("./student_model")
    assert os.path.isfile("student_model/model.safetensors")
    assert "eval_loss" in trainer.evaluate()
    logged = [h for h in trainer.state.log_history if "loss_distil" in h]
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
                       alpha_distil=0.7, alpha_hidden=0.5)
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
    assert loss.item() == pytest.approx((0.3 * ce + 0.7 * kd + 0.5 * hidden).item(), rel=1e-5)


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
    with pytest.raises(EdgeDistillError, match="equal widths"):
        _trainer(tmp_path, make_bert(hidden=16), make_bert(hidden=32), alpha_hidden=1.0,
                 alpha_distil=0.0)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(EdgeDistillError, match="temperature"):
        DistillationTrainingArguments(output_dir=str(tmp_path), temperature=0)
    with pytest.raises(EdgeDistillError, match="did you mean"):
        DistillationTrainingArguments(output_dir=str(tmp_path), distil_loss="soft_crossentropy")


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
    assert any("loss_distil" in h for h in run.state.log_history)


def test_feature_loss_without_a_live_teacher_is_refused(tmp_path):
    student = make_bert(num_layers=1)
    trainer = _trainer(tmp_path, student, None, alpha_hidden=1.0)
    batch = {"input_ids": torch.tensor([[2, 6, 3]]), "labels": torch.tensor([0]),
             "teacher_logits": torch.zeros(1, 3)}
    with pytest.raises(EdgeDistillError, match="needs teacher_model"):
        trainer.compute_loss(student, batch)
