"""Task metrics for a saved model on any backend: accuracy, macro-F1 and agreement with a
reference for classifiers, entity F1 for token classifiers, agreement with the teacher's
embedding space for sentence embedders, perplexity for causal LMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from .errors import EdgeDistillError
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


# ------------------------------------------------------------------ token classifiers

def align_tags(tokenizer, words: list[list[str]], tags: list[list[int]] | None,
               max_length: int, **padding):
    """Tokenize pre-split ``words`` and give each token its word's tag: the first sub-token of
    a word carries it, the other sub-tokens and the special tokens -100 (not scored), as
    transformers' token-classification examples do. Words past ``max_length`` are cut."""
    if not tokenizer.is_fast:
        raise EdgeDistillError(f"{tokenizer.name_or_path}: token classification needs a fast "
                               "tokenizer (it maps tokens back to words); save the model with "
                               "its tokenizer.json")
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                    **padding)
    firsts = []
    for i in range(len(words)):
        previous, row = None, []
        for w in enc.word_ids(i):
            row.append(-100 if w is None or w == previous else w)
            previous = w
        firsts.append(row)
    if tags is not None:
        enc["labels"] = [[-100 if w == -100 else row_tags[w] for w in row]
                         for row, row_tags in zip(firsts, tags)]
    return enc, firsts


def tag_words(model_dir: str | Path, words: list[list[str]], batch_size: int = 32,
              max_length: int = 128, desc: str | None = None) -> list[list[int]]:
    """The tag id the model in ``model_dir`` gives each word (its first sub-token's argmax;
    a word cut off by ``max_length`` gets tag 0, which the label set should make 'O')."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = load_predictor(model_dir)
    order = np.argsort([len(w) for w in words])
    tagged: list[list[int]] = [[] for _ in words]
    for start in track(range(0, len(words), batch_size), desc or f"tag {Path(model_dir).name}"):
        idx = order[start:start + batch_size]
        enc, firsts = align_tags(tokenizer, [words[i] for i in idx], None, max_length,
                                 padding=True, return_tensors="np")
        predicted = predictor.logits(dict(enc)).argmax(-1)
        for row, i in enumerate(idx):
            tags = [0] * len(words[i])
            for position, w in enumerate(firsts[row]):
                if w != -100:
                    tags[w] = int(predicted[row, position])
            tagged[i] = tags
    return tagged


def tagging_metrics(predicted: list[list[int]], gold: list[list[int]], label_names: list[str],
                    reference: list[list[int]] | None = None) -> dict:
    """Entity-level precision, recall and F1 (seqeval's default, CoNLL-2000's conlleval rules:
    an entity counts when its type and both ends match), word accuracy, and with ``reference``
    (the teacher's tags) the share of words tagged as it tags them and the entity F1 against
    its entities."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    def names(rows):
        return [[label_names[t] for t in row] for row in rows]

    def flat(rows):
        return np.asarray([t for row in rows for t in row])

    p, g = names(predicted), names(gold)
    metrics = {"entity_f1": float(f1_score(g, p, zero_division=0)),
               "entity_precision": float(precision_score(g, p, zero_division=0)),
               "entity_recall": float(recall_score(g, p, zero_division=0)),
               "word_accuracy": float(np.mean(flat(predicted) == flat(gold)))}
    if reference is not None:
        metrics["agreement"] = float(np.mean(flat(predicted) == flat(reference)))
        metrics["entity_f1_vs_teacher"] = float(f1_score(names(reference), p, zero_division=0))
    return metrics


# ------------------------------------------------------------------ sentence embedders

def embed(model_dir: str | Path, texts: list[str], batch_size: int = 32, max_length: int = 128,
          desc: str | None = None) -> np.ndarray:
    """The sentence embeddings (N, width) of ``texts`` by the embedder in ``model_dir`` (a
    PyTorch folder pooled as it says, or an ONNX graph with its pooling inside)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = load_predictor(model_dir)
    order = np.argsort([len(t) for t in texts])
    rows: list[np.ndarray | None] = [None] * len(texts)
    for start in track(range(0, len(texts), batch_size), desc or f"embed {Path(model_dir).name}"):
        idx = order[start:start + batch_size]
        enc = dict(tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                             max_length=max_length, return_tensors="np"))
        for i, row in zip(idx, predictor.logits(enc)):
            rows[i] = row
    return np.stack(rows).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedding_metrics(embeddings: np.ndarray, reference: np.ndarray,
                      labels: list[int] | None = None, k: int = 10,
                      pairs_of: int = 1000) -> dict:
    """How well ``embeddings`` (N, d) keep the space of ``reference`` (the teacher's, N, d'),
    all by cosine similarity:

    - ``cosine``: mean cosine between a text's two embeddings (needs d == d'; None otherwise);
    - ``spearman``: Spearman rank correlation between the two models' similarities of every
      pair among the first ``pairs_of`` texts (what a semantic-search ranking depends on);
    - ``recall_at_k``: the share of each text's ``k`` nearest neighbours under the reference
      that are among its ``k`` nearest under these embeddings (a retrieval index's agreement);
    - ``index_recall_at_k`` (needs d == d'; None otherwise): the same share when each text's
      embedding searches the reference's index of the other texts: how well these embeddings
      serve as queries to an index the teacher built;
    - ``knn_accuracy`` with ``labels``: leave-one-out k-nearest-neighbour classification
      (majority of the ``k`` nearest by this model's own similarities).
    """
    from scipy.stats import spearmanr

    a, b = _unit(embeddings), _unit(reference)
    metrics = {"cosine": float((a * b).sum(-1).mean()) if a.shape == b.shape else None}
    n = min(len(a), pairs_of)
    upper = np.triu_indices(n, 1)
    metrics["spearman"] = float(spearmanr((a[:n] @ a[:n].T)[upper],
                                          (b[:n] @ b[:n].T)[upper]).statistic)
    k = min(k, len(a) - 1)

    def nearest(similarities: np.ndarray) -> np.ndarray:
        # each row's k nearest other texts, in no order (a set is compared, a majority taken)
        np.fill_diagonal(similarities, -np.inf)
        return np.argpartition(-similarities, k - 1, axis=1)[:, :k]

    def overlap(found: np.ndarray, wanted: np.ndarray) -> float:
        return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(found, wanted)]))

    near_a, near_b = nearest(a @ a.T), nearest(b @ b.T)
    metrics["recall_at_k"] = overlap(near_a, near_b)
    metrics["index_recall_at_k"] = overlap(nearest(a @ b.T), near_b) if a.shape == b.shape \
        else None
    metrics["k"] = k
    if labels is not None:
        labels = np.asarray(labels)
        votes = labels[near_a]
        predicted = [np.bincount(v, minlength=labels.max() + 1).argmax() for v in votes]
        metrics["knn_accuracy"] = float(np.mean(np.asarray(predicted) == labels))
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
