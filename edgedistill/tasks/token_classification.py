"""Token classification (named entities, or any tag per word): a teacher fine-tuned on tagged
words, a smaller student that learns the teacher's tag distribution at every scored token,
scored by entity-level F1 on the test split and timed one forward pass at a time."""

from __future__ import annotations

from datasets import Dataset
from transformers import (
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
)

from ..data import load_tagged_data
from ..evaluation import align_tags, tag_words, tagging_metrics
from ..recipe import Recipe
from .base import (
    NAME_WIDTH,
    Column,
    ReportView,
    Task,
    check_per_token_task,
    head_like,
    label_head,
    literal,
    refuse_other_heads,
    snippet_opening,
    time_forward_passes,
)


def _scored_tags(prediction):
    """(gold, predicted) tag ids per row at the scored positions (label != -100) of a Trainer
    evaluation."""
    predicted = prediction.predictions.argmax(-1)
    gold, guess = [], []
    for p_row, l_row in zip(predicted, prediction.label_ids):
        keep = l_row != -100
        gold.append([int(t) for t in l_row[keep]])
        guess.append([int(t) for t in p_row[keep]])
    return gold, guess


def tagging_sets(tokenizer, args, data, data_cfg, teacher=None, cache_dir=None,
                 cache_top_k: int = 64, transfer=None, transfer_cache=None,
                 teacher_tokenizer=None):
    """Tagged words tokenized with each word's tag on its first sub-token, the collator that
    pads tags with -100, the validation's entity F1, and the teacher (run live: its targets are
    one distribution per token). The signature is every task's ``training_sets``'; the cache
    and transfer settings do not apply (preflight refuses them)."""

    def prepared(split: Dataset) -> Dataset:
        def encode(batch):
            return dict(align_tags(tokenizer, batch["tokens"], batch["tags"],
                                   data_cfg.max_length)[0])
        return split.map(encode, batched=True, remove_columns=split.column_names,
                         desc="tokenize")

    def metrics(prediction):
        gold, guess = _scored_tags(prediction)
        m = tagging_metrics(guess, gold, data.labels)
        return {"entity_f1": m["entity_f1"], "word_accuracy": m["word_accuracy"]}

    return (prepared(data.train), prepared(data.validation),
            DataCollatorForTokenClassification(tokenizer), metrics, teacher, {})


class TokenClassificationTask(Task):
    name = "token-classification"
    labelled = True
    auto_model = AutoModelForTokenClassification
    report = ReportView(
        columns=(Column("entity F1", "metrics.entity_f1"),
                 Column("precision", "metrics.entity_precision"),
                 Column("recall", "metrics.entity_recall"),
                 Column("word accuracy", "metrics.word_accuracy"),
                 Column("agreement", "metrics.agreement"),
                 Column("entity F1 vs teacher", "metrics.entity_f1_vs_teacher"),
                 Column("p50 ms", "latency.p50_ms", 2), Column("p99 ms", "latency.p99_ms", 2)),
        summary=("entity F1", "agreement", "p50 ms"),
        setting=("Test split: {test_rows} rows; entities scored as conlleval does (type and "
                 "both ends). Latency: batch {batch_size}, sequence {sequence_length}, "
                 "{threads} threads, profile `{profile}`; each model in its own process."),
        quality="metrics.entity_f1", quality_label="entity F1 on the test split",
        higher_is_better=True, timing="latency", speed_label="latency per inference, ms",
        roofline_measure="p50", validation="validation entity F1 {entity_f1:.3f}")
    hub_pipeline = "token-classification"
    ort_model_class = "ORTModelForTokenClassification"
    example_text = "Alice flew from Paris to Berlin on Monday."
    pipeline_options = 'aggregation_strategy="simple"'

    def load_data(self, cfg, seed):
        return load_tagged_data(cfg, seed)

    def new_head(self, labels):
        return label_head(labels)

    def student_head(self, config):
        return head_like(config)

    def selection(self, cfg, data):
        # the best epoch by validation entity F1
        return dict(metric_for_best_model="entity_f1", per_device_eval_batch_size=64)

    def training_sets(self, tokenizer, args, data, data_cfg, **kw):
        return tagging_sets(tokenizer, args, data, data_cfg, **kw)

    # ------------------------------------------------------------------ preflight

    def check(self, r: Recipe) -> None:
        check_per_token_task(r, self.name, "ForTokenClassification", "token classifier")

    def check_student(self, r: Recipe, config, teacher_tokenizer, student_tokenizer, labels):
        super().check_student(r, config, teacher_tokenizer, student_tokenizer, labels)
        refuse_other_heads(config, "ForTokenClassification", "token classifier")

    # ------------------------------------------------------------------ stages

    def evaluate(self, run, models: list[dict]) -> dict:
        test, r = run.data.test, run.recipe
        words, gold = list(test["tokens"]), list(test["tags"])
        results, reference = {}, None
        for m in models:
            predicted = tag_words(m["path"], words, r.evaluate.batch_size, r.data.max_length,
                                  desc=f"evaluate {m['name']}")
            if reference is None:
                reference = predicted
            metrics = tagging_metrics(predicted, gold, run.data.labels, reference)
            results[m["name"]] = metrics
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} entity F1 {metrics['entity_f1']:.3f}"
                              f"  agreement {metrics['agreement']:.3f}")
        return {"test_rows": len(test), "labels": run.data.labels, "models": results}

    def bench(self, run, models: list[dict]) -> dict:
        return time_forward_passes(run, models)

    # ------------------------------------------------------------------ model card

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        # each token's tag is the argmax of its logits, named by the config's id2label
        return "\n".join([
            *snippet_opening(location, file_name, "AutoConfig, AutoTokenizer"),
            "labels = AutoConfig.from_pretrained(folder).id2label",
            f'inputs = tokenizer([{literal(self.example_text)}], return_tensors="np")',
            "names = {i.name for i in session.get_inputs()}",
            "feed = {k: v.astype(np.int64) for k, v in inputs.items() if k in names}",
            "tags = session.run(None, feed)[0][0].argmax(-1)",
            'tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])',
            "print([(t, labels[int(i)]) for t, i in zip(tokens, tags)])"])
