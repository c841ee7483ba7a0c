"""Extractive question answering: a context cut into windows the model reads, the answer read
back from the model's start and end scores, and SQuAD's scores of answers.

The windows follow transformers' question-answering examples: the question, then as much of
the context as fits in ``max_length`` tokens; a longer context continues in the next window,
which repeats the last ``stride`` tokens of the one before, so an answer cut at a window's edge
is whole in the next. A window is labelled with the token positions of its answer, or with
position 0 (the first token) when the answer is not inside it.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeDistillError
from .progress import track
from .runtime.classifier import load_predictor

# an answer's most tokens and the best starts / ends tried per window: transformers' examples'
# defaults (run_qa.py: max_answer_length 30, n_best_size 20)
MAX_ANSWER_TOKENS = 30
N_BEST = 20


@dataclass
class Windows:
    """The tokenized windows (``encoding``: lists per window) and, per window, the question it
    belongs to and each token's character span in that question's context (None for the
    question's tokens, special tokens and padding)."""

    encoding: dict[str, list]
    example: list[int]
    offsets: list[list[tuple[int, int] | None]]


def windows(tokenizer, questions: list[str], contexts: list[str], max_length: int,
            stride: int, answers: list[dict] | None = None) -> Windows:
    """The windows of each (question, context); with ``answers`` (SQuAD's {text,
    answer_start}; the first answer is learnt) each window gets ``start_positions`` and
    ``end_positions``."""
    if not getattr(tokenizer, "is_fast", False):
        raise EdgeDistillError("question answering maps answers to tokens by character "
                               "offsets, which only a fast tokenizer gives; this model's "
                               "tokenizer is a slow one (no tokenizer.json)")
    try:
        enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    except Exception as e:  # a question longer than max_length leaves no room for context
        raise EdgeDistillError(f"question answering: cannot fit questions and context in "
                               f"data.max_length {max_length} with data.doc_stride {stride} "
                               f"({str(e).splitlines()[0][:200]}); raise max_length or lower "
                               "doc_stride") from e
    example = list(enc.pop("overflow_to_sample_mapping"))
    offsets = []
    for w, spans in enumerate(enc.pop("offset_mapping")):
        sequence = enc.sequence_ids(w)
        offsets.append([tuple(s) if sequence[i] == 1 else None for i, s in enumerate(spans)])
    encoding = {k: list(v) for k, v in enc.items()}
    if answers is not None:
        spans = [_token_span(offsets[w], answers[example[w]]) for w in range(len(example))]
        encoding["start_positions"] = [s for s, _ in spans]
        encoding["end_positions"] = [e for _, e in spans]
    return Windows(encoding, example, offsets)


def _token_span(offsets: list, answer: dict) -> tuple[int, int]:
    """The first and last token of ``answer``'s first text in a window, or (0, 0) when the
    window does not hold all of it."""
    start = answer["answer_start"][0]
    end = start + len(answer["text"][0])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return 0, 0
    first = next(i for i in inside if offsets[i][1] > start)
    last = next(i for i in reversed(inside) if offsets[i][0] < end)
    return first, last


def best_answers(spans: list[np.ndarray], win: Windows, contexts: list[str]) -> list[str]:
    """Each question's answer: over its windows, the context text of the span with the highest
    start + end score that lies in the context, ends after it starts and has at most
    MAX_ANSWER_TOKENS tokens; '' when no window has one. ``spans``: per window, its (2, tokens)
    start and end scores (a padded window's extra scores are never read)."""
    best: dict[int, tuple[float, str]] = {}
    for w, scores in enumerate(spans):
        offsets, context = win.offsets[w], contexts[win.example[w]]
        start, end = scores[0][:len(offsets)], scores[1][:len(offsets)]
        for s in np.argsort(start)[::-1][:N_BEST]:
            if offsets[s] is None:
                continue
            for e in np.argsort(end)[::-1][:N_BEST]:
                if offsets[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                    continue
                score = float(start[s] + end[e])
                if score > best.get(win.example[w], (-np.inf, ""))[0]:
                    best[win.example[w]] = (score, context[offsets[s][0]:offsets[e][1]])
    return [best.get(i, (0.0, ""))[1] for i in range(len(contexts))]


def answer_questions(model_dir: str | Path, questions: list[str], contexts: list[str],
                     batch_size: int = 32, max_length: int = 384, stride: int = 128,
                     desc: str | None = None) -> list[str]:
    """The answer the model in ``model_dir`` (PyTorch, ONNX or int8) reads from each context."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = load_predictor(model_dir)
    win = windows(tokenizer, questions, contexts, max_length, stride)
    spans: list[np.ndarray] = []
    count = len(win.example)
    for start in track(range(0, count, batch_size), desc or f"answer {Path(model_dir).name}"):
        batch = {k: v[start:start + batch_size] for k, v in win.encoding.items()}
        spans.extend(predictor.logits(_padded(batch, tokenizer.pad_token_id or 0)))
    return best_answers(spans, win, contexts)


def _padded(batch: dict[str, list], pad_id: int) -> dict[str, np.ndarray]:
    """Windows padded on the right to the longest (``tokenizer.pad`` would do it, and warn on
    every call that a fast tokenizer pads faster while tokenizing: these are tokenized)."""
    width = max(len(ids) for ids in batch["input_ids"])
    return {k: np.array([row + [pad_id if k == "input_ids" else 0] * (width - len(row))
                         for row in rows], dtype=np.int64) for k, rows in batch.items()}


# ---------------------------------------------------------------- SQuAD's scores
# Written here because the `evaluate` library's "squad" metric is a script fetched from the Hub
# at run time. The definitions are those of SQuAD v1.1's official evaluation script (Rajpurkar
# et al. 2016): answers compared after lower-casing and removing punctuation, the articles
# a / an / the and extra spaces; F1 over the words the two share; the best over the gold answers.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # SQuAD 2.0's convention: both empty is a match
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predicted: list[str], gold: list[list[str]],
                 reference: list[str] | None = None) -> dict:
    """Exact match and F1 (SQuAD's, as fractions), and with ``reference`` (the teacher's
    answers) the share of questions answered exactly as it answers them and the F1 against its
    answers."""
    if len(predicted) != len(gold):
        raise EdgeDistillError(f"{len(predicted)} answers for {len(gold)} questions")
    exact = [max(normalize_answer(p) == normalize_answer(g) for g in golds)
             for p, golds in zip(predicted, gold)]
    f1 = [max(_f1(p, g) for g in golds) for p, golds in zip(predicted, gold)]
    out = {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}
    if reference is not None:
        out["agreement"] = float(np.mean([normalize_answer(p) == normalize_answer(r)
                                          for p, r in zip(predicted, reference)]))
        out["f1_vs_teacher"] = float(np.mean([_f1(p, r) for p, r in zip(predicted, reference)]))
    return out
