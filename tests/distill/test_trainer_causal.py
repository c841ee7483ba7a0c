"""DistillationTrainer on causal language models: token-level KD, live teacher or cache."""

import pytest
import torch
import torch.nn.functional as F
from transformers import default_data_collator

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from edgedistill.distill import CausalLMDistillationTrainer
from edgedistill.distill.losses.token import forward_kl
from edgedistill.distill.teacher_cache import TeacherCacheDataset, decoder_of
from edgedistill.distill.token_kd import teacher_topk
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_llama


def blocks(n=32, length=12, vocab=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * length, "labels": r.tolist()}
            for r in ids]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                distill_loss="forward_kl", temperature=1.0, per_device_train_batch_size=8,
                prediction_loss_only=True, learning_rate=1e-2, logging_steps=1, save_strategy="no")
    return DistillationTrainingArguments(**{**base, **kw})


def batch(rows):
    return default_data_collator(rows)


def test_loss_is_ce_plus_forward_kl_of_shifted_positions(tmp_path):
    teacher = make_llama(num_layers=4)
    student = make_student(teacher, num_layers=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=args(tmp_path, alpha_ce=0.3, alpha_distill=0.7,
                                            kd_chunk_tokens=5))
    # the one entry point builds the trainer of the model's kind
    assert type(trainer) is CausalLMDistillationTrainer and trainer.reshard_teacher_root is False
    inputs = batch(blocks(4))
    student.train()
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"]).logits[:, :-1]
        t = teacher(input_ids=inputs["input_ids"]).logits[:, :-1]
    ce = F.cross_entropy(s.reshape(-1, s.size(-1)), inputs["labels"][:, 1:].reshape(-1))
    kd = forward_kl(F.log_softmax(s, -1), F.log_softmax(t, -1)).mean()
    assert float(loss.detach()) == pytest.approx(float(0.3 * ce + 0.7 * kd), rel=1e-4)
    # evaluation reports the next-token loss alone: eval_loss is log(perplexity)
    student.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(student, inputs)) == pytest.approx(float(ce), rel=1e-4)


def sharp_llama(num_layers=4):
    """A tiny Llama whose next-token distributions are far from flat (a random one's are
    nearly uniform, which leaves a student nothing to learn)."""
    model = make_llama(num_layers=num_layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def test_training_from_a_cache_never_runs_the_teacher_and_learns(tmp_path):
    teacher = sharp_llama()
    rows = blocks(32)
    ids = torch.tensor([r["input_ids"] for r in rows])
    with torch.inference_mode():  # k = the whole vocabulary: the cache is exact
        logprobs, indices = teacher_topk(decoder_of(teacher)(input_ids=ids).last_hidden_state,
                                         teacher.get_output_embeddings(), 24)
    train = TeacherCacheDataset(rows, logprobs, indices)
    student = make_student(teacher, num_layers=2)
    trainer = DistillationTrainer(model=student, args=args(tmp_path, num_train_epochs=4,
                                                           learning_rate=3e-3, alpha_ce=0.0,
                                                           alpha_distill=1.0),
                                  train_dataset=train, data_collator=default_data_collator)

    def kd_to_teacher():
        with torch.no_grad():
            s = student(input_ids=ids).logits
            t = teacher(input_ids=ids).logits
        return float(forward_kl(F.log_softmax(s, -1), F.log_softmax(t, -1)).mean())

    before = kd_to_teacher()
    trainer.train()
    assert kd_to_teacher() < 0.7 * before
    logged = [h for h in trainer.state.log_history if "loss_distill" in h]
    assert logged and logged[-1]["loss_distill"] < logged[0]["loss_distill"]


@pytest.mark.parametrize("kw, message", [
    (dict(distill_loss="soft_cross_entropy"), "a causal LM takes a token-level loss"),
    (dict(matches=[{"loss": "hidden_mse"}]), "not supported for causal LMs"),
    (dict(kd_chunk_tokens=0), "kd_chunk_tokens"),
])
def test_causal_settings_that_cannot_work_fail_at_once(tmp_path, kw, message):
    teacher = make_llama(num_layers=2)
    with pytest.raises(EdgeDistillError, match=message):
        DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                            args=args(tmp_path, **kw))


def test_vocabulary_mismatch_fails_before_training(tmp_path):
    teacher = make_llama(num_layers=2)
    student = make_llama(num_layers=1, vocab_size=30)
    with pytest.raises(EdgeDistillError, match="vocabularies differ"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path))


def test_a_subclass_gets_a_clear_error_for_the_other_kind_of_model(tmp_path):
    teacher = make_llama(num_layers=2)

    class Mine(DistillationTrainer):
        pass

    with pytest.raises(EdgeDistillError, match="trained by CausalLMDistillationTrainer; "
                                               "subclass that class"):
        Mine(model=make_student(teacher, num_layers=1), teacher_model=teacher,
             args=args(tmp_path))

    class MineCausal(CausalLMDistillationTrainer):
        pass

    trainer = MineCausal(model=make_student(teacher, num_layers=1), teacher_model=teacher,
                         args=args(tmp_path))
    assert isinstance(trainer, CausalLMDistillationTrainer)
