"""Task token-classification on a tiny random BERT: tags aligned to sub-words, CoNLL and JSON
lines read, entity-level metrics, per-token KD only where tags are scored, the whole pipeline,
and its refusals."""

import json
import random

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from edgedistill.cli import main
from edgedistill.distill.losses import soft_cross_entropy
from edgedistill.distill.trainer import (
    DistillationTrainer,
    DistillationTrainingArguments,
)
from edgedistill.evaluation import align_tags, tagging_metrics
from edgedistill.recipe import load_recipe
from edgedistill.tasks import get_task
from tests.conftest import WORDS, make_bert, make_tokenizer
from tests.test_model_card import execute, python_blocks

TAGS = ["O", "B-SYM", "I-SYM", "B-TIME"]


def tag_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """Words with tags that follow from them: 'side effects' and 'pain' / 'headache' are
    symptoms, 'day' / 'week' times, everything else O."""
    words, tags = [], []
    while len(words) < 3:
        word = rng.choice(WORDS)
        if word == "side":
            words += ["side", "effects"]
            tags += ["B-SYM", "I-SYM"]
        elif word in ("pain", "headache"):
            words.append(word)
            tags.append("B-SYM")
        elif word in ("day", "week"):
            words.append(word)
            tags.append("B-TIME")
        elif word != "effects":
            words.append(word)
            tags.append("O")
    return words, tags


