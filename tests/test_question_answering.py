"""Task question-answering on a tiny random BERT: SQuAD files read (nested and flat), long
contexts cut into overlapping windows, answers read back from the scores, SQuAD's scores, span
KD on real tokens only, the whole pipeline, and its refusals."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from edgedistill.answers import best_answers, normalize_answer, squad_scores, windows
from edgedistill.cli import main
from edgedistill.distill.losses import soft_cross_entropy
from edgedistill.distill.trainer import (
    DistillationTrainer,
    DistillationTrainingArguments,
)
from edgedistill.recipe import load_recipe
from edgedistill.tasks import get_task
from tests.conftest import WORDS, make_bert, make_tokenizer
from tests.test_model_card import execute, python_blocks

FILLER = [w for w in WORDS if w not in ("helped", "sleep", "pain", "headache")]


def make_question(rng: random.Random, qid: str, words: int) -> dict:
    """A context of filler words holding 'helped X' once; the question 'helped' asks for X."""
    context = [rng.choice(FILLER) for _ in range(words)]
    at = rng.randrange(words)
    answer = rng.choice(["sleep", "pain", "headache"])
    context[at:at] = ["helped", answer]
    text = " ".join(context)
    start = len(" ".join(context[:at + 1])) + 1
    return {"id": qid, "question": "helped", "context": text,
            "answers": {"text": [answer], "answer_start": [start]}}


def write_data(folder, n_train=160, n_test=40):
    """Training questions in SQuAD's nested file, test questions as a JSON list of flat rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train = [make_question(rng, f"q{i}", rng.randint(4, 40)) for i in range(n_train)]
    nested = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": q["context"], "qas": [{"id": q["id"], "question": q["question"], "answers": [
            {"text": q["answers"]["text"][0], "answer_start": q["answers"]["answer_start"][0]}]}]}
        for q in train]}]}
    (folder / "train.json").write_text(json.dumps(nested))
    rng = random.Random(1)
    test = [make_question(rng, f"t{i}", rng.randint(4, 40)) for i in range(n_test)]
    (folder / "test.json").write_text(json.dumps(test))
    return folder


