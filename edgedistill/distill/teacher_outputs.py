"""The teacher's outputs computed ahead of training, and what kind of model a teacher is."""

from __future__ import annotations

import torch

from ..data import tokenize
from ..pooling import carried, pool
from ..progress import track

# the column of a training set that holds the teacher's logits for each example
TEACHER_LOGITS = "teacher_logits"
# ... and the one holding a sentence embedder's embedding of each example
TEACHER_EMBEDDING = "teacher_embedding"


def add_teacher_logits(dataset, teacher, collator, batch_size: int = 64):
    """Return ``dataset`` with a ``teacher_logits`` column, computed once.

    The teacher is frozen and in eval mode, so its logits for an example are the same in every
    epoch; computing them once instead of in every training step cut the default recipe's
    distillation from 228 s to 160 s (the teacher's forward pass is most of a 2-layer
    student's step). Feature losses still need the live teacher's hidden states.
    """
    from torch.utils.data import DataLoader

    device = next(teacher.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    rows = []
    teacher.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            rows += teacher(**batch).logits.float().cpu().tolist()
    return dataset.add_column(TEACHER_LOGITS, rows)


def with_teacher_logits(tokenized, texts, teacher, tokenizer, teacher_tokenizer=None,
                        max_length: int = 128, batch_size: int = 64):
    """``tokenized`` (rows as the student reads them) with the teacher's logits for each row.

    A student with a tokenizer of its own (``teacher_tokenizer`` is then the teacher's) gets
    the logits the teacher gives the same ``texts`` (a Dataset with ``text`` and ``label``, in
    the order of ``tokenized``) read the teacher's way: a classifier's target is one per
    example, so the two readings need not line up token by token.
    """
    from transformers import DataCollatorWithPadding

    if teacher_tokenizer is None:
        return add_teacher_logits(tokenized, teacher, DataCollatorWithPadding(tokenizer),
                                  batch_size)
    scored = add_teacher_logits(tokenize(texts, teacher_tokenizer, max_length), teacher,
                                DataCollatorWithPadding(teacher_tokenizer), batch_size)
    return tokenized.add_column(TEACHER_LOGITS, scored[TEACHER_LOGITS])


def teacher_embeddings(teacher, tokenizer, texts: list[str], max_length: int = 128,
                       batch_size: int = 64) -> list[list[float]]:
    """The sentence embedder ``teacher``'s embedding of each text (its pooling carried in its
    config), computed once: the teacher is frozen, so the targets are the same every epoch.
    Texts go in batches of similar length, so padding stays small."""
    pooling = carried(teacher.config)
    device = next(teacher.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[list[float]] = [[]] * len(texts)
    teacher.eval()
    with torch.inference_mode():
        for start in track(range(0, len(order), batch_size), "teacher embeddings"):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt").to(device)
            hidden = teacher(**batch).last_hidden_state
            for i, row in zip(idx, pool(hidden, batch["attention_mask"], pooling).float()):
                rows[i] = row.cpu().tolist()
    return rows


def is_causal_lm(model) -> bool:
    """Whether ``model`` (possibly wrapped by DDP) is a transformers causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = getattr(model, "module", model)
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
