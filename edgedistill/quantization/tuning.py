"""Accuracy-aware int8 tuning: the fastest quantization setting whose metric stays within
``tolerable_loss`` of the fp32 model's (1% relative by default, the MLPerf bar).

The search is Intel Neural Compressor's framework-neutral tuner
(``neural_compressor.common.base_tuning``): our settings are an INC ``BaseConfig`` subclass
(:class:`OrtInt8Config`), whose list-valued fields INC expands into trials; INC's
``ConfigLoader`` hands them out in order, its ``Evaluator`` scores each model, and its
``TuningMonitor`` keeps the history and says when to stop (the first trial within tolerance, or
``max_trials``). What is ours is the glue: turning a config into an :func:`quantize` call, the
metric, the indicative latency, and the ranking of the nodes to keep in fp32.

Trials, in order of expected speed (:data:`SETTINGS`), then fallback trials that keep the most
harmful nodes of the best-scoring setting in fp32, in growing groups (:data:`FALLBACK_GROUPS`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import onnx
from neural_compressor.common.base_config import BaseConfig
from neural_compressor.common.base_tuning import Evaluator, TuningConfig, init_tuning
from neural_compressor.common.tuning_param import TuningParam
from neural_compressor.common.utils import DEFAULT_WHITE_LIST

from ..artifacts import onnx_file
from ..errors import EdgeDistillError
from ..evaluation import classification_metrics
from ..profiles import Profile, Target, resolve_target
from ..recipe_blocks import QuantizeConfig
from ..runtime.session import open_onnx_session
from .graph import fuse_graph
from .int8 import quantize, settle

# The base settings, fastest first as measured on the default task (benchmarks/results/
# quantization.md, batch 1 x 128: static percentile 3.99 ms, static minmax 4.09, dynamic fused
# 4.26, fp32 8.01). Both modes run the fused graph with the attention as integer QAttention;
# static skips the per-call range of every other MatMul input. Percentile also kept macro-F1
# best (within 1% of fp32 on each seed), so it leads. Dynamic unfused is last: not timed there,
# but the fusions exist to make it faster (one QAttention for Q, K, V and the softmax, fused
# layer norms), and it is a different rounding of the same graph, so it may hold a metric that
# the fused settings lose. Without calibration texts the static settings are skipped.
SETTINGS = {
    "static-percentile": {"mode": "static", "calibration": "percentile"},
    "static-minmax": {"mode": "static", "calibration": "minmax"},
    "dynamic-fused": {"mode": "dynamic", "fuse": True},
    "dynamic-unfused": {"mode": "dynamic", "fuse": False},
}
# A fallback trial's base: the setting that scored best among the ones tried (the one closest
# to the tolerance needs the fewest nodes in fp32, and each fp32 node costs latency).
BEST = "best"
# Nodes kept in fp32 per fallback trial: doubling reaches a passing group in few trials.
FALLBACK_GROUPS = [1, 2, 4, 8, 16, 32]
RANKING_TEXTS = 256  # at most this many of the tuning texts rank the nodes


class OrtInt8Config(BaseConfig):
    """One trial for INC's tuner: a base setting (a key of :data:`SETTINGS`, or ``"best"``) and
    how many of its most harmful nodes stay fp32. A list in either field is a tuning space,
    expanded by INC's ``BaseConfig.expand`` into one config per value."""

    name = "edgedistill_ort_int8"
    # explicit TuningParams tell INC's expand() a list (a tuning space) from a single value;
    # left to itself it reads __init__'s annotations, strings under `from __future__` here
    params_list = [TuningParam("setting", tunable_type=List[str]),
                   TuningParam("keep_fp32", tunable_type=List[int])]

    def __init__(self, setting: str | list[str] = "dynamic-fused", keep_fp32: int | list[int] = 0,
                 white_list=DEFAULT_WHITE_LIST):
        super().__init__(white_list=white_list)
        self.setting = setting
        self.keep_fp32 = keep_fp32
        self._post_init()

    @classmethod
    def register_supported_configs(cls) -> None:
        """No per-operator support table: onnxruntime's quantizer decides what it quantizes."""

    @classmethod
    def get_config_set_for_tuning(cls) -> list[OrtInt8Config]:
        """The default tuning space: every base setting, then fallback groups on the best."""
        return [cls(setting=list(SETTINGS)), cls(setting=BEST, keep_fp32=FALLBACK_GROUPS)]


