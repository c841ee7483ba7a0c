"""Task metrics for a saved model on any backend: accuracy, macro-F1, agreement with a reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from .runtime import load_predictor


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
    for start in tqdm(starts, desc=desc or f"evaluate {Path(model_dir).name}", leave=False):
        idx = order[start:start + batch_size]
        enc = dict(tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                             max_length=max_length, return_tensors="np"))
        predictions[idx] = predictor.logits(enc).argmax(-1)
    return predictions


def evaluate(model_dir: str | Path, dataset, label_names: list[str] | None = None,
             batch_size: int = 32, max_length: int = 128,
             reference_predictions=None) -> dict:
    """Metrics of the model in ``model_dir`` on ``dataset`` (columns ``text`` and ``label``).

    With ``reference_predictions`` (the teacher's, say) also reports ``agreement``: the share of
    rows where both predict the same class.
    """
    if label_names is None:
        label_names = dataset.features["label"].names
    predictions = predict(model_dir, list(dataset["text"]), batch_size, max_length)
    metrics = classification_metrics(predictions, list(dataset["label"]), label_names)
    if reference_predictions is not None:
        metrics["agreement"] = float(np.mean(predictions == np.asarray(reference_predictions)))
    metrics["predictions"] = predictions.tolist()
    return metrics
