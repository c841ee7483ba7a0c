"""Task metrics for a saved model on any backend: accuracy, macro-F1, agreement with a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from .progress import track
from .runtime.causal_lm import load_causal_lm
from .runtime.classifier import load_predictor


def classification_metrics(predictions, labels, label_names: list[str]) -> dict:
    ids = list(range(len(label_names)))
    per_class = f1_score(labels, predictions, labels=ids, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro",
                                   zero_division=0)),
        "f1_per_class": {name: float(f) for name, f in zip(label_names, per_class)},
    }


def predict(model_dir: str | Path, texts: list[str], batch_size: int = 32,
            max_length: int = 128, desc: str | None = None) -> np.ndarray:
    """Predicted class ids for ``texts``, batched by length so padding stays small."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = load_predictor(model_dir)
    order = np.argsort([len(t) for t in texts])
    predictions = np.empty(len(texts), dtype=np.int64)
    starts = range(0, len(texts), batch_size)
    for start in track(starts, desc or f"evaluate {Path(model_dir).name}"):
        idx = order[start:start + batch_size]
        enc = dict(tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                             max_length=max_length, return_tensors="np"))
        predictions[idx] = predictor.logits(enc).argmax(-1)
    return predictions


def evaluate(model_dir: str | Path, dataset, label_names: list[str] | None = None,
             batch_size: int = 32, max_length: int = 128,
             reference_predictions=None, desc: str | None = None) -> dict:
    """Metrics of the model in ``model_dir`` on ``dataset`` (columns ``text`` and ``label``).

    With ``reference_predictions`` (the teacher's, say) also reports ``agreement``: the share of
    rows where both predict the same class.
    """
    if label_names is None:
        label_names = dataset.features["label"].names
    predictions = predict(model_dir, list(dataset["text"]), batch_size, max_length, desc)
    metrics = classification_metrics(predictions, list(dataset["label"]), label_names)
    if reference_predictions is not None:
        metrics["agreement"] = float(np.mean(predictions == np.asarray(reference_predictions)))
    metrics["predictions"] = predictions.tolist()
    return metrics


# ------------------------------------------------------------------ causal language models

def evaluate_lm(model_dir: str | Path, input_ids: np.ndarray, batch_size: int = 8,
                reference_predictions=None, prompts: list[list[int]] | None = None,
                new_tokens: int = 32, eos_token_id: int | None = None,
                desc: str | None = None) -> dict:
    """Perplexity of the causal LM in ``model_dir`` (PyTorch or ONNX) on token blocks.

    ``perplexity = exp(mean negative log-likelihood of each next token)`` over every position
    of the (unpadded) blocks ``input_ids`` (N, L). ``next_token_agreement`` is the share of
    positions where the model's most likely next token equals the reference's (the teacher's).
    Greedy continuations of ``prompts`` are returned for a reader to judge.
    """
    model = load_causal_lm(model_dir)
    nll, count, predictions = 0.0, 0, []
    for start in track(range(0, len(input_ids), batch_size),
                       desc or f"perplexity {Path(model_dir).name}"):
        ids = np.asarray(input_ids[start:start + batch_size], dtype=np.int64)
        logits = np.asarray(model.logits(ids, np.ones_like(ids))[:, :-1], dtype=np.float32)
        targets = ids[:, 1:]
        peak = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        nll += float((log_z - picked).sum(dtype=np.float64))
        count += targets.size
        predictions.append(logits.argmax(-1))
    predictions = np.concatenate(predictions)
    metrics = {"perplexity": float(np.exp(nll / count)), "nll": nll / count, "tokens": count,
               "predictions": predictions.tolist()}
    if reference_predictions is not None:
        metrics["next_token_agreement"] = float(
            np.mean(predictions == np.asarray(reference_predictions)))
    metrics["generations"] = [model.greedy(np.asarray([p], dtype=np.int64), new_tokens,
                                           eos_token_id) for p in prompts or []]
    return metrics