def tune(onnx_dir: str | Path, output_dir: str | Path, texts: list[str],
         labels: list | None = None, label_names: list[str] | None = None,
         config: QuantizeConfig | None = None, profile: str | Profile | Target = "cpu", *,
         calibration_texts: list[str] | None = None, max_length: int = 128,
         batch_size: int = 32, config_set: list[OrtInt8Config] | None = None,
         **settings) -> dict:
    """Quantize the fp32 ONNX classifier in ``onnx_dir`` with the fastest setting that keeps
    its metric within ``tolerable_loss`` (relative) of fp32's on ``texts``, into ``output_dir``.

    Metric (higher is better; INC's rule: pass when ``(fp32 - q) / fp32 <= tolerable_loss``):
    with ``labels``, macro-F1; without, **agreement with fp32**: the share of ``texts`` whose
    predicted class the int8 model keeps (fp32 scores 1.0, so 0.01 allows 1 in 100 to flip).
    Every trial also reports agreement and the mean KL(fp32 || int8) of the class probabilities.
    Use validation or training texts, never the test split the model is reported on.
    ``config`` is the recipe's quantize block (its ``tolerable_loss``, 0.01 when unset, and
    ``max_trials``; its preset and per-channel choice for every trial); keyword ``settings``
    are its fields for SDK users (``tune(..., tolerable_loss=0.02)``).

    Returns ``passed``, ``baseline`` (fp32), ``trials`` (one row each: index, setting,
    kept_fp32, metric, relative_loss, agreement, kl, p50_ms, passed), ``chosen`` (the index of
    the passing trial, or None) and, when one passed, its :func:`quantize` record. Only a passing
    model is written to ``output_dir`` (moved there whole once chosen); when none passes,
    ``output_dir`` is left as it was and ``passed`` is False: nothing there may be shipped as
    meeting the tolerance.
    """
    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    config, target = settle(config, settings), resolve_target(profile)
    if config.tolerable_loss is None:
        config = dataclasses.replace(config, tolerable_loss=0.01)
    tolerable_loss, max_trials = config.tolerable_loss, config.max_trials
    if not texts:
        raise EdgeDistillError("tune: no texts to measure the metric on; pass validation texts "
                               "(never the test split)")
    if labels is not None and len(labels) != len(texts):
        raise EdgeDistillError(f"tune: {len(labels)} labels for {len(texts)} texts; "
                               "pass one label per text, or none")
    if onnx_file(onnx_dir) is None:
        raise EdgeDistillError(f"{onnx_dir}: no .onnx file to quantize; run the export first")
    architectures = json.loads((onnx_dir / "config.json").read_text()).get("architectures")
    if any(a.endswith("ForCausalLM") for a in architectures or []):
        raise EdgeDistillError(f"{onnx_dir}: tuning measures classifiers; quantize a causal LM "
                               "with quantize_int4 (quantize.int4) instead")
    if config_set is None:
        config_set = OrtInt8Config.get_config_set_for_tuning()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # trial models go next to output_dir (same file system), so the chosen one is renamed into
    # place whole and no reader ever sees a half-written model there
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tune-", dir=output_dir.parent))
    inc_logger = logging.getLogger("neural_compressor")
    inc_level = inc_logger.level
    inc_logger.setLevel(logging.WARNING)  # INC prints a table per trial; our rows say the same
    try:
        session = _Trials(onnx_dir, work, texts, labels, label_names, config, target,
                          calibration_texts, max_length, batch_size)
        record = session.run(config_set, tolerable_loss, max_trials)
        if record["chosen"] is not None:
            _move_into_place(work / f"trial-{record['chosen']}", output_dir, work)
        return record
    finally:
        inc_logger.setLevel(inc_level)
        shutil.rmtree(work, ignore_errors=True)