def make_reader(folder, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertForQuestionAnswering(config).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def test_long_contexts_become_overlapping_windows_that_keep_the_answer(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    q = make_question(random.Random(3), "a", 40)
    win = windows(tokenizer, [q["question"]], [q["context"]], 16, 4, [q["answers"]])
    assert len(win.example) > 3 and set(win.example) == {0}
    labelled = [w for w in range(len(win.example)) if win.encoding["start_positions"][w] > 0]
    assert labelled  # some window holds the whole answer; the others point at [CLS]
    for w in labelled:
        s, e = win.encoding["start_positions"][w], win.encoding["end_positions"][w]
        assert s == e and q["context"][win.offsets[w][s][0]:win.offsets[w][e][1]] == \
            q["answers"]["text"][0]
        assert tokenizer.convert_ids_to_tokens(win.encoding["input_ids"][w][s - 1]) == "helped"
    # consecutive windows share `stride` context tokens
    first, second = ([o for o in win.offsets[w] if o is not None] for w in (0, 1))
    assert first[-4:] == second[:4]
    # scores that point at the answer in its window read it back; spans outside the context
    # (the question) or longer than allowed are never chosen
    spans = [np.full((2, len(o)), -5.0) for o in win.offsets]
    w = labelled[0]
    spans[w][0][win.encoding["start_positions"][w]] = spans[w][1][win.encoding["end_positions"][w]] = 5
    spans[0][0][1] = spans[0][1][1] = 50.0  # token 1 is the question's
    assert best_answers(spans, win, [q["context"]]) == q["answers"]["text"]


def test_squad_scores_follow_the_official_definitions():
    assert normalize_answer("The  Pain, relief!") == "pain relief"
    s = squad_scores(["the pain", "bad sleep week", ""], [["Pain"], ["sleep", "good sleep"],
                                                           ["day"]], ["pain", "sleep", ""])
    assert s["exact_match"] == pytest.approx(1 / 3)
    # 'bad sleep week' vs 'good sleep': 1 shared word, precision 1/3, recall 1/2 -> 0.4 is
    # below 'sleep''s 0.5: the best over the gold answers counts
    assert s["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["agreement"] == pytest.approx(2 / 3)


def test_nested_and_flat_squad_files_read_alike(tmp_path):
    folder = write_data(tmp_path / "data")
    flat = tmp_path / "flat"
    flat.mkdir()
    nested = json.loads((folder / "train.json").read_text())
    rows = [{"id": qa["id"], "question": qa["question"], "context": p["context"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for p in nested["data"][0]["paragraphs"] for qa in p["qas"]]
    (flat / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (flat / "test.jsonl").write_text("\n".join(
        json.dumps(r) for r in json.loads((folder / "test.json").read_text())) + "\n")
    task, read = get_task("question-answering"), []
    for source in (folder, flat):
        path = tmp_path / "r.yaml"
        path.write_text(f"task: question-answering\ndata: {{source: {source}}}\n")
        read.append(task.load_data(load_recipe(path).data, 42))
    a, b = read
    assert a.train["id"] == b.train["id"] and a.train["answers"] == b.train["answers"]
    assert len(a.train) + len(a.validation) == 160 and a.labels == []
    assert a.test["text"][0] == f"{a.test['question'][0]} {a.test['context'][0]}"


def test_span_distillation_leaves_padding_out(tmp_path):
    teacher = BertForQuestionAnswering.from_pretrained(make_reader(tmp_path / "t")).eval()
    torch.manual_seed(1)
    student = BertForQuestionAnswering(teacher.config).eval()
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "o"), alpha_ce=0.0,
                                         alpha_distill=1.0, temperature=2.0, report_to="none")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert type(trainer).__name__ == "QuestionAnsweringDistillationTrainer"
    inputs = {"input_ids": torch.tensor([[2, 5, 3, 6, 7, 3, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]]),
              "start_positions": torch.tensor([3]), "end_positions": torch.tensor([4])}
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(inputs))
        kw = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        s, t = student(**kw), teacher(**kw)
    real = slice(0, 6)
    expected = sum(float(soft_cross_entropy(s[n][:, real], t[n][:, real], 2.0))
                   for n in ("start_logits", "end_logits")) / 2
    assert loss == pytest.approx(expected, rel=1e-4)


RECIPE = """
version: 1
task: question-answering
data: {{source: {data}, max_length: 32, doc_stride: 8}}
teacher: {{model: {teacher}, epochs: 4, batch_size: 8, learning_rate: 5.0e-3}}
student: {{num_layers: 2}}
distill: {{epochs: 3, batch_size: 8, learning_rate: 5.0e-3}}
quantize: {{runtimes: [onnxruntime]}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 0,
         sequence_length: 32, rounds: 1}}
"""


def write_recipe(tmp_path, teacher=None, **changes):
    text = RECIPE.format(data=write_data(tmp_path / "data"),
                         teacher=teacher or make_reader(tmp_path / "t"))
    for old, new in changes.items():
        text = text.replace(old, new)
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def sequence_classifier(folder):
    make_bert().save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def test_pipeline_fine_tunes_distils_exports_and_answers(tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path)), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {m["name"]: m["metrics"] for m in report["models"]}
    assert list(rows) == ["teacher", "teacher-onnx", "student", "student-onnx", "student-int8"]
    # the answer follows 'helped': the fine-tuned teacher finds it in contexts of several windows
    assert rows["teacher"]["f1"] > 0.5 and rows["teacher"]["agreement"] == 1.0
    assert rows["teacher-onnx"]["agreement"] > 0.9
    assert rows["student-onnx"]["f1"] == pytest.approx(rows["student"]["f1"], abs=0.05)
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    assert record["selection"]["metric"] == "f1"
    assert any("loss_distill" in h for h in record["log_history"])
    card = (out / "quantize" / "student-int8" / "README.md").read_text()
    printed = execute(python_blocks(card)[0])
    assert printed.startswith("'")  # the answer, as a quoted piece of the context


@pytest.mark.parametrize("change, classifier, message", [
    ({"doc_stride: 8": "doc_stride: 32"}, None, "data.doc_stride: 32 tokens"),
    ({"learning_rate: 5.0e-3}\nstudent": "learning_rate: 5.0e-3, finetune: false}\nstudent"},
     "teacher", "is not a question answerer; set teacher.finetune: true"),
    ({}, "student", "is not a question answerer's"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, change, classifier,
                                                      message):
    seq = sequence_classifier(tmp_path / "seq") if classifier else None
    if classifier == "student":
        change = {"student: {num_layers: 2}": f"student: {{model: {seq}}}"}
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, seq if classifier == "teacher" else None, **change)
    assert main(["run", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "teacher").exists()


@pytest.mark.parametrize("answers, message", [
    ("shifted", "answer 'WORD' is not at character"),
    ({"text": [], "answer_start": []}, "needs answers {text: [...], answer_start: [...]}"),
])
def test_an_answer_not_in_its_context_is_refused(tmp_path, capsys, answers, message):
    recipe = write_recipe(tmp_path)
    path = tmp_path / "data" / "test.json"
    rows = json.loads(path.read_text())
    word = rows[2]["answers"]["text"][0]
    if answers == "shifted":
        answers = {"text": [word], "answer_start": [rows[2]["answers"]["answer_start"][0] + 1]}
    rows[2]["answers"] = answers
    path.write_text(json.dumps(rows))
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "question t2" in err and message.replace("WORD", word) in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "teacher").exists()
