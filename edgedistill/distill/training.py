"""Training stages built on DistillationTrainer: fine-tune a teacher, distil a student.

Both use the same Trainer set-up (evaluate and checkpoint every epoch, keep the best epoch by
the task's validation metric, resume from the last checkpoint of an interrupted run).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback

from .. import distributed, progress
from ..artifacts import write_atomic
from ..data import TaskData, lm_blocks, tokenize
from ..evaluation import classification_metrics
from ..recipe_blocks import (
    DataConfig,
    DistillConfig,
    DistributedConfig,
    GenerateConfig,
    StudentConfig,
    TeacherConfig,
    TrainingConfig,
    TransferConfig,
)
from .augmentation import paraphrase
from .matching import PROJECTIONS
from .qat import attach_fake_quant, remove_fake_quant
from .student import build_student, student_tokenizer
from .teacher_cache import (
    TeacherCacheDataset,
    build_teacher_cache,
    cache_fingerprint,
    load_teacher_cache,
)
from .teacher_generations import teacher_generations, with_generations
from .teacher_outputs import with_teacher_logits
from .trainer import DistillationTrainer, DistillationTrainingArguments
from .transfer import build_transfer_set, join_transfer, load_unlabelled

log = logging.getLogger(__name__)


def class_weights(data: TaskData, how: str) -> list[float] | None:
    """Inverse-frequency weights (sklearn's 'balanced'): n / (k * count_c)."""
    if how == "none":
        return None
    counts = np.bincount(list(data.train["label"]), minlength=len(data.labels)).astype(float)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1.0))).tolist()


def _arguments(task, cfg: TrainingConfig, data: TaskData, out: Path, seed: int,
               parallel: DistributedConfig | None, where: str,
               **distill) -> DistillationTrainingArguments:
    """Training arguments shared by every training stage; the task says how the best epoch is
    chosen (``task.selection``). ``where`` names the block (``distill.``) in errors."""
    world = distributed.current()
    batch = distributed.per_device_batch(cfg.batch_size, parallel or DistributedConfig(),
                                         world.size, f"{where}batch_size")
    # under a launcher on a machine without GPUs, accelerate trains on several CPU processes
    # only when told to use the CPU; otherwise each process would train alone
    several = {"use_cpu": not torch.cuda.is_available()} if world.size > 1 else {}
    return DistillationTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, per_device_train_batch_size=batch,
        optim=cfg.optimizer, **several, warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, group_by_length=cfg.group_by_length,
        eval_strategy="epoch",
        save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        logging_strategy="epoch", report_to="none", seed=seed, data_seed=seed,
        dataloader_pin_memory=False, save_safetensors=True, disable_tqdm=False,
        **task.selection(cfg, data), **distill)


