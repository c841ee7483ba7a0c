"""Distil a tiny student with DistillationTrainer; run alone or under torchrun (gloo, CPU).

    python tests/scripts/ddp_distill.py OUT PER_DEVICE_BATCH
    torchrun --nproc_per_node=2 tests/scripts/ddp_distill.py OUT PER_DEVICE_BATCH
"""

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student  # noqa: E402
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer  # noqa: E402


def main(out: str, per_device: int) -> None:
    teacher = make_bert(num_layers=4, seed=0)
    for module in teacher.modules():  # no dropout: ranks draw different masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():
        student.classifier.weight.mul_(-1.0)  # start away from the teacher
    tokenizer = make_tokenizer(Path(out) / "tok")
    texts, labels = make_texts(64, seed=5)
    data = Dataset.from_dict({"text": texts, "labels": [LABELS.index(x) for x in labels]})
    # fixed length: the same padding whether a batch is split over ranks or not
    data = data.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=24),
                    batched=True, remove_columns=["text"])
    args = DistillationTrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=6,
        # plain SGD: Adam turns float noise in near-zero gradients into whole steps
        optim="sgd", learning_rate=0.5, warmup_steps=0, weight_decay=0.0, save_strategy="no",
        logging_steps=1, report_to="none", use_cpu=True, seed=0,
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None,  # set by torchrun
        temperature=2.0, alpha_ce=0.5, alpha_distill=0.5)
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher,
                                  train_dataset=data, tokenizer=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(out) / "student"))
    if trainer.is_world_process_zero():
        # the teacher stayed out of DDP and in eval mode on every rank
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
