"""A classifier student that reads its own tokenizer: the teacher labels each example read
its own way, the student trains on its own token ids, and the run ships the student's
tokenizer with it."""

import json

import torch
from transformers import BertTokenizerFast

from edgedistill.cli import main
from edgedistill.data import load_task_data
from edgedistill.distill.teacher_outputs import TEACHER_LOGITS
from edgedistill.distill.trainer import DistillationTrainingArguments
from edgedistill.distill.training import classifier_sets
from edgedistill.distill.transfer import build_transfer_set
from edgedistill.recipe_blocks import DataConfig
from tests.conftest import WORDS, make_bert, make_tokenizer, write_tsv


def permuted_tokenizer(folder):
    """The teacher's words under other ids: a different vocabulary that reads the same text."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(reversed(WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)


def teacher_logits(teacher, tokenizer, text):
    with torch.no_grad():
        return teacher(**tokenizer(text, return_tensors="pt")).logits[0].tolist()


def test_the_teacher_labels_its_own_reading_and_the_student_trains_on_its_own(tmp_path):
    teacher, teacher_tok = make_bert(), make_tokenizer(tmp_path / "t")
    student_tok = permuted_tokenizer(tmp_path / "s")
    data_cfg = DataConfig(source=str(write_tsv(tmp_path / "data", 20, 5)), max_length=32)
    data = load_task_data(data_cfg)
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "o"), alpha_distill=0.5,
                                         report_to="none")
    train, validation, _, _, live, _ = classifier_sets(
        student_tok, args, data, data_cfg, teacher=teacher, teacher_tokenizer=teacher_tok)
    assert live is None  # the trainer must not feed the student's ids to the teacher
    text = data.train[0]["text"]
    assert train[0]["input_ids"] == student_tok(text)["input_ids"]
    assert train[0]["input_ids"] != teacher_tok(text)["input_ids"]
    assert torch.allclose(torch.tensor(train[0][TEACHER_LOGITS]),
                          torch.tensor(teacher_logits(teacher, teacher_tok, text)), atol=1e-5)
    assert len(validation[0][TEACHER_LOGITS]) == 3

    transfer, _ = build_transfer_set([text], teacher, student_tok, unlabelled=["good dose"],
                                     teacher_tokenizer=teacher_tok)
    row = transfer[0]
    assert row["input_ids"] == student_tok("good dose")["input_ids"]
    assert torch.allclose(torch.tensor(row[TEACHER_LOGITS]),
                          torch.tensor(teacher_logits(teacher, teacher_tok, "good dose")),
                          atol=1e-5)


def test_a_run_with_a_student_of_another_tokenizer(tmp_path, tiny_teacher_dir):
    student = tmp_path / "student"
    make_bert(num_layers=2, seed=1).save_pretrained(student)
    permuted_tokenizer(student).save_pretrained(student)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\ndata: {{source: {write_tsv(tmp_path / 'data', 40, 12)}, max_length: 32}}\n"
        f"teacher: {{model: {tiny_teacher_dir}, epochs: 1}}\n"
        f"student: {{model: {student}}}\ndistill: {{epochs: 1}}\n"
        "bench: {iterations: 3, min_seconds: 0.01, warmup: 1, rounds: 1, sequence_length: 32}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    # the student ships with the tokenizer it was trained on, and every stage after it used it
    assert (out / "distill" / "model" / "vocab.txt").read_text() == \
        (student / "vocab.txt").read_text()
    assert (out / "quantize" / "student-int8" / "vocab.txt").read_text() == \
        (student / "vocab.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    int8 = next(m for m in report["models"] if m["name"] == "student-int8")
    assert 0 <= int8["metrics"]["agreement"] <= 1 and int8["latency"]["p50_ms"] > 0
