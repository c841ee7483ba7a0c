"""Distil a tiny BERT classifier and a tiny Llama under FSDP2, the teacher sharded too.

    python tests/scripts/fsdp_distill.py OUT PER_DEVICE_BATCH
    accelerate launch --config_file fsdp2.yaml tests/scripts/fsdp_distill.py OUT PER_DEVICE_BATCH

with the FSDP2 config of tests/test_fsdp.py (that of docs/scale-out.md, on 2 CPU processes);
the script sets FSDP_TRANSFORMER_CLS_TO_WRAP (``fsdp_transformer_layer_cls_to_wrap``) for each
model. Writes OUT/{bert,llama}/student and, when launched, OUT/{bert,llama}/shards-RANK.json:
the parameter elements of teacher and student this rank holds, and the whole models' counts.
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student  # noqa: E402
from tests.conftest import LABELS, make_bert, make_llama, make_texts, make_tokenizer  # noqa: E402


def allow_fsdp_on_cpu() -> None:
    """accelerate (1.15) sets up FSDP only on accelerator devices: on CPU its state stays
    MULTI_CPU and the Trainer would wrap the student in DDP. Switch the Trainer's Accelerator
    to FSDP after it is built, with the plugin read from the FSDP_* variables as accelerate
    does. FSDP2 itself (fully_shard) runs on CPU with gloo."""
    import accelerate
    import transformers.trainer
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CPUFSDPAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
                # both shared states, as AcceleratorState.__init__ itself does
                self.state.distributed_type = DistributedType.FSDP
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    transformers.trainer.Accelerator = CPUFSDPAccelerator


def local_elements(model: torch.nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel()
               for p in model.parameters())


def bert_run(out: Path):
    teacher = make_bert(num_layers=4, seed=0)
    for module in teacher.modules():  # no dropout: ranks draw different masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():
        student.classifier.weight.mul_(-1.0)  # start away from the teacher
    tokenizer = make_tokenizer(out / "tok")
    texts, labels = make_texts(64, seed=5)
    data = Dataset.from_dict({"text": texts, "labels": [LABELS.index(x) for x in labels]})
    # fixed length: the same padding whether a batch is split over ranks or not
    data = data.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=24),
                    batched=True, remove_columns=["text"])
    settings = dict(learning_rate=0.5, temperature=2.0, alpha_ce=0.5, alpha_distill=0.5)
    return teacher, student, data, dict(tokenizer=tokenizer), "BertLayer", settings


def llama_run(out: Path):
    teacher = make_llama(num_layers=4, seed=0)
    with torch.no_grad():  # far-from-flat next-token distributions: something to learn
        for p in teacher.parameters():
            if p.dim() == 2:
                p.mul_(8)
    student = make_student(teacher, num_layers=2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, teacher.config.vocab_size, (64, 12), generator=g).tolist()
    # every position labelled: each rank's token mean covers as many tokens as the other's
    data = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in ids]
    # the teacher's distribution alone: the student learns only what the sharded teacher says
    settings = dict(learning_rate=0.1, distill_loss="forward_kl", temperature=1.0,
                    alpha_ce=0.0, alpha_distill=1.0, kd_chunk_tokens=16)
    return (teacher, student, data, dict(data_collator=default_data_collator),
            "LlamaDecoderLayer", settings)


def main(out: str, per_device: int) -> None:
    distributed = "LOCAL_RANK" in os.environ  # set by accelerate launch / torchrun
    if distributed:
        allow_fsdp_on_cpu()
    for name, build in (("bert", bert_run), ("llama", llama_run)):
        folder = Path(out) / name
        teacher, student, data, extra, layer, settings = build(folder)
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = layer  # fsdp_transformer_layer_cls_to_wrap
        total = {"teacher": local_elements(teacher), "student": local_elements(student)}
        args = DistillationTrainingArguments(
            output_dir=str(folder), per_device_train_batch_size=per_device, max_steps=6,
            # plain SGD: Adam turns float noise in near-zero gradients into whole steps
            optim="sgd", warmup_steps=0, weight_decay=0.0, save_strategy="no", logging_steps=1,
            report_to="none", use_cpu=True, seed=0, ddp_backend="gloo" if distributed else None,
            **settings)
        trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher,
                                      train_dataset=data, **extra)
        assert trainer.teacher_sharded == distributed
        trainer.train()
        if distributed:  # after training: the teacher is still sharded
            shards = {"teacher": local_elements(teacher), "student": local_elements(trainer.model),
                      "total": total, "student_class": type(trainer.model).__name__,
                      "teacher_class": type(teacher).__name__}
            rank = trainer.args.process_index
            (folder / f"shards-{rank}.json").write_text(json.dumps(shards))
        trainer.save_model(str(folder / "student"))
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
