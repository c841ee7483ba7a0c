"""README's Python API section, step by step, on a tiny random BERT: the public names and their
simple keyword forms keep working, and the config-whole forms the pipeline uses agree with them."""

import json

from datasets import Dataset
from transformers import DataCollatorWithPadding

from edgedistill import (DistillationTrainer, DistillationTrainingArguments, benchmark,
                         export_onnx, make_student, quantize, resolve_target)
from edgedistill.bench import BenchSettings
from edgedistill.recipe_blocks import QuantizeConfig
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer


def test_readme_api_section(tmp_path):
    teacher, tok = make_bert(num_layers=4), make_tokenizer(tmp_path / "tok")
    texts, labels = make_texts(32)
    train = Dataset.from_dict({"text": texts, "label": [LABELS.index(x) for x in labels]})
    train = train.map(lambda b: tok(b["text"], truncation=True, max_length=32), batched=True)

    student = make_student(teacher, layers="uniform", num_layers=2)
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), temperature=2.0,
                                         alpha_ce=0.5, alpha_distill=0.5, num_train_epochs=1,
                                         per_device_train_batch_size=8, report_to="none")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                                  tokenizer=tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 2

    export_onnx(tmp_path / "student", tmp_path / "onnx")
    simple = quantize(tmp_path / "onnx", tmp_path / "int8", profile="cpu")
    # the pipeline's form: the recipe block and the run's resolved profile, whole
    whole = quantize(tmp_path / "onnx", tmp_path / "int8-whole", QuantizeConfig(),
                     resolve_target("cpu"))
    assert simple == whole and simple["mode"] == "dynamic"

    settings = BenchSettings(warmup=1, iterations=3, min_seconds=0.0, sequence_length=16,
                             real_length_samples=0, rounds=1)
    results = benchmark([tmp_path / "student", tmp_path / "onnx", tmp_path / "int8"],
                        profile="cpu", settings=settings, progress=False)
    assert [r["latency"]["p50_ms"] > 0 for r in results] == [True] * 3