def _metrics_fn(labels: list[str]):
    def compute(pred):
        m = classification_metrics(pred.predictions.argmax(-1), pred.label_ids, labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    return compute


def last_good_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in ``folder`` that was written completely, or None.

    The main process writes a checkpoint's ``trainer_state.json`` after its weights, optimizer
    and RNG state, so a checkpoint without a readable one was cut off mid-write (a killed run).
    Under a launcher every other process writes its own ``rng_state_<rank>.pth`` at the same
    time, and a kill can cut one of those after the main process has finished: each must be a
    whole zip (torch's file format; its CRCs are checked without unpickling anything). A missing
    one is fine (the Trainer then goes on without restoring that process's RNG). A cut
    checkpoint is removed, and the one before it is used.
    """
    if not folder.is_dir():
        return None
    checkpoints = sorted(folder.glob("checkpoint-*"), reverse=True,
                         key=lambda p: int(p.name.rpartition("-")[2] or -1))
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            for rng in checkpoint.glob("rng_state*.pth"):
                with zipfile.ZipFile(rng) as z:
                    if z.testzip() is not None:
                        raise ValueError(f"{rng.name} is corrupt")
            return str(checkpoint)
        except (OSError, ValueError, zipfile.BadZipFile):
            log.warning("removing %s: it was not completely written", checkpoint.name)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def classifier_sets(tokenizer, args, data: TaskData, data_cfg: DataConfig, teacher=None,
                    cache_dir: Path | None = None, cache_top_k: int = 64,
                    transfer: TransferConfig | None = None, transfer_cache: Path | None = None,
                    teacher_tokenizer=None):
    """A classifier's training and validation sets (the teacher's logits added once when only
    logits are distilled), collator, metrics, the teacher the trainer still runs, and the
    transfer record. ``tokenizer`` is the student's; ``teacher_tokenizer`` the teacher's when
    the student has its own (the teacher then only labels, before training). ``cache_dir``,
    ``cache_top_k`` and ``transfer_cache`` serve language models only; the signature is the
    one every task's ``training_sets`` has."""
    extra, length = {}, data_cfg.max_length
    train = tokenize(data.train, tokenizer, length)
    validation = tokenize(data.validation, tokenizer, length)
    collator, metrics = DataCollatorWithPadding(tokenizer), _metrics_fn(data.labels)
    logits = teacher is not None and args.alpha_distill > 0 and not args.matches
    if logits:
        train = with_teacher_logits(train, data.train, teacher, tokenizer, teacher_tokenizer,
                                    length)
        validation = with_teacher_logits(validation, data.validation, teacher, tokenizer,
                                         teacher_tokenizer, length)
    if transfer is not None and transfer.active:
        train, extra["transfer"] = classifier_transfer(
            train, transfer, data, teacher, tokenizer, length, args.seed, logits,
            teacher_tokenizer)
    # the teacher reads other token ids than the student: it has done its part
    live_teacher = teacher if teacher_tokenizer is None else None
    return train, validation, collator, metrics, live_teacher, extra


def lm_sets(tokenizer, args, data: TaskData, data_cfg: DataConfig, teacher=None,
            cache_dir: Path | None = None, cache_top_k: int = 64,
            transfer: TransferConfig | None = None, transfer_cache: Path | None = None,
            teacher_tokenizer=None):
    """A language model's fixed-length token blocks for training (with the transfer set's
    text and teacher generations, and the teacher's cached top-k when ``cache_dir`` is given:
    the trainer then never runs the teacher) and validation, as :func:`classifier_sets`.
    ``teacher_tokenizer`` is always None here: preflight refuses a language-model student
    with a tokenizer of its own (its targets are per token)."""
    extra = {}
    if transfer is not None and transfer.active:
        train, extra["transfer"] = lm_transfer(transfer, data, teacher, tokenizer,
                                               data_cfg.max_length, args.seed, transfer_cache)
    else:
        train = lm_blocks(data.train, tokenizer, data_cfg.max_length)
    validation = lm_blocks(data.validation, tokenizer, data_cfg.max_length)
    if cache_dir is not None and teacher is not None and args.alpha_distill > 0:
        train = _cached_teacher(train, teacher, tokenizer, args, data_cfg, cache_dir, cache_top_k)
        teacher = None  # the cache replaces it: training never runs the teacher
    return train, validation, default_data_collator, None, teacher, extra


def _fit(model, tokenizer, args, out: Path, prepared: tuple, callbacks=()) -> dict:
    """Train ``model`` on ``prepared`` (a task's ``training_sets``) with best-epoch selection
    and resume from the last complete checkpoint; ``callbacks``: more TrainerCallbacks."""
    trainer = _trainer(model, tokenizer, args, prepared, callbacks)
    last = last_good_checkpoint(out / "checkpoints")
    if last:
        log.warning("resuming training from %s", Path(last).name)
    result = trainer.train(resume_from_checkpoint=last)
    selection = _selection(trainer.state.log_history, args)  # before evaluate() adds a row
    best = trainer.evaluate()
    trainer.save_model(str(out / "model"))  # by the main process (the Trainer sees to it)
    # Checkpoints only serve a resume; the finished stage keeps the best model alone.
    if distributed.is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"train_seconds": result.metrics.get("train_runtime"),
            "train_loss": result.metrics.get("train_loss"),
            "validation": {k.removeprefix("eval_"): v for k, v in best.items()},
            "selection": selection, "log_history": trainer.state.log_history, **prepared[-1]}


# A last epoch that moved the validation metric by less than this fraction of it moved it within
# the noise of a validation split of a few hundred rows (macro-F1 0.837 -> 0.839 on tweets-mpnet's
# 800): no sign that training stopped too early.
STILL_LEARNING = 0.005


def _selection(history: list[dict], args) -> dict:
    """The metric that chose the best epoch, its value after each epoch, and whether the last
    epoch still improved it by more than ``STILL_LEARNING`` of its value: then training stopped
    while the model was still learning (the report flags an under-fit teacher)."""
    metric = args.metric_for_best_model
    values = [h[f"eval_{metric}"] for h in history if f"eval_{metric}" in h]
    sign = 1 if args.greater_is_better else -1  # compare as "higher is better"
    improved = False
    if len(values) >= 2:
        best = max(sign * v for v in values[:-1])
        improved = sign * values[-1] - best > STILL_LEARNING * abs(best)
    return {"metric": metric, "greater_is_better": bool(args.greater_is_better),
            "per_epoch": values, "last_epoch_improved": improved}


def _trainer(model, tokenizer, args, prepared: tuple, callbacks=()) -> DistillationTrainer:
    train, validation, collator, metrics, teacher, _ = prepared
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=validation,
        processing_class=tokenizer, data_collator=collator,
        compute_metrics=metrics, teacher_model=teacher, callbacks=list(callbacks))
    # one bar and a compact line per epoch instead of transformers' bars and raw dicts
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingProgress)
    return trainer


