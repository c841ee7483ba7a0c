"""Extractive question answering (SQuAD-style): a teacher fine-tuned to point at the answer's
first and last token in a context, a smaller student that learns the teacher's two
distributions over each window's tokens, scored by SQuAD's exact match and F1 on answers read
back from the context, and timed one window at a time."""

from __future__ import annotations

from datasets import Dataset
from transformers import (
    AutoModelForQuestionAnswering,
    DataCollatorWithPadding,
)

from ..answers import answer_questions, best_answers, squad_scores, windows
from ..data import load_qa_data
from ..distill.qa_trainer import QuestionAnsweringDistillationTrainer  # noqa: F401  (registers it)
from ..recipe import Recipe
from .base import (
    NAME_WIDTH,
    Column,
    ReportView,
    Task,
    check_per_token_task,
    literal,
    refuse,
    refuse_other_heads,
    snippet_opening,
    time_forward_passes,
)

EXAMPLE_CONTEXT = "The tablets helped with the pain after two days, but made me sleepy."


def qa_sets(tokenizer, args, data, data_cfg, teacher=None, cache_dir=None,
            cache_top_k: int = 64, transfer=None, transfer_cache=None, teacher_tokenizer=None):
    """Training and validation windows with their answers' token positions, the collator, the
    validation's SQuAD F1 (answers read back from the windows, as the test's are) and the
    teacher (run live: its targets are two distributions per window). The signature is every
    task's ``training_sets``'; the cache and transfer settings do not apply (preflight refuses
    them)."""
    length, stride = data_cfg.max_length, data_cfg.doc_stride

    def prepared(split):
        win = windows(tokenizer, list(split["question"]), list(split["context"]), length, stride,
                      list(split["answers"]))
        return Dataset.from_dict(win.encoding), win

    train, _ = prepared(data.train)
    validation, val_windows = prepared(data.validation)
    contexts = list(data.validation["context"])
    gold = [a["text"] for a in data.validation["answers"]]

    def metrics(prediction):
        # batches one by one (selection sets eval_do_concat_batches: False): their lengths
        # differ, and a window's scores must stay beside its own offsets
        spans = [row for batch in prediction.predictions for row in batch]
        scores = squad_scores(best_answers(spans, val_windows, contexts), gold)
        return {"f1": scores["f1"], "exact_match": scores["exact_match"]}

    return train, validation, DataCollatorWithPadding(tokenizer), metrics, teacher, {}


class QuestionAnsweringTask(Task):
    name = "question-answering"
    labelled = True
    auto_model = AutoModelForQuestionAnswering
    report = ReportView(
        columns=(Column("exact match", "metrics.exact_match"), Column("F1", "metrics.f1"),
                 Column("agreement", "metrics.agreement"),
                 Column("F1 vs teacher", "metrics.f1_vs_teacher"),
                 Column("p50 ms", "latency.p50_ms", 2), Column("p99 ms", "latency.p99_ms", 2)),
        summary=("F1", "agreement", "p50 ms"),
        setting=("Test split: {test_rows} questions; exact match and F1 as SQuAD scores them, "
                 "on answers read back from the context; agreement: the same answer as the "
                 "teacher's. Latency: one window, batch {batch_size}, sequence "
                 "{sequence_length}, {threads} threads, profile `{profile}`; each model in its "
                 "own process."),
        quality="metrics.f1", quality_label="F1 on the test split (SQuAD)",
        higher_is_better=True, timing="latency", speed_label="latency per window, ms",
        roofline_measure="p50", validation="validation F1 {f1:.3f}")
    hub_pipeline = "question-answering"
    ort_model_class = "ORTModelForQuestionAnswering"
    example_text = "What helped with the pain?"
    pipeline_options = literal(EXAMPLE_CONTEXT)  # the pipeline's second argument: the context

    def load_data(self, cfg, seed):
        return load_qa_data(cfg, seed)

    def selection(self, cfg, data):
        # the best epoch by validation F1; predictions kept per batch (see qa_sets' metrics)
        return dict(metric_for_best_model="f1", per_device_eval_batch_size=64,
                    eval_do_concat_batches=False)

    def training_sets(self, tokenizer, args, data, data_cfg, **kw):
        return qa_sets(tokenizer, args, data, data_cfg, **kw)

    # ------------------------------------------------------------------ preflight

    def check(self, r: Recipe) -> None:
        check_per_token_task(r, self.name, "ForQuestionAnswering", "question answerer")
        refuse(r.data.doc_stride >= r.data.max_length,
               f"data.doc_stride: {r.data.doc_stride} tokens shared by consecutive windows "
               f"must be fewer than data.max_length ({r.data.max_length})")

    def check_student(self, r: Recipe, config, teacher_tokenizer, student_tokenizer, labels):
        super().check_student(r, config, teacher_tokenizer, student_tokenizer, labels)
        refuse_other_heads(config, "ForQuestionAnswering", "question answerer")

    # ------------------------------------------------------------------ stages

    def evaluate(self, run, models: list[dict]) -> dict:
        test, r = run.data.test, run.recipe
        questions, contexts = list(test["question"]), list(test["context"])
        gold = [a["text"] for a in test["answers"]]
        results, reference = {}, None
        for m in models:
            predicted = answer_questions(m["path"], questions, contexts, r.evaluate.batch_size,
                                         r.data.max_length, r.data.doc_stride,
                                         desc=f"evaluate {m['name']}")
            if reference is None:
                reference = predicted
            metrics = squad_scores(predicted, gold, reference)
            results[m["name"]] = metrics
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} F1 {metrics['f1']:.3f}  exact "
                              f"{metrics['exact_match']:.3f}  agreement {metrics['agreement']:.3f}")
        return {"test_rows": len(test), "labels": [], "models": results}

    def bench(self, run, models: list[dict]) -> dict:
        return time_forward_passes(run, models)  # on question + context texts, one window each

    # ------------------------------------------------------------------ model card

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        # the answer: the best-scoring start and end tokens, read back from the context
        return "\n".join([
            *snippet_opening(location, file_name),
            f"question, context = {literal(self.example_text)}, {literal(EXAMPLE_CONTEXT)}",
            ('inputs = tokenizer(question, context, return_offsets_mapping=True, '
             'return_tensors="np")'),
            'offsets = inputs.pop("offset_mapping")[0]',
            "names = {i.name for i in session.get_inputs()}",
            "feed = {k: v.astype(np.int64) for k, v in inputs.items() if k in names}",
            "start, end = (scores[0] for scores in session.run(None, feed))",
            "in_context = np.array(inputs.sequence_ids(0)) == 1",
            "start, end = np.where(in_context, start, -np.inf), np.where(in_context, end, -np.inf)",
            "s = int(start.argmax())",
            "e = s + int(end[s:s + 30].argmax())",
            "print(repr(context[offsets[s][0]:offsets[e][1]]))"])
