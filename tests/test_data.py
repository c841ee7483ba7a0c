import pytest

from edgedistill.data import load_task_data, tokenize
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe_blocks import DataConfig
from tests.conftest import LABELS, write_tsv


def cfg(source, **kw):
    return DataConfig(source=str(source), labels=LABELS, **kw)


def test_folder_of_split_files(tmp_path, tiny_tokenizer):
    folder = write_tsv(tmp_path / "d", 90, 45)
    data = load_task_data(cfg(folder, validation_fraction=0.2))
    assert (len(data.train), len(data.validation), len(data.test)) == (72, 18, 45)
    assert data.labels == LABELS
    # stratified: every class appears in the validation split
    assert set(data.validation["label"]) == {0, 1, 2}
    tok = tokenize(data.train, tiny_tokenizer, 8)
    assert set(tok.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert max(len(x) for x in tok["input_ids"]) <= 8


def test_packaged_drug_reviews():
    data = load_task_data(DataConfig())
    assert len(data.train) + len(data.validation) == 600 and len(data.test) == 379
    assert data.labels == ["negative", "neutral", "positive"]
    # HTML entities and the export's triple quotes are cleaned away
    assert not any("&#039;" in t or t.startswith('"') for t in data.test["text"])


def test_missing_label_column(tmp_path):
    folder = write_tsv(tmp_path / "d", 30, 10)
    with pytest.raises(EdgeDistillError, match="column 'stars' is missing.*columns: review, rating"):
        load_task_data(cfg(folder, label_column="stars"))


def test_labels_outside_the_label_set(tmp_path):
    folder = write_tsv(tmp_path / "d", 30, 10)
    with pytest.raises(EdgeDistillError, match=r"labels \['neutral'\] are not in the label set"):
        load_task_data(DataConfig(source=str(folder), labels=["negative", "positive"]))


def test_empty_split(tmp_path):
    folder = write_tsv(tmp_path / "d", 30, 10)
    (folder / "test.tsv").write_text("review\trating\n")
    with pytest.raises(EdgeDistillError, match="empty"):
        load_task_data(cfg(folder))


def test_missing_source_and_split(tmp_path):
    with pytest.raises(EdgeDistillError, match="no such file, folder or packaged data set"):
        load_task_data(cfg(tmp_path / "nowhere"))
    folder = write_tsv(tmp_path / "d", 30, 10)
    (folder / "test.tsv").unlink()
    with pytest.raises(EdgeDistillError, match="has no split 'test'.*data.test_fraction"):
        load_task_data(cfg(folder))


def test_a_test_split_held_out_of_the_training_split(tmp_path):
    folder = write_tsv(tmp_path / "d", 100, 10)
    (folder / "test.tsv").unlink()
    first = load_task_data(cfg(folder, test_fraction=0.2), seed=1)
    again = load_task_data(cfg(folder, test_fraction=0.2), seed=2)
    assert len(first.test) == 20 and len(first.train) + len(first.validation) == 80
    # the same test rows whatever the recipe's seed (the training rows are the other 80)
    assert list(first.test["text"]) == list(again.test["text"])
    assert sorted([*first.train["text"], *first.validation["text"]]) == sorted(
        [*again.train["text"], *again.validation["text"]])


def test_text_that_is_not_utf8(tmp_path):
    folder = write_tsv(tmp_path / "d", 30, 10)
    (folder / "train.tsv").write_bytes(b"review\trating\n\xff\xfe bad bytes\tpositive\n")
    with pytest.raises(EdgeDistillError, match="not valid UTF-8"):
        load_task_data(cfg(folder))


def test_lm_blocks_pack_texts_with_end_of_text_between_them():
    from datasets import Dataset

    from edgedistill.data import lm_blocks
    from tests.conftest import make_llm_tokenizer

    tokenizer = make_llm_tokenizer()
    ds = Dataset.from_dict({"text": ["good pain relief", "bad sleep", "great dose day week"]})
    blocks = lm_blocks(ds, tokenizer, 4)
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    stream = [*ids("good pain relief"), eos, *ids("bad sleep"), eos,
              *ids("great dose day week"), eos]
    # 3 + 1 + 2 + 1 + 4 + 1 = 12 tokens: three blocks of 4, nothing dropped, no padding
    assert blocks["input_ids"] == [stream[0:4], stream[4:8], stream[8:12]]
    assert blocks["labels"] == blocks["input_ids"]
    assert all(m == [1, 1, 1, 1] for m in blocks["attention_mask"])
    with pytest.raises(EdgeDistillError, match="make no block of data.max_length=64"):
        lm_blocks(ds, tokenizer, 64)


def test_unlabelled_data_needs_no_label_column(tmp_path):
    (tmp_path / "train.csv").write_text("review\nfirst text\nsecond text\nthird\nfourth\n")
    (tmp_path / "test.csv").write_text("review\nheld out\n")
    data = load_task_data(DataConfig(source=str(tmp_path), validation_fraction=0.25),
                          labelled=False)
    assert data.labels == [] and data.train.column_names == ["text"]
    assert len(data.train) == 3 and len(data.validation) == 1 and data.test["text"] == ["held out"]


def test_an_empty_label_or_text_is_an_error_or_dropped_and_counted(tmp_path):
    """An empty label cell must never become a class named 'None'."""
    folder = write_tsv(tmp_path / "data", 40, 10)
    train = (folder / "train.tsv").read_text().splitlines()
    train[3] = train[3].split("\t")[0] + "\t"          # data row 3: no label
    train[7] = "\t" + train[7].split("\t")[1]           # data row 7: no text
    (folder / "train.tsv").write_text("\n".join(train) + "\n")
    with pytest.raises(EdgeDistillError, match=r"2 of 40 rows of split 'train' have an empty "
                                               r"'review' or 'rating' cell \(the first is data "
                                               r"row 3\); .* data.drop_empty: true"):
        load_task_data(DataConfig(source=str(folder)))
    data = load_task_data(DataConfig(source=str(folder), drop_empty=True))
    assert data.labels == LABELS and data.dropped == {"train": 2}
    assert len(data.train) + len(data.validation) == 38


def test_capped_test_rows_are_the_same_for_every_seed_and_training_rows_are_not(tmp_path):
    folder = write_tsv(tmp_path / "d", 100, 60)
    first, again = (load_task_data(cfg(folder, max_train_samples=30, max_test_samples=20),
                                   seed=seed) for seed in (1, 2))
    # a comparison over seeds scores every seed on the same rows
    assert len(first.test) == 20 and list(first.test["text"]) == list(again.test["text"])
    # and each seed trains on its own sample of the training split
    assert sorted([*first.train["text"], *first.validation["text"]]) != sorted(
        [*again.train["text"], *again.validation["text"]])
