"""Shared fixtures: tiny random models and a tiny labelled data set, built offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = ("good great fine awful bad terrible okay pain relief side effects worked helped "
         "worse better headache sleep dose day week").split()
LABELS = ["negative", "neutral", "positive"]


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    # written whole, then renamed: the ranks of a DDP test write the same folder at once, and
    # one reading the other's half-written file lost [UNK] (seen in CI)
    tmp = folder / f"vocab.txt.{os.getpid()}.tmp"
    tmp.write_text("\n".join(vocab) + "\n")
    os.replace(tmp, folder / "vocab.txt")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)


def make_bert(num_layers: int = 4, hidden: int = 32, num_labels: int = 3, seed: int = 0,
              vocab_size: int = len(WORDS) + 5) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                        num_attention_heads=4, intermediate_size=hidden * 2,
                        max_position_embeddings=64, num_labels=num_labels,
                        id2label=dict(enumerate(LABELS[:num_labels])),
                        label2id={n: i for i, n in enumerate(LABELS[:num_labels])})
    return BertForSequenceClassification(config).eval()


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts whose label follows from their words, so a model can learn something."""
    rng = random.Random(seed)
    cues = {"negative": ["awful", "bad", "terrible", "worse"], "neutral": ["okay", "fine"],
            "positive": ["good", "great", "helped", "better"]}
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))] + [rng.choice(cues[label])] * 2
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture
def tiny_tokenizer(tmp_path):
    return make_tokenizer(tmp_path / "tok")


@pytest.fixture
def tiny_teacher_dir(tmp_path) -> Path:
    """A tiny BERT classifier and its tokenizer saved like a hub model."""
    folder = tmp_path / "teacher"
    make_bert().save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_data_file(tmp_path) -> Path:
    """A tsv with train rows; tests that need a test split write a second file."""
    return write_tsv(tmp_path / "data", 90, 45)


def write_tsv(folder: Path, n_train: int, n_test: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        texts, labels = make_texts(n, seed)
        rows = ["review\trating"] + [f"{t}\t{l}" for t, l in zip(texts, labels)]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


# ----------------------------------------------------------------- tiny causal language models

def make_llm_tokenizer():
    """A word-level fast tokenizer over WORDS, with the special tokens a causal LM needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=64,
                                   model_input_names=["input_ids", "attention_mask"])


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer learnt over WORDS, with a causal LM's special tokens: the
    kind onnxruntime-genai's tokenizer reads (it cannot read make_llm_tokenizer's word-level
    one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([" ".join(WORDS)] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=64,
                                   model_input_names=["input_ids", "attention_mask"])


def make_llama(num_layers: int = 4, hidden: int = 32, seed: int = 0, vocab_size: int = len(WORDS) + 4):
    """A tiny Llama-style causal LM (grouped-query attention, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama_bpe_dir(tmp_path) -> Path:
    """A tiny causal LM with a byte-level BPE tokenizer (one onnxruntime-genai reads)."""
    folder = tmp_path / "llama-bpe"
    tokenizer = make_bpe_tokenizer()
    # heads of 16 dimensions: onnxruntime-genai's attention runs no smaller ones
    make_llama(hidden=64, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A tiny causal LM and its tokenizer saved like a hub model."""
    folder = tmp_path / "llama"
    make_llama().save_pretrained(folder)
    make_llm_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _teacher_logits_in_tmp(tmp_path, monkeypatch):
    """Teacher logits kept between runs go to the test's folder, not the user's cache (an
    environment variable, so the commands a test starts in a subprocess follow it)."""
    monkeypatch.setenv("EDGEDISTILL_LOGITS_CACHE", str(tmp_path / "teacher-logits"))


@pytest.fixture(scope="session", autouse=True)
def _teacher_logits_out_of_the_users_cache(tmp_path_factory):
    """The same for module-scoped fixtures (a whole pipeline run, say), which pytest sets up
    before any test's own fixtures: one folder for the session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEDISTILL_LOGITS_CACHE", str(tmp_path_factory.mktemp("teacher-logits")))
        yield
