"""Sentence embeddings: a sentence-transformers teacher, a smaller encoder student whose pooled
embedding learns the teacher's on unlabelled text, exported with its pooling inside the graph,
scored by how well it keeps the teacher's embedding space and timed one sentence at a time and
as a batch of 32 (an index build)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from datasets import Dataset, concatenate_datasets
from transformers import AutoModel, DataCollatorWithPadding

from ..bench.runner import benchmark
from ..data import load_task_data
from ..distill.embedding_trainer import check_embedding_settings, embedding_agreement
from ..distill.losses import POINTWISE
from ..distill.student import shares_tokenizer
from ..distill.teacher_outputs import TEACHER_EMBEDDING, teacher_embeddings
from ..distill.training import evaluation_texts, unlabelled_texts
from ..distill.transfer import new_rows
from ..evaluation import embed, embedding_metrics
from ..pooling import (
    attach_dense,
    carried,
    carry,
    dense_apart,
    require_pooling,
    write_sentence_files,
)
from ..progress import silenced
from ..recipe import Recipe
from ..sources import resolve_model
from .base import (
    NAME_WIDTH,
    Column,
    ReportView,
    Task,
    bench_settings,
    literal,
    print_over_budget,
    refuse,
    refuse_classifier_and_lm_extras,
    snippet_opening,
)

# sentences per batch of the throughput measurement: an index build embeds many at once
INDEX_BATCH = 32


def embedding_sets(tokenizer, args, data, data_cfg, teacher=None, cache_dir=None,
                   cache_top_k: int = 64, transfer=None, transfer_cache=None,
                   teacher_tokenizer=None):
    """Training and validation texts tokenized for the student, each with the teacher's
    embedding (computed once, read the teacher's way when the student has its own tokenizer:
    the target is one vector per text), the collator, the validation score, the teacher the
    trainer still runs (only for layer matches) and the transfer record. A transfer set here
    is more text (``transfer.unlabelled``) the teacher embeds like the training texts. The
    signature is every task's ``training_sets``'; ``cache_*`` do not apply (preflight refuses
    them)."""
    length = data_cfg.max_length

    def prepared(texts: list[str]) -> Dataset:
        encoded = tokenizer(texts, truncation=True, max_length=length)
        targets = teacher_embeddings(teacher, teacher_tokenizer or tokenizer, texts, length)
        return Dataset.from_dict({**encoded, TEACHER_EMBEDDING: targets})

    train, extra = prepared(list(data.train["text"])), {}
    if transfer is not None and transfer.active:
        texts, extra["transfer"] = more_text(transfer, data, args.seed)
        start = time.perf_counter()
        # embedded apart from the training texts: the teacher's kept embeddings of those
        # (their file is named by the texts) still serve
        train = concatenate_datasets([train, prepared(texts)]) if texts else train
        extra["transfer"]["teacher_seconds"] = round(time.perf_counter() - start, 3)
    live = teacher if args.matches and teacher_tokenizer is None else None
    return (train, prepared(list(data.validation["text"])), DataCollatorWithPadding(tokenizer),
            embedding_agreement, live, extra)


def more_text(cfg, data, seed: int) -> tuple[list[str], dict]:
    """The texts of ``cfg.unlabelled`` (a recipe's transfer block) that are neither training,
    validation or test texts nor repeats, and their record for the report."""
    texts = list(data.train["text"])
    unlabelled = unlabelled_texts(cfg, data, seed, labelled=texts)
    kept, dropped = new_rows([(name, t) for name, group in unlabelled.items() for t in group],
                             texts, evaluation_texts(data))
    return [t for _, t in kept], {"size": len(kept), "training_rows": len(texts),
                                  "sources": dict(Counter(name for name, _ in kept)),
                                  "dropped": dict(dropped)}


class SentenceEmbeddingTask(Task):
    name = "sentence-embedding"
    labelled = False  # labels, where a recipe names them (data.labels), serve k-NN scoring only
    auto_model = AutoModel
    report = ReportView(
        columns=(Column("cosine to teacher", "metrics.cosine"),
                 Column("Spearman vs teacher", "metrics.spearman"),
                 Column("recall@10", "metrics.recall_at_k"),
                 Column("recall@10 on the teacher's index", "metrics.index_recall_at_k"),
                 Column("k-NN accuracy", "metrics.knn_accuracy"),
                 Column("p50 ms", "latency.p50_ms", 2), Column("p99 ms", "latency.p99_ms", 2),
                 Column(f"sentences/s (batch {INDEX_BATCH})", "index.throughput_per_s", 0)),
        summary=("Spearman vs teacher", "p50 ms", f"sentences/s (batch {INDEX_BATCH})"),
        setting=("Test split: {test_rows} texts; agreement with the teacher's embeddings by "
                 "cosine similarity. Latency: batch {batch_size}, sequence {sequence_length}, "
                 "{threads} threads, profile `{profile}`; each model in its own process."),
        quality="metrics.spearman", quality_label="Spearman correlation with the teacher's "
                                                  "similarities",
        higher_is_better=True, timing="latency", speed_label="latency per sentence, ms",
        roofline_measure="p50", validation="validation Spearman vs teacher {spearman:.3f}")
    hub_pipeline = "sentence-similarity"
    example_text = "The medicine helped me sleep."

    def load_data(self, cfg, seed):
        return load_task_data(cfg, seed, labelled=bool(cfg.labels))

    def load_model(self, path, trust_remote_code=False, **head):
        """The encoder in ``path`` with its pooling carried in its config."""
        pooling = require_pooling(path, "teacher.model" if not head else "student.model")
        # a sentence-transformers folder has no pooler weights: transformers' notice that
        # they are newly initialised concerns a layer the embedding never uses
        with silenced("transformers.modeling_utils", "newly initialized"):
            model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
        carry(model.config, pooling)
        attach_dense(model, pooling, path)
        return model

    def untrained_model(self, config):
        # with the Dense layer the carried pooling names, fresh like the rest, onto the
        # teacher's Dense width: a shape is timed with the layer it ships with (a width-pruned
        # student under a similarity loss loses it in training: one small product less)
        model = super().untrained_model(config)
        attach_dense(model, carried(config))
        return model

    def save_model(self, model, tokenizer, folder):
        # a Dense layer in sentence-transformers' module folder, as a distilled student's is
        with dense_apart(model) as dense:
            super().save_model(model, tokenizer, folder)
        write_sentence_files(folder, model, tokenizer, dense)

    def student_head(self, teacher_config):
        return {"student": True}  # tells load_model which key names a folder without pooling

    def selection(self, cfg, data):
        # the best epoch: the closest to what the loss asks of the teacher: its vectors (mean
        # cosine) for a pointwise loss, else its similarities of validation pairs
        pointwise = getattr(cfg, "distill_loss", None) in POINTWISE
        return dict(metric_for_best_model="cosine" if pointwise else "spearman",
                    greater_is_better=True, per_device_eval_batch_size=64)

    def training_sets(self, tokenizer, args, data, data_cfg, **kw):
        return embedding_sets(tokenizer, args, data, data_cfg, **kw)

    # ------------------------------------------------------------------ preflight

    def check(self, r: Recipe) -> None:
        path = resolve_model(r.teacher.model)
        require_pooling(path, "teacher.model")
        check_embedding_settings(r.distill, "distill.")
        refuse(r.teacher.finetune, "teacher.finetune: a sentence-embedding teacher is used as "
               "it is (its embeddings are the targets; there is no labelled objective to "
               "fine-tune it on); set teacher.finetune: false")
        # a sentence embedder learns from text alone: its transfer set is more text
        # (transfer.unlabelled), embedded by the teacher like the training texts
        refuse_classifier_and_lm_extras(r, self.name, more_text=True)

    def check_student(self, r: Recipe, config, teacher_tokenizer, student_tokenizer, labels):
        # its pooling now, not when the distill stage loads it (or a search times it)
        require_pooling(resolve_model(r.student.model), "student.model")
        # the target is one vector per text, so a student may read its own tokens; layer
        # matches compare token positions and still need one tokenizer
        refuse(bool(r.distill.matches) and not shares_tokenizer(teacher_tokenizer,
                                                                 student_tokenizer),
               "student.model: its tokenizer differs from the teacher's, and distill.matches "
               "compare the two models token by token; drop distill.matches")

    # ------------------------------------------------------------------ stages

    def evaluate(self, run, models: list[dict]) -> dict:
        test, r = run.data.test, run.recipe
        texts = list(test["text"])
        labels = list(test["label"]) if run.data.labels else None
        results, reference = {}, None
        for m in models:
            vectors = embed(m["path"], texts, r.evaluate.batch_size, r.data.max_length,
                            desc=f"embed {m['name']}")
            if reference is None:
                reference = vectors
            metrics = embedding_metrics(vectors, reference, labels)
            results[m["name"]] = metrics
            knn = (f"  k-NN accuracy {metrics['knn_accuracy']:.3f}" if labels else "")
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} Spearman {metrics['spearman']:.3f}  "
                              f"recall@{metrics['k']} {metrics['recall_at_k']:.3f}{knn}")
        return {"test_rows": len(test), "labels": run.data.labels, "models": results}

    def bench(self, run, models: list[dict]) -> dict:
        one = bench_settings(run.recipe)
        texts, paths = list(run.data.test["text"]), [m["path"] for m in models]
        single = benchmark(paths, run.target, texts, one)
        # an index build: many sentences a call; fewer iterations (each is 32 sentences)
        index = benchmark(paths, run.target, texts,
                          replace(one, batch_size=INDEX_BATCH, real_length_samples=0,
                                  iterations=max(5, one.iterations // 8)))
        rows = {}
        for m, result, batch in zip(models, single, index):
            if not print_over_budget(run.console, m["name"], result):
                result["index"] = batch.get("latency", {})
                run.console.print(
                    f"  {m['name']:<{NAME_WIDTH}} p50 {result['latency']['p50_ms']:.2f} ms  "
                    f"batch {INDEX_BATCH}: {result['index'].get('throughput_per_s', 0):.0f}/s  "
                    f"RSS {result['peak_rss_mb']:.0f} MB")
            rows[m["name"]] = result
        return {"models": rows}

    # ------------------------------------------------------------------ model card

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        # the graph pools (and normalises) itself: its output is the sentence embedding
        return "\n".join([
            *snippet_opening(location, file_name),
            (f"texts = [{literal(self.example_text)}, "
             f"{literal('It let me sleep through the night.')}]"),
            'inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="np")',
            "names = {i.name for i in session.get_inputs()}",
            "feed = {k: v.astype(np.int64) for k, v in inputs.items() if k in names}",
            'embeddings = session.run(["sentence_embedding"], feed)[0]',
            "unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)",
            'print(embeddings.shape, "cosine", float(unit[0] @ unit[1]))'])
