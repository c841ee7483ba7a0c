"""Load a data set into train / validation / test splits and tokenize it: texts with a class
(classification, language modelling, sentence embeddings), words with a tag each (token
classification) or questions with answers in a context (question answering).

Everything goes through `datasets`: packaged offline copies, local files (csv, tsv, json,
jsonl, parquet, CoNLL files for tags, SQuAD's nested JSON for questions), folders written by
``save_to_disk``, and hub ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk

from .errors import EdgeDistillError
from .packaged_data import PACKAGED_DATASETS, packaged_dataset_files, text_cleaner
from .recipe_blocks import DataConfig, check_limits

# the seed of a test split held out of the training split (data.test_fraction) and of the
# rows data.max_test_samples keeps: the same for every recipe seed
TEST_SPLIT_SEED = 1234
_LOADERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".conll": "conll"}


@dataclass
class TaskData:
    """The three splits with columns ``text`` and ``label`` (a ClassLabel), and label names."""

    splits: DatasetDict
    labels: list[str]
    # rows left out per source split because a text or label cell was empty (data.drop_empty)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def train(self) -> Dataset:
        return self.splits["train"]

    @property
    def validation(self) -> Dataset:
        return self.splits["validation"]

    @property
    def test(self) -> Dataset:
        return self.splits["test"]

    def calibration_texts(self, count: int, seed: int) -> list[str]:
        """``count`` training texts (never the test split) in a seeded random order: what
        every int8 calibration reads, and what ranks a pruned student's heads and channels."""
        train = self.train.shuffle(seed=seed)
        return list(train.select(range(min(count, len(train))))["text"])


def _read_raw(cfg: DataConfig) -> DatasetDict:
    source = cfg.source
    try:
        if source in PACKAGED_DATASETS:  # converted once into split files, read as a user's
            return _load_files(packaged_dataset_files(source), source)
        path = Path(source).expanduser()
        if path.is_dir():
            if (path / "dataset_dict.json").is_file():
                return load_from_disk(str(path))
            # one file per split, named after it: train.tsv, test.tsv, ...
            files = {f.stem: f for f in sorted(path.iterdir()) if f.suffix.lower() in _LOADERS}
            if not files:
                raise EdgeDistillError(
                    f"data.source: {source}: folder has no data files (train.csv, test.csv, ...)")
            return _load_files(files, source)
        if path.is_file():
            return _load_files({"train": path}, source)
        if source.startswith((".", "/", "~")) or "/" not in source:
            known = ", ".join(PACKAGED_DATASETS)
            raise EdgeDistillError(
                f"data.source: {source}: no such file, folder or packaged data set "
                f"(packaged: {known})")
        return load_dataset(source)
    except EdgeDistillError:
        raise
    except Exception as e:  # network errors, unknown hub ids, broken or empty files
        raise EdgeDistillError(f"data.source: {source}: {_explain(e)}") from e


