import pytest

from edgedistill.data import load_task_data, tokenize
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import DataConfig
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
    with pytest.raises(EdgeDistillError, match="has no split 'test'"):
        load_task_data(cfg(folder))


def test_text_that_is_not_utf8(tmp_path):
    folder = write_tsv(tmp_path / "d", 30, 10)
    (folder / "train.tsv").write_bytes(b"review\trating\n\xff\xfe bad bytes\tpositive\n")
    with pytest.raises(EdgeDistillError, match="not valid UTF-8"):
        load_task_data(cfg(folder))