class _Trials:
    """The state one tuning run shares between INC's loop and the glue: the tokenized texts,
    the fp32 outputs, each trial's model and row, and the node ranking (made once, lazily)."""

    def __init__(self, onnx_dir, work, texts, labels, label_names, config, target,
                 calibration_texts, max_length, batch_size):
        from transformers import AutoTokenizer

        self.onnx_dir, self.work = onnx_dir, work
        # every trial quantizes once with the run's block and target, its own setting and fp32
        # nodes on top; the setting decides fusion (the static ones run the profile's fused
        # graph), as when tuning took the preset and per-channel choice alone
        self.config = dataclasses.replace(config, fuse=None, tolerable_loss=None)
        self.target = target
        self.options = {"calibration_texts": calibration_texts, "max_length": max_length}
        self.tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
        self.max_length, self.batch_size = max_length, batch_size
        self.batches = self._encode(texts)
        self.labels, self.label_names = _label_ids(labels, label_names)
        # ranked on the texts the metric is measured on, not the calibration (training) texts:
        # the model fits those confidently, so they show a fraction of the KL (a tenth on the
        # default task's student) and ranked nodes first that did not help on held-out texts
        self.ranking_batches = self._encode(texts[:RANKING_TEXTS])
        # the fixed input the indicative latency is timed on: one text padded to max_length
        self.latency_feed = dict(self.tokenizer(texts[:1], padding="max_length",
                                                truncation=True, max_length=max_length,
                                                return_tensors="np"))
        self.fp32_logits = self.logits(onnx_dir)
        self.fp32_ranking_logits = self.logits(onnx_dir, self.ranking_batches)
        self.rows: list[dict] = []
        self.records: dict[int, dict] = {}
        self.ranking: dict | None = None
        self.skipped: list[str] = []  # configs that would add nothing, and why (not trials)
        self.last: dict = {}  # agreement and KL of the model the metric saw last

    # ------------------------------------------------------------------ INC's loop

    def run(self, config_set, tolerable_loss: float, max_trials: int) -> dict:
        """INC's tuning loop, as its own ``autotune`` writes it for PyTorch: baseline first, then
        one config at a time from the ConfigLoader until the TuningMonitor says stop."""
        tuning_config = TuningConfig(config_set=config_set, tolerable_loss=tolerable_loss,
                                     max_trials=max_trials)
        loader, tuning_logger, monitor = init_tuning(tuning_config)
        evaluator = Evaluator()
        evaluator.set_eval_fn_registry({"eval_fn": self.metric, "name": self.metric_name})
        evaluator.self_check()
        baseline = evaluator.evaluate(self.onnx_dir)
        if baseline <= 0:  # a relative loss needs a positive baseline
            raise EdgeDistillError(
                f"tune: the fp32 model scores {self.metric_name} {baseline:.3f} on the tuning "
                "texts, so no relative loss can be measured; check the labels, or pass none to "
                "tune on agreement with fp32")
        monitor.set_baseline(baseline)
        baseline_row = {"metric": baseline, **self.last, "p50_ms": self.p50_ms(self.onnx_dir)}
        tuning_logger.tuning_start()
        for config in loader:
            plan = self.plan(config)
            if plan is None:
                continue  # nothing new to try (see plan); not a trial, INC counts none
            index = monitor.get_number_of_trials() + 1
            folder = self.work / f"trial-{index}"
            tuning_logger.trial_start(trial_index=index)
            setting, kept = plan
            self.records[index] = {**quantize(self.onnx_dir, folder, self.config, self.target,
                                              **SETTINGS[setting], **self.options,
                                              nodes_to_exclude=kept),
                                   "nodes_to_exclude": kept}
            metric = evaluator.evaluate(folder)
            monitor.add_trial_result(index, metric, config)
            tuning_logger.trial_end(index)
            # INC's own pass rule (TuningMonitor.need_stop), kept per row
            passed = metric >= baseline * (1 - tolerable_loss)
            self.rows.append({"index": index, "setting": setting, "kept_fp32": kept,
                              "metric": metric, "relative_loss": (baseline - metric) / baseline,
                              **self.last, "p50_ms": self.p50_ms(folder), "passed": passed})
            if monitor.need_stop():
                break
        tuning_logger.tuning_end()
        # INC stops at the first pass, so at most one row passes; the trials run in order of
        # expected speed (fewer fp32 nodes first), which makes it the fastest passing one
        chosen = next((r["index"] for r in self.rows if r["passed"]), None)
        return {"passed": chosen is not None, "metric": self.metric_name,
                "tolerable_loss": tolerable_loss, "max_trials": max_trials,
                "baseline": baseline_row, "trials": self.rows, "chosen": chosen,
                "skipped": self.skipped, "ranking": self.ranking,
                **(self.records[chosen] if chosen is not None else {})}

    def plan(self, config: OrtInt8Config) -> tuple[str, list[str]] | None:
        """The setting and the fp32 nodes a config means here; None when it adds nothing."""
        base_rows = [r for r in self.rows if not r["kept_fp32"]]
        if config.keep_fp32 == 0:
            if config.setting not in SETTINGS:
                raise EdgeDistillError(f"tune: setting '{config.setting}' is unknown; valid: "
                                       f"{', '.join(SETTINGS)}")
            static = SETTINGS[config.setting]["mode"] == "static"
            if static and not self.options["calibration_texts"]:
                self.skipped.append(f"{config.setting}: no calibration texts")
                return None
            unfused = any(self.records[r["index"]]["fused"] is None
                          for r in base_rows if r["setting"] == "dynamic-fused")
            if config.setting == "dynamic-unfused" and unfused:
                self.skipped.append(f"{config.setting}: the model type has no fusions, so "
                                    "dynamic-fused was this model already")
                return None
            return config.setting, []
        if not base_rows:
            raise EdgeDistillError("tune: a fallback trial needs a base setting tried before it")
        base = (config.setting if config.setting != BEST
                # ties go to the earlier (expected faster) setting: max keeps the first
                else max(base_rows, key=lambda r: r["metric"])["setting"])
        if self.ranking is None:
            self.ranking = self.rank_nodes(base)
        if self.ranking["base"] != base:
            raise EdgeDistillError("tune: fallback trials on two base settings; use one")
        # only nodes whose fp32 copy lowered the KL are worth their latency, and never all of
        # them (that is no int8 model); a group larger than that takes them all, once
        ranked = self.ranking["nodes"]
        helpful = [n["node"] for n in ranked if n["harm"] > 0][:len(ranked) - 1]
        kept = helpful[:config.keep_fp32]
        if not kept or any(r["kept_fp32"] == kept for r in self.rows):
            self.skipped.append(f"{config.keep_fp32} fp32 nodes: {len(helpful)} of the "
                                f"{len(ranked)} nodes {base} quantizes help in fp32, all tried")
            return None
        return base, kept

    # ------------------------------------------------------------------ metric and latency

    @property
    def metric_name(self) -> str:
        return "macro_f1" if self.labels is not None else "agreement"

    def metric(self, model_dir: Path) -> float:
        """The tuned metric of ``model_dir``; agreement and KL with fp32 go to ``self.last``."""
        logits = self.logits(model_dir)
        predictions = logits.argmax(-1)
        self.last = {"agreement": float(np.mean(predictions == self.fp32_logits.argmax(-1))),
                     "kl": _mean_kl(self.fp32_logits, logits)}
        if self.labels is None:
            return self.last["agreement"]
        return classification_metrics(predictions, self.labels, self.label_names)["macro_f1"]

    def logits(self, model_dir: Path, batches=None) -> np.ndarray:
        session = open_onnx_session(onnx_file(model_dir))
        names = {i.name for i in session.get_inputs()}
        out = []
        for order, enc in batches or self.batches:
            out.append((order, session.run(["logits"], {k: v for k, v in enc.items()
                                                        if k in names})[0]))
        logits = np.empty((sum(len(o) for o, _ in out), out[0][1].shape[-1]), np.float32)
        for order, values in out:
            logits[order] = values
        return logits

    def p50_ms(self, model_dir: Path, runs: int = 50) -> float:
        """Median latency of one padded text in this process: indicative only, to compare the
        trials with each other; the benchmark later times the chosen model in fresh processes."""
        session = open_onnx_session(onnx_file(model_dir))
        names = {i.name for i in session.get_inputs()}
        feed = {k: v.astype(np.int64) for k, v in self.latency_feed.items() if k in names}
        for _ in range(3):
            session.run(["logits"], feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(["logits"], feed)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def _encode(self, texts: list[str]) -> list[tuple[np.ndarray, dict]]:
        """Texts tokenized in batches of similar length (little padding), with their positions."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = []
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            batches.append((idx, {k: np.asarray(v, np.int64) for k, v in enc.items()}))
        return batches

    # ------------------------------------------------------------------ node ranking

    def rank_nodes(self, base: str) -> dict:
        """The nodes ``base`` quantizes, most harmful first, by exclude-one sensitivity: each is
        kept in fp32 alone, and the drop of mean KL(fp32 || int8) on the tuning texts is its
        harm. It costs one quantization per node (13 for the default 2-layer student, about a
        minute on 2 cores), but it needs nothing beyond ``quantize``, its node names are the
        ones ``nodes_to_exclude`` takes in every mode (the fused graph's when fused), and it
        measures each node's effect on the output; a per-tensor error (onnxruntime's
        qdq_loss_debug, for QDQ models only) says little about the logits."""
        index = next(r["index"] for r in self.rows if r["setting"] == base and not r["kept_fp32"])
        base_model = self.work / f"trial-{index}"
        source = self._source_graph(self.records[index]["fused"] is not None)
        operators = self.records[index]["operators"]
        candidates = quantized_nodes(source, _graph(base_model), operators)
        full_kl = _mean_kl(self.fp32_ranking_logits, self.logits(base_model, self.ranking_batches))
        harms = []
        for i, node in enumerate(candidates):
            folder = self.work / f"rank-{i}"
            quantize(self.onnx_dir, folder, self.config, self.target, **SETTINGS[base],
                     **self.options, nodes_to_exclude=[node])
            # a name the quantizer did not take would make every fallback trial a no-op
            if node in quantized_nodes(source, _graph(folder), operators):
                raise RuntimeError(f"tune: excluding node '{node}' left it quantized")
            kl = _mean_kl(self.fp32_ranking_logits, self.logits(folder, self.ranking_batches))
            harms.append({"node": node, "harm": full_kl - kl})
            shutil.rmtree(folder, ignore_errors=True)
        harms.sort(key=lambda h: -h["harm"])  # stable: graph order among equals
        return {"base": base, "method": "exclude-one KL", "full_kl": full_kl, "nodes": harms}

    def _source_graph(self, fused: bool) -> onnx.GraphProto:
        """The graph a setting quantized: the exported one, or the fused one (made again here:
        the fusion is deterministic, so its node names are the same)."""
        if fused and fuse_graph(self.onnx_dir, onnx_file(self.onnx_dir), self.work / "fused"):
            return _graph(self.work / "fused")
        return _graph(self.onnx_dir)


def quantized_nodes(source: onnx.GraphProto, quantized: onnx.GraphProto,
                    operators: list[str]) -> list[str]:
    """The ``source`` nodes the quantizer made integer, in graph order, each under the name
    ``nodes_to_exclude`` takes. Made integer: replaced (no node of that name and type is left:
    MatMul -> MatMulInteger, Attention -> QAttention), kept but fed a new (quantized) weight
    (dynamic mode's embedding Gathers), or in a QDQ model one of ``operators`` fed by a
    DequantizeLinear. Nodes merely downstream of a quantized tensor (an Add after a dequantized
    Gather, a Shape) and operators it left alone (optimum's list names Transpose) are not."""
    kept = {(n.name, n.op_type): n for n in quantized.node}
    old_weights = {i.name for i in source.initializer}
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
               onnx.TensorProto.UINT16, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    # integer weights only: a kept Gemm's rewrite adds a transposed fp32 weight too
    new_weights = {i.name for i in quantized.initializer
                   if i.name not in old_weights and i.data_type in integer}
    dequantized = {o for n in quantized.node if n.op_type == "DequantizeLinear" for o in n.output}
    names = []
    for node in source.node:
        name, op_type = node.name, node.op_type
        if op_type == "Gemm" and (name, op_type) not in kept:
            # onnxruntime's dynamic quantizer (dynamic mode, and static mode's pass for the
            # fused attention) first rewrites each Gemm with a constant weight as MatMul + Add
            # named after it (ONNXModel.replace_gemm_with_matmul); nodes_to_exclude sees the
            # MatMul, which is then quantized or not like any other
            name, op_type = f"{name}_MatMul", "MatMul"
        same = kept.get((name, op_type))
        # in a QDQ model an excluded MatMul may still read a dequantized activation (one its
        # quantized siblings share: Q, K and V read one tensor); its own second operand (the
        # weight) is what says whether it was quantized
        operands = same.input[1:2] if same is not None and op_type in ("MatMul", "Gemm") \
            else (same.input if same is not None else [])
        if (same is None or any(i in new_weights for i in same.input)
                or (op_type in operators and any(i in dequantized for i in operands))):
            names.append(name)
    return names


def _graph(folder: Path) -> onnx.GraphProto:
    return onnx.load(str(onnx_file(folder)), load_external_data=False).graph


def _label_ids(labels, label_names):
    """Labels as class ids, and the class names macro-F1 averages over."""
    if labels is None:
        return None, None
    if label_names is None:
        label_names = (sorted(set(labels)) if isinstance(labels[0], str)
                       else [str(i) for i in range(max(labels) + 1)])
    if isinstance(labels[0], str):
        unknown = sorted(set(labels) - set(label_names))
        if unknown:
            raise EdgeDistillError(f"tune: labels {unknown[:3]} are not in label_names "
                                   f"{label_names}; pass the task's label names")
        labels = [label_names.index(label) for label in labels]
    return np.asarray(labels, np.int64), list(label_names)


def _mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) over rows, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_log, q_log = log_softmax(reference), log_softmax(logits)
    return float(np.mean((np.exp(p_log) * (p_log - q_log)).sum(-1)))


def _move_into_place(folder: Path, output_dir: Path, work: Path) -> None:
    """Put the chosen trial's folder at ``output_dir`` by renames (same file system), moving
    any older content aside first (it is deleted with the work folder)."""
    if output_dir.exists():
        os.replace(output_dir, work / "previous")
    os.replace(folder, output_dir)