def write_jsonl(folder, n_train=120, n_test=40):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        rng = random.Random(seed)
        rows = [dict(zip(("tokens", "tags"), tag_sentence(rng))) for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def make_tagger(folder):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                        label2id={t: i for i, t in enumerate(TAGS)})
    BertForTokenClassification(config).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def test_each_word_tag_sits_on_its_first_sub_token(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    # 'goodworse' is not in the vocabulary: it splits into sub-words (or [UNK])
    enc, firsts = align_tags(tokenizer, [["pain", "week", "good"]], [[1, 3, 0]], 16)
    assert enc["labels"][0][0] == -100 and enc["labels"][0][-1] == -100  # [CLS], [SEP]
    assert [t for t in enc["labels"][0] if t != -100] == [1, 3, 0]
    assert [w for w in firsts[0] if w != -100] == [0, 1, 2]


def test_entity_metrics_follow_conlleval():
    names = ["O", "B-SYM", "I-SYM"]
    gold = [[1, 2, 0, 1]]
    assert tagging_metrics(gold, gold, names, gold)["entity_f1"] == 1.0
    half = tagging_metrics([[1, 0, 0, 1]], gold, names, gold)  # first entity cut short
    assert half["entity_precision"] == 0.5 and half["entity_recall"] == 0.5
    assert half["word_accuracy"] == 0.75 and half["agreement"] == 0.75


def test_conll_and_jsonl_read_alike(tmp_path):
    folder = write_jsonl(tmp_path / "jsonl")
    conll = tmp_path / "conll"
    conll.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        text = "-DOCSTART- O\n\n" + "\n\n".join(
            "\n".join(f"{w} NN {t}" for w, t in zip(r["tokens"], r["tags"])) for r in rows)
        (conll / f"{split}.conll").write_text(text + "\n")
    task = get_task("token-classification")
    read = {}
    for source in (folder, conll):
        path = tmp_path / "r.yaml"
        path.write_text(f"task: token-classification\ndata: {{source: {source}, text_column: "
                        "tokens, label_column: tags}\n")
        read[source] = task.load_data(load_recipe(path).data, 42)
    a, b = read[folder], read[conll]
    assert a.labels == b.labels == sorted(TAGS)
    assert a.test["tokens"] == b.test["tokens"] and a.test["tags"] == b.test["tags"]
    assert a.test["text"][0] == " ".join(a.test["tokens"][0])


def test_per_token_distillation_counts_only_scored_positions(tmp_path):
    """Padding and continuation sub-tokens (label -100) are left out of the soft-target loss."""
    teacher = BertForTokenClassification.from_pretrained(make_tagger(tmp_path / "t")).eval()
    torch.manual_seed(1)
    student = BertForTokenClassification(teacher.config).eval()
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "o"), alpha_ce=0.0,
                                         alpha_distill=1.0, temperature=2.0, report_to="none")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    inputs = {"input_ids": torch.tensor([[2, 5, 6, 7, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
              "labels": torch.tensor([[-100, 1, -100, 3, -100, -100]])}
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(inputs))
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        s, t = student(**kwargs).logits, teacher(**kwargs).logits
    keep = inputs["labels"] != -100
    assert loss == pytest.approx(float(soft_cross_entropy(s[keep], t[keep], 2.0)), rel=1e-5)
    assert loss != pytest.approx(float(soft_cross_entropy(s, t, 2.0)), rel=1e-5)


RECIPE = """
version: 1
task: token-classification
data: {{source: {data}, text_column: tokens, label_column: tags, max_length: 32}}
teacher: {{model: {teacher}, epochs: 3, batch_size: 8, learning_rate: 5.0e-3}}
student: {{num_layers: 2}}
distill: {{epochs: 2, batch_size: 8, learning_rate: 5.0e-3}}
quantize: {{runtimes: [onnxruntime]}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 0,
         sequence_length: 32, rounds: 1}}
"""


def write_recipe(tmp_path, **changes):
    text = RECIPE.format(data=write_jsonl(tmp_path / "data"),
                         teacher=make_tagger(tmp_path / "teacher"))
    for old, new in changes.items():
        text = text.replace(old, new)
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def test_pipeline_fine_tunes_distils_exports_and_scores_a_tagger(tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path)), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {m["name"]: m["metrics"] for m in report["models"]}
    assert list(rows) == ["teacher", "teacher-onnx", "student", "student-onnx", "student-int8"]
    # the rule is learnable from the words alone: the fine-tuned teacher finds the entities
    assert rows["teacher"]["entity_f1"] > 0.5 and rows["teacher"]["agreement"] == 1.0
    assert rows["student-onnx"]["entity_f1"] == pytest.approx(rows["student"]["entity_f1"],
                                                              abs=0.02)
    for m in rows.values():
        assert 0 <= m["entity_f1"] <= 1 and 0 <= m["entity_f1_vs_teacher"] <= 1
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    assert record["selection"]["metric"] == "entity_f1"
    assert any("loss_distill" in h for h in record["log_history"])
    card = (out / "quantize" / "student-int8" / "README.md").read_text()
    printed = execute(python_blocks(card)[0])
    assert printed.startswith("[('[CLS]', ")


@pytest.mark.parametrize("change, message", [
    ({"label_column: tags": "label_column: tags, labels: [O, B-SYM]"},
     "are not in the label set"),
    ({"label_column: tags": "label_column: nope"}, "data.label_column: column 'nope' is missing"),
    ({"learning_rate: 5.0e-3}\nstudent": "learning_rate: 5.0e-3, class_weights: balanced}\nstudent"},
     "teacher.class_weights"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, change, message):
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path, **change)), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "teacher").exists()


def test_words_and_tags_of_different_lengths_are_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    path = tmp_path / "data" / "train.jsonl"
    rows = path.read_text().splitlines()
    bad = json.loads(rows[3])
    bad["tags"] = bad["tags"][:-1]
    path.write_text("\n".join([*rows[:3], json.dumps(bad), *rows[4:]]) + "\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    assert "row" in (err := capsys.readouterr().err) and "give every word one tag" in err


def test_a_teacher_used_as_it_is_needs_a_tagging_head(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    seq = tmp_path / "seq"
    make_bert().save_pretrained(seq)
    make_tokenizer(seq)
    text = recipe.read_text().replace(str(tmp_path / "teacher"), str(seq)).replace(
        "epochs: 3, batch_size: 8", "finetune: false, epochs: 3, batch_size: 8")
    recipe.write_text(text)
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "teacher.model: BertForSequenceClassification is not a token classifier" in err
    assert not (tmp_path / "out" / "teacher").exists()