# timing fields of an evaluation log: what a reader of the run's log does not act on
_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


def log_line(logs: dict) -> str:
    """One compact line for a Trainer log: 'epoch 2: loss 0.4120 (ce 0.2060, distill 0.2060)'
    after training steps, 'epoch 2: validation loss 0.8110, macro_f1 0.4430' after an
    evaluation."""
    parts = []
    if "loss" in logs:
        each = ", ".join(f"{k[5:]} {v:.4f}" for k, v in logs.items() if k.startswith("loss_"))
        parts.append(f"loss {logs['loss']:.4f}" + (f" ({each})" if each else ""))
    evaluated = [f"{k[5:]} {v:.4f}" for k, v in logs.items() if k.startswith("eval_")
                 and k[5:] not in _TIMINGS and isinstance(v, (int, float))]
    if evaluated:
        parts.append("validation " + ", ".join(evaluated))
    if "train_runtime" in logs:
        parts.append(f"trained in {logs['train_runtime']:.0f} s")
    return f"epoch {logs.get('epoch', 0):g}: " + "; ".join(parts)


class TrainingProgress(TrainerCallback):
    """A bar over the training steps (epoch and the last logged loss beside it) on the stage's
    display, :func:`log_line` for each Trainer log, and the raw log in the stage's log file.
    Evaluation inside training gets no bar of its own: it is short, and nested bars garble."""

    def __init__(self):
        self.bar: progress.Bar | None = None
        self.loss = ""  # the last logged training loss, shown beside the bar
        self.trained = False  # a log after training is the kept epoch's evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress.Bar("train", total=state.max_steps)
            self.bar.update(completed=state.global_step)  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(completed=state.global_step,
                            status=f"epoch {state.epoch or 0:.1f}{self.loss}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        log.info("trainer log: %s", logs)
        if "loss" in logs:
            self.loss = f", loss {logs['loss']:.4f}"
        line = log_line(logs)
        if self.trained:
            line = "kept the best epoch:" + line.split(":", 1)[1]
        progress.note(f"  {line}")

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluation_texts(data: TaskData) -> list[str]:
    """Texts a transfer set must never contain: the validation and test splits'."""
    return [*data.validation["text"], *data.test["text"]]


def unlabelled_texts(cfg: TransferConfig, data: TaskData, seed: int,
                     labelled: Sequence[str] = ()) -> dict[str, list[str]]:
    """Each unlabelled source's texts. ``labelled`` texts (a classifier's training rows) are
    left out before ``max_samples`` draws its sample, so that a source holding them (the
    training split of the data set whose labelled subset is trained on) yields that many new
    texts."""
    exclude = [*evaluation_texts(data), *labelled]
    return {u.source: load_unlabelled(asdict(u), data.train, exclude, seed=seed)
            for u in cfg.unlabelled}


def classifier_transfer(train, cfg: TransferConfig, data: TaskData, teacher, tokenizer,
                        max_length: int, seed: int, logits: bool, teacher_tokenizer=None):
    """The tokenized training split followed by the transfer set (augmented variants of the
    training texts and unlabelled texts, labelled by the teacher), and the set's record."""
    aug, texts = cfg.augment, list(data.train["text"])
    seed = seed if aug.seed is None else aug.seed
    paraphrased, seconds = paraphrase(texts, aug.paraphraser, aug.paraphrases, seed) \
        if aug.paraphrases else ([], 0.0)
    transfer, record = build_transfer_set(
        texts, teacher, tokenizer, factor=aug.factor, methods=aug.methods, seed=seed,
        unlabelled=unlabelled_texts(cfg, data, seed, labelled=texts),
        exclude=evaluation_texts(data),
        max_length=max_length, batch_size=cfg.batch_size, logits=logits, paraphrased=paraphrased,
        teacher_tokenizer=teacher_tokenizer)
    log.info("transfer set: %d rows %s", record["size"], record["sources"])
    return join_transfer(train, transfer), {**record, "training_rows": len(train),
                                            "paraphrase_seconds": round(seconds, 3)}


def lm_transfer(cfg: TransferConfig, data: TaskData, teacher, tokenizer, block_size: int,
                seed: int, cache_dir: Path | None):
    """A language model's training blocks with the unlabelled text packed in, followed by the
    teacher's continuations of training-text prompts (sequence-level KD), and their record."""
    unlabelled = unlabelled_texts(cfg, data, seed)
    texts = [*data.train["text"], *(t for group in unlabelled.values() for t in group)]
    blocks = lm_blocks(Dataset.from_dict({"text": texts}), tokenizer, block_size)
    own = len(lm_blocks(data.train, tokenizer, block_size)) if unlabelled else len(blocks)
    sources = {"unlabelled": len(blocks) - own} if unlabelled else {}
    record = {"size": len(blocks) - own, "training_rows": own, "sources": sources,
              "unlabelled_texts": {k: len(v) for k, v in unlabelled.items()},
              "teacher_seconds": 0.0}
    gen = cfg.generate
    if not gen.prompts:
        return blocks, record
    generated, gen_record = teacher_generations(
        teacher, tokenizer, list(data.train["text"]), prompts=gen.prompts,
        prompt_tokens=gen.prompt_tokens, new_tokens=gen.new_tokens, temperature=gen.temperature,
        top_p=gen.top_p, seed=seed if gen.seed is None else gen.seed, block_size=block_size,
        batch_size=cfg.batch_size, cache_dir=cache_dir)
    blocks = with_generations(blocks, generated)
    record.update(size=record["size"] + len(generated), generations=gen_record,
                  teacher_seconds=gen_record["teacher_seconds"])
    record["sources"]["teacher generations"] = len(generated)
    return blocks, record


def _cached_teacher(train, teacher, tokenizer, args, data_cfg: DataConfig, cache_dir: Path,
                    top_k: int):
    """The training blocks with the teacher's top-k log-probabilities, from the cache (built
    first where missing or made from other inputs)."""
    ids = torch.tensor(train["input_ids"])
    mask = torch.tensor(train["attention_mask"])
    fp = cache_fingerprint(teacher, tokenizer, ids, data_cfg.max_length, top_k, args.temperature)
    # under torchrun each rank computes its share of the shards; the barrier waits for all
    build_teacher_cache(teacher, ids, mask, cache_dir, top_k, args.temperature, fp,
                        batch_size=args.per_device_train_batch_size, rank=args.process_index,
                        world_size=args.world_size)
    if args.world_size > 1:
        torch.distributed.barrier()
    logprobs, indices = load_teacher_cache(cache_dir, fp)
    return TeacherCacheDataset(train, logprobs, indices)


def finetune_teacher(task, model_path: Path, cfg: TeacherConfig, data: TaskData,
                     data_cfg: DataConfig, out: Path, seed: int,
                     parallel: DistributedConfig | None = None) -> dict:
    """Fit the teacher on the task (``task.new_head`` says what head it gets: a classifier a
    fresh one for the labels, a language model none). Under a launcher every process trains
    (``parallel`` says how the batch is split) and the main one writes."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    model = task.load_model(model_path, cfg.trust_remote_code, **task.new_head(data.labels))
    if not cfg.finetune:
        if distributed.is_main():
            task.save_model(model, tokenizer, out / "model")
        return {"finetuned": False}
    # the teacher learns from its labels (or its text) alone: no soft-target loss to name
    args = _arguments(task, cfg, data, out, seed, parallel, "teacher.", alpha_ce=1.0,
                      alpha_distill=0.0)
    record = _fit(model, tokenizer, args, out, task.training_sets(tokenizer, args, data, data_cfg))
    if distributed.is_main():
        tokenizer.save_pretrained(out / "model")
    return {"finetuned": True, **record}


def _quantization_aware(student, tokenizer, args, cfg: DistillConfig, scheme, out: Path,
                        prepared: tuple) -> dict:
    """The int8-aware phase: the distilled student trains on through fake quantization
    (edgedistill.distill.qat) at a lower learning rate and keeps its best epoch by validation
    macro-F1 *as int8*. That epoch replaces the float phase's model in ``out / 'model'`` (as a
    plain float model) only if it beats the float phase's model scored as int8 the same way:
    the phase may lose accuracy on a small validation split, and must not ship that loss."""
    count = attach_fake_quant(student, scheme)
    lr = cfg.qat_learning_rate if cfg.qat_learning_rate is not None else cfg.learning_rate / 10
    qat_args = copy.deepcopy(args)  # not dataclasses.replace: that would rerun __post_init__
    qat_args.num_train_epochs, qat_args.learning_rate = cfg.qat_epochs, lr
    qat_args.output_dir = str(out / "qat" / "checkpoints")
    metric = qat_args.metric_for_best_model
    # the float phase's sets: the teacher labels and the transfer set are not made twice
    before = _trainer(student, tokenizer, qat_args, prepared).evaluate()[f"eval_{metric}"]
    record = _fit(student, tokenizer, qat_args, out / "qat", prepared)
    remove_fake_quant(student)
    kept = record["validation"][metric] > before
    if kept and distributed.is_main():
        if hasattr(student, PROJECTIONS):  # feature-loss projections: training only
            delattr(student, PROJECTIONS)
        student.save_pretrained(out / "model")
    else:
        log.warning("the int8-aware phase did not beat the float phase's model as int8 "
                    "(validation %s %.4f vs %.4f): the float phase's model is kept",
                    metric, record["validation"][metric], before)
    if distributed.is_main():
        shutil.rmtree(out / "qat", ignore_errors=True)
    record.pop("log_history", None)
    return {"modules": count, "epochs": cfg.qat_epochs, "learning_rate": lr,
            "scheme": asdict(scheme), "before": {metric: before}, "kept": kept, **record}


def _on_policy_settings(gen: GenerateConfig) -> dict:
    if not gen.prompts or not gen.lmbda:
        return {}
    return dict(lmbda=gen.lmbda, generation_temperature=gen.temperature,
                generation_top_p=gen.top_p, generation_new_tokens=gen.new_tokens)


def distill_student(task, teacher_dir: Path, student_cfg: StudentConfig, cfg: DistillConfig,
                   data: TaskData, data_cfg: DataConfig, out: Path, seed: int,
                   trust_remote_code: bool = False, cache_dir: Path | None = None,
                   transfer: TransferConfig | None = None,
                   transfer_cache: Path | None = None, qat_scheme=None,
                   parallel: DistributedConfig | None = None, callbacks=()) -> dict:
    """Build the student and train it with DistillationTrainer. A causal LM with
    ``cfg.cache_teacher`` trains from the teacher's top-k kept in ``cache_dir``. ``transfer``
    adds teacher-labelled inputs (edgedistill.distill.transfer; a language model's teacher
    generations are kept in ``transfer_cache``). With ``qat_scheme`` (an
    edgedistill.distill.qat.Int8Scheme) a last phase of ``cfg.qat_epochs`` trains through the
    int8 rounding; a stage killed during it resumes with that phase. ``parallel``: as for
    :func:`finetune_teacher`. ``callbacks``: TrainerCallbacks of the float phase (a search's
    trial reports its epochs with one)."""
    set_seed(seed)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir,
                                                      trust_remote_code=trust_remote_code)
    tokenizer = student_tokenizer(teacher_tokenizer, student_cfg)
    teacher = task.load_model(teacher_dir, trust_remote_code).eval()
    student = build_student(task, teacher, student_cfg, teacher_tokenizer, data,
                            data_cfg.max_length, seed)
    args = _arguments(task, cfg, data, out, seed, parallel, "distill.",
                      temperature=cfg.temperature,
                      alpha_ce=cfg.alpha_ce, alpha_distill=cfg.alpha_distill,
                      distill_loss=cfg.distill_loss, loss_options=dict(cfg.loss_options),
                      matches=[asdict(m) for m in cfg.matches],
                      **(_on_policy_settings(transfer.generate) if transfer else {}))
    # the task's preflight refuses cache_teacher where it does not apply
    prepared = task.training_sets(tokenizer, args, data, data_cfg, teacher=teacher,
                                  cache_dir=cache_dir if cfg.cache_teacher else None,
                                  cache_top_k=cfg.cache_top_k, transfer=transfer,
                                  transfer_cache=transfer_cache,
                                  teacher_tokenizer=None if tokenizer is teacher_tokenizer
                                  else teacher_tokenizer)
    finished = out / "distilled.json"  # the float phase's record, once its model is saved
    if qat_scheme is not None and finished.is_file():
        log.warning("float distillation already finished; resuming with the int8-aware phase")
        record = json.loads(finished.read_text())
        student = task.load_model(out / "model")
    else:
        record = _fit(student, tokenizer, args, out, prepared, callbacks)
    if qat_scheme is not None:
        if distributed.is_main():
            write_atomic(finished, json.dumps(record, default=str))
        record["qat"] = _quantization_aware(student, tokenizer, args, cfg, qat_scheme, out,
                                            prepared)
        if distributed.is_main():
            finished.unlink()
    if distributed.is_main():
        tokenizer.save_pretrained(out / "model")
    return {"teacher_layers": getattr(student.config, "edgedistill_teacher_layers", None),
            "parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()), **record}