def _explain(error: BaseException) -> str:
    """Find what went wrong under `datasets`' generic DatasetGenerationError."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, UnicodeDecodeError):
            return f"not valid UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8"
        if "corresponds to no data" in str(e) or "No columns to parse" in str(e):
            return "a data file is empty (no rows); add rows or point to the right file"
        if isinstance(e, FileNotFoundError):
            return f"file not found ({e})"
    root = chain[-1]
    return f"could not load ({type(root).__name__}: {str(root).splitlines()[0][:200]})"


def _load_files(files: dict[str, Path], source: str) -> DatasetDict:
    suffixes = {f.suffix.lower() for f in files.values()}
    if len(suffixes) != 1 or next(iter(suffixes)) not in _LOADERS:
        raise EdgeDistillError(
            f"data.source: {source}: use files of one type among {', '.join(_LOADERS)}")
    suffix = suffixes.pop()
    if suffix == ".conll":
        return DatasetDict({split: _read_conll(path) for split, path in files.items()})
    if suffix == ".json":  # SQuAD's nested files are flattened here, other JSON read as it is
        squad = {split: _read_squad(path) for split, path in files.items()}
        if any(ds is not None for ds in squad.values()):
            return DatasetDict({split: load_dataset("json", data_files=str(files[split]),
                                                    split="train") if ds is None else ds
                                for split, ds in squad.items()})
    kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
    return load_dataset(_LOADERS[suffix], data_files={k: str(v) for k, v in files.items()}, **kw)


def _read_conll(path: Path) -> Dataset:
    """A CoNLL file (a word per line, its tag in the last column, a blank line between
    sentences, ``-DOCSTART-`` lines skipped) as columns ``tokens`` and ``tags``. Read here:
    `datasets` has no builder for local CoNLL files (the hub's conll2003 is a script)."""
    sentences, tokens, tags = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise EdgeDistillError(f"data.source: {path}, line {number}: '{line.strip()}' has no "
                                   "tag; CoNLL lines are 'word ... TAG', separated by spaces")
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.append((tokens, tags))
    return Dataset.from_dict({"tokens": [t for t, _ in sentences],
                              "tags": [g for _, g in sentences]})


def _read_squad(path: Path) -> Dataset | None:
    """A file in SQuAD's own nested layout (``{"data": [{"title", "paragraphs": [{"context",
    "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``) as one row per
    question, with the columns of `datasets`' flat SQuAD (id, title, context, question, answers
    as {text, answer_start}); None for any other JSON file, which `datasets` reads. Flattened
    here: `datasets` reads such a file as a single row."""
    with open(path, encoding="utf-8") as f:
        if f.read(1) != "{":
            return None
        f.seek(0)
        try:
            doc = json.load(f)
        except json.JSONDecodeError:  # JSON lines
            return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    rows = []
    for article in doc["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers") or []
                rows.append({"id": str(qa.get("id", len(rows))), "title": article.get("title", ""),
                             "context": paragraph.get("context"), "question": qa.get("question"),
                             "answers": {"text": [a.get("text") for a in answers],
                                         "answer_start": [a.get("answer_start") for a in answers]}})
    if not rows:
        raise EdgeDistillError(f"data.source: {path}: a SQuAD file with no questions (data -> "
                               "paragraphs -> qas is empty)")
    return Dataset.from_list(rows)


def _sample(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    """``limit`` rows of a ``seed``-ed shuffle, or all rows. Training rows are drawn with the
    recipe's seed (a seed of a comparison trains on its own rows); test rows with
    TEST_SPLIT_SEED, so every seed is scored on the same rows."""
    return ds if limit is None else ds.shuffle(seed=seed).select(range(min(limit, len(ds))))


def _train_and_test(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The source's training and test splits, as the recipe names them."""
    check_limits(DataConfig, cfg, "data.")  # a recipe's limits, for a DataConfig built in code
    raw = _read_raw(cfg)
    held_out = cfg.test_split not in raw and cfg.test_fraction is not None
    for split in (cfg.train_split,) if held_out else (cfg.train_split, cfg.test_split):
        if split not in raw:
            raise EdgeDistillError(
                f"data.source: {cfg.source}: has no split '{split}' (has: {', '.join(raw)}); "
                "set data.train_split / data.test_split, or data.test_fraction to hold out part "
                "of the training split as the test split")
    if not held_out:
        return raw[cfg.train_split], raw[cfg.test_split]
    # a fixed seed, not the recipe's: every seed of a comparison is scored on the same rows
    parts = raw[cfg.train_split].train_test_split(test_size=cfg.test_fraction,
                                                  seed=TEST_SPLIT_SEED)
    return parts["train"], parts["test"]


def load_task_data(cfg: DataConfig, seed: int = 42, labelled: bool = True) -> TaskData:
    """Read ``cfg.source``, check columns and labels, split off validation from train.

    ``labelled=False`` (language modelling) keeps the text column alone: no label column is
    needed and ``labels`` is empty."""
    train, test = _train_and_test(cfg)
    for name, ds in ((cfg.train_split, train), (cfg.test_split, test)):
        columns = [(cfg.text_column, "text_column")]
        if labelled:
            columns.append((cfg.label_column, "label_column"))
        for col, key in columns:
            if col not in ds.column_names:
                raise EdgeDistillError(
                    f"data.{key}: column '{col}' is missing from split '{name}' of {cfg.source} "
                    f"(columns: {', '.join(ds.column_names)})")
        if len(ds) == 0:
            raise EdgeDistillError(f"data.source: split '{name}' of {cfg.source} is empty")
    columns = [cfg.text_column] + ([cfg.label_column] if labelled else [])
    dropped = {}
    train, dropped[cfg.train_split] = _without_empty(train, cfg, columns, cfg.train_split)
    test, dropped[cfg.test_split] = _without_empty(test, cfg, columns, cfg.test_split)

    if not labelled:
        labels = []
    else:
        labels = cfg.labels or sorted({str(v) for v in train[cfg.label_column]})
    if labelled and len(labels) < 2:
        raise EdgeDistillError(f"data.labels: need at least 2 classes, found {labels}")
    index = {name: i for i, name in enumerate(labels)}
    clean = text_cleaner(cfg.source)

    def prepare(ds: Dataset, split: str, limit: int | None, sample_seed: int) -> Dataset:
        ds = _sample(ds, limit, sample_seed)
        bad = sorted({str(v) for v in ds[cfg.label_column]} - set(index)) if labelled else []
        if bad:
            raise EdgeDistillError(
                f"data.{cfg.label_column} in split '{split}': labels {bad[:5]} are not in the "
                f"label set {labels}; fix the data or set data.labels")
        texts = list(ds[cfg.text_column])
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise EdgeDistillError(
                    f"data.{cfg.text_column} in split '{split}', row {i}: expected text, got "
                    f"{type(t).__name__} {t!r}")
        texts = [clean(t) for t in texts] if clean else texts
        if not labelled:
            return Dataset.from_dict({"text": texts})
        out = Dataset.from_dict({"text": texts,
                                 "label": [index[str(v)] for v in ds[cfg.label_column]]})
        return out.cast_column("label", ClassLabel(names=labels))

    train = prepare(train, cfg.train_split, cfg.max_train_samples, seed)
    test = prepare(test, cfg.test_split, cfg.max_test_samples, TEST_SPLIT_SEED)
    # Stratify so rare classes (36 'neutral' test reviews in the default data) appear in both.
    try:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed,
                                       stratify_by_column="label" if labelled else None)
    except ValueError:  # a class too rare to stratify: fall back to a plain random split
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
    splits = DatasetDict(train=parts["train"], validation=parts["test"], test=test)
    return TaskData(splits=splits, labels=labels, dropped={k: v for k, v in dropped.items() if v})


def load_tagged_data(cfg: DataConfig, seed: int = 42) -> TaskData:
    """Read words with a tag each: ``data.text_column`` holds each example's words (a list),
    ``data.label_column`` their tags (as many), e.g. BIO tags (``B-PER``, ``I-PER``, ``O``).
    The splits keep ``tokens``, ``tags`` (tag ids) and ``text`` (the words joined by spaces:
    what calibration, pruning and the benchmark read)."""
    train, test = _train_and_test(cfg)
    for split, ds in ((cfg.train_split, train), (cfg.test_split, test)):
        for col, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
            if col not in ds.column_names:
                raise EdgeDistillError(
                    f"data.{key}: column '{col}' is missing from split '{split}' of "
                    f"{cfg.source} (columns: {', '.join(ds.column_names)}); tagged data "
                    "hold a list of words and a list of tags per row")
    labels = cfg.labels or sorted({str(t) for row in train[cfg.label_column] for t in row})
    index = {name: i for i, name in enumerate(labels)}

    def prepare(ds: Dataset, split: str, limit: int | None, sample_seed: int) -> Dataset:
        ds = _sample(ds, limit, sample_seed)
        rows = []
        for i, (words, tags) in enumerate(zip(ds[cfg.text_column], ds[cfg.label_column])):
            where = f"data.source: {cfg.source}, split '{split}', row {i}"
            if not isinstance(words, list) or not isinstance(tags, list):
                raise EdgeDistillError(f"{where}: expected a list of words and a list of tags, "
                                       f"got {type(words).__name__} and {type(tags).__name__}")
            if not words:
                if cfg.drop_empty:
                    continue
                raise EdgeDistillError(f"{where}: has no words; remove it, or set "
                                       "data.drop_empty: true to leave such rows out")
            if len(words) != len(tags):
                raise EdgeDistillError(f"{where}: {len(words)} words but {len(tags)} tags; "
                                       "give every word one tag")
            bad = sorted({str(t) for t in tags} - set(index))
            if bad:
                raise EdgeDistillError(f"{where}: tags {bad[:5]} are not in the label set "
                                       f"{labels}; fix the data or set data.labels")
            rows.append(([str(w) for w in words], [index[str(t)] for t in tags]))
        return Dataset.from_dict({"tokens": [w for w, _ in rows], "tags": [t for _, t in rows],
                                  "text": [" ".join(w) for w, _ in rows]})

    train = prepare(train, cfg.train_split, cfg.max_train_samples, seed)
    test = prepare(test, cfg.test_split, cfg.max_test_samples, TEST_SPLIT_SEED)
    parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
    return TaskData(DatasetDict(train=parts["train"], validation=parts["test"], test=test),
                    labels)


# the columns of a question-answering data set: `datasets`' flat SQuAD layout
QA_COLUMNS = ("question", "context", "answers")


def load_qa_data(cfg: DataConfig, seed: int = 42) -> TaskData:
    """Read questions with answers in a context (SQuAD's nested JSON, or rows with
    ``question``, ``context`` and ``answers`` = {text: [...], answer_start: [...]}, the layout
    of `datasets`' SQuAD). Every answer must sit in its context at its ``answer_start``
    (characters); the test split may give several answers per question (any one counts). The
    splits keep ``id``, those three columns, and ``text`` (question and context: what
    calibration and the benchmark read); there is no label set. Validation is split off by
    question, as the test split is."""
    train, test = _train_and_test(cfg)

    def prepare(ds: Dataset, split: str, limit: int | None, sample_seed: int) -> Dataset:
        missing = [c for c in QA_COLUMNS if c not in ds.column_names]
        if missing:
            raise EdgeDistillError(
                f"data.source: {cfg.source}: split '{split}' has no column {', '.join(missing)} "
                f"(columns: {', '.join(ds.column_names)}); questions need question, context and "
                "answers {text: [...], answer_start: [...]} (SQuAD's layout)")
        ds = _sample(ds, limit, sample_seed)
        ids = ds["id"] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        rows = []
        for i, (qid, question, context, answers) in enumerate(
                zip(ids, ds["question"], ds["context"], ds["answers"])):
            where = f"data.source: {cfg.source}, split '{split}', question {qid} (row {i})"
            if not (isinstance(question, str) and question.strip() and isinstance(context, str)
                    and context.strip()):
                raise EdgeDistillError(f"{where}: needs a question and a context (text)")
            if isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
                answers = {"text": [a.get("text") for a in answers],  # SQuAD's own answer list
                           "answer_start": [a.get("answer_start") for a in answers]}
            answers = answers if isinstance(answers, dict) else {}
            texts, starts = answers.get("text") or [], answers.get("answer_start") or []
            if not texts or len(texts) != len(starts):
                raise EdgeDistillError(
                    f"{where}: needs answers {{text: [...], answer_start: [...]}} with one start "
                    "per text; questions without an answer (SQuAD 2.0) are not supported")
            for text, start in zip(texts, starts):
                text = text if isinstance(text, str) else ""
                found = context[start:start + len(text)] if isinstance(start, int) else None
                if not text or found != text:
                    at = context.find(text) if text else -1
                    hint = (f"it is at character {at}: fix answer_start" if at >= 0 else
                            "the context does not contain it: fix the answer or the context")
                    raise EdgeDistillError(f"{where}: answer {text!r} is not at character "
                                           f"{start} of its context; {hint}")
            rows.append({"id": str(qid), "question": question.strip(), "context": context,
                         "answers": {"text": list(texts), "answer_start": list(starts)},
                         "text": f"{question.strip()} {context}"})
        if not rows:
            raise EdgeDistillError(f"data.source: split '{split}' of {cfg.source} is empty")
        return Dataset.from_list(rows)

    train = prepare(train, cfg.train_split, cfg.max_train_samples, seed)
    test = prepare(test, cfg.test_split, cfg.max_test_samples, TEST_SPLIT_SEED)
    parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
    return TaskData(DatasetDict(train=parts["train"], validation=parts["test"], test=test), [])


def _is_empty(value) -> bool:
    """An empty cell as pandas and the csv readers give it: None, NaN, or blank text."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or (isinstance(value, str) and not value.strip()))


def _without_empty(ds: Dataset, cfg: DataConfig, columns: list[str],
                   split: str) -> tuple[Dataset, int]:
    """``ds`` without its rows that have an empty cell in ``columns`` (and how many), when
    ``data.drop_empty`` says so; otherwise such rows are an error: an empty label would become
    a class of its own ("None") and an empty text a row of padding."""
    empty = [i for i, row in enumerate(zip(*(ds[c] for c in columns)))
             if any(_is_empty(v) for v in row)]
    if not empty:
        return ds, 0
    if not cfg.drop_empty:
        which = " or ".join(f"'{c}'" for c in columns)
        raise EdgeDistillError(
            f"data.source: {cfg.source}: {len(empty)} of {len(ds)} rows of split '{split}' have "
            f"an empty {which} cell (the first is data row {empty[0] + 1}); fill them, or set "
            "data.drop_empty: true to leave such rows out")
    skip = set(empty)
    return ds.select([i for i in range(len(ds)) if i not in skip]), len(empty)


def tokenize(ds: Dataset, tokenizer, max_length: int) -> Dataset:
    """Tokenize ``text`` without padding (the collator pads each batch to its longest row)."""
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    out = ds.map(encode, batched=True, remove_columns=["text"], desc="tokenize")
    return out.rename_column("label", "labels")



def lm_blocks(ds: Dataset, tokenizer, block_size: int) -> Dataset:
    """Token blocks of exactly ``block_size`` for causal language modelling.

    The texts are tokenized, joined with the end-of-text token between them and cut into
    blocks (the remainder shorter than a block is dropped), as language models are pretrained:
    no step is spent on padding, and every block has the same shape, so a teacher cache row
    lines up with a block. ``labels`` are the input ids (the model shifts them).
    """
    if tokenizer.eos_token_id is None:
        raise EdgeDistillError(f"{tokenizer.name_or_path}: tokenizer has no end-of-text token "
                               "to separate texts; set tokenizer.eos_token")
    ids = tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]
    stream = [t for row in ids for t in [*row, tokenizer.eos_token_id]]
    n = len(stream) // block_size
    if n == 0:
        raise EdgeDistillError(
            f"data: {len(stream)} tokens make no block of data.max_length={block_size}; "
            "add text or lower data.max_length")
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * n,
                              "labels": blocks})
