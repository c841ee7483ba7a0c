"""Task sentence-embedding on a tiny random sentence-transformers folder: pooling read and
written in sentence-transformers' files, the pooling inside the exported graph, the metrics of
agreement with the teacher, the whole pipeline, and its refusals."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertModel

from edgedistill.artifacts import onnx_file
from edgedistill.cli import main
from edgedistill.distill.losses import embedding_similarity
from edgedistill.distill.student import plan_student
from edgedistill.distill.teacher_outputs import teacher_embeddings
from edgedistill.errors import EdgeDistillError
from edgedistill.evaluation import embedding_metrics
from edgedistill.export import export_onnx
from edgedistill.pooling import (
    DENSE,
    Pooling,
    pool,
    read_pooling,
    write_sentence_transformers_files,
)
from edgedistill.recipe import load_recipe
from edgedistill.recipe_blocks import StudentConfig
from edgedistill.runtime.classifier import load_predictor
from edgedistill.tasks import get_task
from tests.conftest import WORDS, make_texts, make_tokenizer, write_tsv
from tests.test_model_card import execute, python_blocks

MEAN_UNIT = Pooling("mean", True)  # all-MiniLM-L6-v2's and all-mpnet-base-v2's pooling


def make_embedder(folder, pooling=MEAN_UNIT, layers=4, seed=0):
    """A tiny BERT encoder saved as sentence-transformers saves one (with a Dense module of
    random weights where the pooling names one)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    if pooling is not None:
        dense = nn.Linear(32, pooling.dense, bias=pooling.bias) if pooling.dense else None
        write_sentence_transformers_files(folder, pooling, 32, 64, dense)
    return folder


# LaBSE's and distiluse's shape: a tanh Dense layer to another width after mean pooling
MEAN_DENSE = Pooling("mean", True, dense=24, activation="tanh")


@pytest.mark.parametrize("pooling", [Pooling("mean", True), Pooling("cls", False), MEAN_DENSE,
                                     Pooling("cls", False, dense=40, bias=False)])
def test_exported_graph_pools_as_pytorch_does_with_padding(tmp_path, pooling):
    folder = make_embedder(tmp_path / "st", pooling)
    assert read_pooling(folder) == pooling
    export_onnx(folder, tmp_path / "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    tokenizer = make_tokenizer(tmp_path / "tok")
    # rows of different lengths: padding must not count
    enc = tokenizer(["good", "bad pain week headache sleep dose worse"], padding=True,
                    return_tensors="pt")
    model = get_task("sentence-embedding").load_model(folder).eval()
    dense = getattr(model, DENSE, None)
    assert (dense is None) == (pooling.dense is None)
    with torch.no_grad():
        expected = pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling,
                        dense).numpy()
        alone = pool(model(**tokenizer(["good"], return_tensors="pt")).last_hidden_state,
                     torch.ones(1, 3, dtype=torch.long), pooling, dense).numpy()
    if pooling.dense:  # the folder's Dense weights, not a fresh layer's
        saved = load_file(folder / "2_Dense" / "model.safetensors")
        assert torch.equal(dense.weight, saved["linear.weight"])
    assert expected.shape == (2, pooling.dense or 32)
    got = session.run(None, {k: v.numpy() for k, v in enc.items()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got[0], alone[0], atol=1e-5)  # padded row == the row alone
    # the runtime of evaluation and benchmark returns the same vectors on either backend
    np.testing.assert_allclose(load_predictor(folder).logits({k: v.numpy() for k, v in enc.items()}),
                               expected, atol=1e-5)


def test_a_shape_of_a_teacher_with_a_dense_module_is_timed_with_that_layer(tmp_path):
    # the search exports each shape untrained: a width-pruned shape of a Dense teacher gets a
    # fresh Dense layer from its own width onto the teacher's Dense width, as it ships (a
    # shape saved without it could not be exported: its config names a Dense layer)
    task = get_task("sentence-embedding")
    teacher = make_embedder(tmp_path / "teacher", MEAN_DENSE)
    shape = StudentConfig(num_layers=1, init="pruned", config={"hidden_size": 16})
    config, _ = plan_student(teacher, task.load_model(teacher).config, shape)
    model = task.untrained_model(config)
    assert getattr(model, DENSE).in_features == 16
    task.save_model(model, make_tokenizer(tmp_path / "tok"), tmp_path / "shape")
    assert read_pooling(tmp_path / "shape") == MEAN_DENSE
    export_onnx(tmp_path / "shape", tmp_path / "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    enc = make_tokenizer(tmp_path / "tok")(["good dose"], return_tensors="np")
    assert session.run(None, dict(enc))[0].shape == (1, 24)


def test_a_dense_module_gives_the_embeddings_sentence_transformers_gives(tmp_path):
    st = pytest.importorskip("sentence_transformers")  # not installed by ./setup.sh
    folder = make_embedder(tmp_path / "st", MEAN_DENSE)
    texts = ["good", "bad pain week headache sleep dose worse"]
    ours = load_predictor(folder).logits(dict(make_tokenizer(tmp_path / "tok")(
        texts, padding=True, return_tensors="np")))
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_pooling_files_that_edgedistill_cannot_export_are_refused(tmp_path):
    folder = make_embedder(tmp_path / "st")
    settings = json.loads((folder / "1_Pooling" / "config.json").read_text())
    settings["pooling_mode_max_tokens"] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings))
    with pytest.raises(EdgeDistillError, match="not one that edgedistill exports"):
        read_pooling(folder)
    assert read_pooling(make_embedder(tmp_path / "plain", pooling=None)) is None
    # a module after the pooling changes the embedding: read, or refused, never skipped
    folder = make_embedder(tmp_path / "dense", MEAN_DENSE)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(
        [*modules, {"idx": 4, "name": "4", "path": "4_LayerNorm",
                    "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(EdgeDistillError, match="its module sentence_transformers.models."
                                               "LayerNorm .modules.json. is not one"):
        read_pooling(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    settings = json.loads((folder / "2_Dense" / "config.json").read_text())
    settings["activation_function"] = "torch.nn.modules.activation.ReLU"
    (folder / "2_Dense" / "config.json").write_text(json.dumps(settings))
    with pytest.raises(EdgeDistillError, match="activation torch.nn.modules.activation.ReLU "
                                               "is not one edgedistill exports"):
        read_pooling(folder)


def test_metrics_are_perfect_for_the_reference_and_drop_for_noise():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(60, 16)).astype(np.float32)
    labels = [0] * 30 + [1] * 30
    teacher[:30] += 3.0  # two clusters: k-NN can tell the labels apart
    same = embedding_metrics(teacher, teacher, labels)
    assert same["cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["recall_at_k"] == pytest.approx(1.0) and same["knn_accuracy"] > 0.9
    assert same["index_recall_at_k"] == pytest.approx(1.0)
    noisy = embedding_metrics(teacher + rng.normal(scale=2.0, size=teacher.shape), teacher)
    assert noisy["spearman"] < 0.9 and noisy["recall_at_k"] < 0.9
    assert noisy["index_recall_at_k"] < 0.9
    # the teacher's similarities in another space: its own index agrees, the teacher's not
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = embedding_metrics(teacher @ rotation, teacher)
    assert rotated["recall_at_k"] == pytest.approx(1.0) and rotated["index_recall_at_k"] < 0.5
    other_width = embedding_metrics(rng.normal(size=(60, 8)), teacher)
    assert other_width["cosine"] is None and -0.5 < other_width["spearman"] < 0.5
    assert other_width["index_recall_at_k"] is None


RECIPE = """
version: 1
task: sentence-embedding
data: {{source: {data}, max_length: 32{labels}}}
teacher: {{model: {teacher}, finetune: false}}
student: {{num_layers: 2}}
distill: {{epochs: 3, batch_size: 16, learning_rate: 1.0e-3, distill_loss: embedding_mse,
          alpha_distill: 1.0}}
quantize: {{runtimes: [onnxruntime]}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 0,
         sequence_length: 32, rounds: 1}}
"""


def write_recipe(tmp_path, labels=True, pooling=MEAN_UNIT, **changes):
    data = write_tsv(tmp_path / "data", 90, 40)
    text = RECIPE.format(data=data, teacher=make_embedder(tmp_path / "teacher", pooling),
                         labels=", labels: [negative, neutral, positive]" if labels else "")
    for old, new in changes.items():
        text = text.replace(old, new)
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def report_metrics(out) -> dict:
    """Each model's test metrics in the run's report, by name."""
    return {m["name"]: m["metrics"] for m in json.loads((out / "report.json").read_text())[
        "models"]}


def test_pipeline_distils_exports_quantizes_and_reports_an_embedder(tmp_path, capsys):
    out = tmp_path / "out"
    # a layer match beside the embedding loss: the live teacher runs for it
    recipe = write_recipe(tmp_path, **{"alpha_distill: 1.0": (
        "alpha_distill: 1.0,\n          matches: [{loss: hidden_mse, strategy: uniform, "
        "weight: 0.5}]")})
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {m["name"]: m for m in report["models"]}
    assert list(rows) == ["teacher", "teacher-onnx", "student", "student-onnx", "student-int8"]
    assert rows["teacher"]["metrics"]["spearman"] == pytest.approx(1.0)
    assert rows["teacher-onnx"]["metrics"]["spearman"] == pytest.approx(1.0, abs=1e-3)
    for name in ("teacher-onnx", "student", "student-onnx", "student-int8"):
        m = rows[name]["metrics"]
        assert -1 <= m["spearman"] <= 1 and 0 <= m["recall_at_k"] <= 1
        assert "knn_accuracy" in m and rows[name]["index"]["throughput_per_s"] > 0
    # the ONNX student gives the PyTorch student's embeddings: same scores
    assert rows["student-onnx"]["metrics"]["spearman"] == pytest.approx(
        rows["student"]["metrics"]["spearman"], abs=1e-3)
    student = out / "distill" / "model"
    assert read_pooling(student) == Pooling("mean", True)
    assert json.loads((student / "modules.json").read_text())[1]["path"] == "1_Pooling"
    assert "Spearman vs teacher" in (out / "report.md").read_text()
    # the int8 model's card: its loading code runs and prints the embedding's shape
    card = (out / "quantize" / "student-int8" / "README.md").read_text()
    assert "sentence embeddings (weight 1)" in card and "temperature" not in card
    printed = execute(python_blocks(card)[0])
    assert printed.startswith("(2, 32) cosine")
    # the validation score that chose the epoch: embedding_mse asks for the teacher's vectors,
    # so the cosine to them (Spearman agreement with its similarities is logged beside it)
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    assert record["selection"]["metric"] == "cosine"
    assert all("eval_cosine" in h for h in record["log_history"] if "eval_spearman" in h)
    assert len(record["selection"]["per_epoch"]) == 3
    losses = [h for h in record["log_history"] if "loss_distill" in h]
    assert losses and all(h["loss_hidden_mse"] > 0 for h in losses)


def test_more_text_in_a_transfer_set_is_embedded_by_the_teacher_and_trained_on(tmp_path):
    # on-device search indexes other text than the labelled set: transfer.unlabelled adds it
    out, extra = tmp_path / "out", make_texts(30, seed=7)[0]
    train, test = make_texts(90, 0)[0], make_texts(40, 1)[0]
    (tmp_path / "more.txt").write_text("\n".join([*extra, extra[0], train[5], test[3]]) + "\n")
    recipe = write_recipe(tmp_path, **{"epochs: 3": "epochs: 1", "quantize:": (
        f"transfer: {{unlabelled: [{{source: {tmp_path / 'more.txt'}}}]}}\nquantize:")})
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    # a repeat, a training text and a test text left out; the teacher embedded the rest
    assert record["transfer"]["size"] == len(set(extra)) == 30
    assert record["transfer"]["sources"] == {str(tmp_path / "more.txt"): 30}
    assert record["transfer"]["training_rows"] == 81
    # kept apart from the training texts' embeddings: train, validation, transfer set
    assert len(list((tmp_path / "teacher-logits").glob("embeddings-*.safetensors"))) == 3
    # one epoch over both in batches of 16 (the training texts alone take 6 steps)
    assert {h["step"] for h in record["log_history"] if "eval_spearman" in h} == {7}
    assert "transfer set: 30 teacher-labelled rows beside 81" in (out / "report.md").read_text()


def test_similarity_loss_ignores_width_and_rotation():
    torch.manual_seed(0)
    teacher = torch.randn(6, 8)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    wider = torch.cat([teacher, torch.zeros(6, 4)], 1) @ rotation  # same similarities
    assert embedding_similarity(wider, teacher) == pytest.approx(0.0, abs=1e-6)
    assert embedding_similarity(torch.randn(6, 4), teacher) > 0.05


def test_a_narrower_student_learns_the_teachers_similarities(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, **{
        "student: {num_layers: 2}": "student: {init: pruned, config: {hidden_size: 16}}",
        "distill_loss: embedding_mse": "distill_loss: embedding_similarity"})
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    rows = report_metrics(out)
    for name in ("student", "student-int8"):
        assert rows[name]["cosine"] is None and -1 <= rows[name]["spearman"] <= 1
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    first, *_, last = [h["eval_spearman"] for h in record["log_history"] if "eval_spearman" in h]
    assert last > first  # it learns the teacher's similarities
    assert read_pooling(out / "distill" / "model") == Pooling("mean", True)


def test_a_narrower_student_learns_the_teachers_vectors_through_a_projection(tmp_path):
    # a pointwise loss on a student of another width: the trainer adds a Dense layer onto
    # the teacher's width, saved as sentence-transformers' module and exported in the graph
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, **{
        "student: {num_layers: 2}": "student: {init: pruned, config: {hidden_size: 16}}",
        "distill_loss: embedding_mse": "distill_loss: embedding_cosine"})
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    rows = report_metrics(out)
    for name in ("student", "student-onnx", "student-int8"):
        assert -1 <= rows[name]["cosine"] <= 1  # in the teacher's space: comparable vectors
    assert rows["student-onnx"]["cosine"] == pytest.approx(rows["student"]["cosine"], abs=1e-3)
    record = json.loads((out / "distill" / "manifest.json").read_text())["record"]
    # the epoch is chosen by what the loss asks for: the teacher's vectors
    assert record["selection"]["metric"] == "cosine"
    # the projection starts at the least-squares map from the student's embeddings to the
    # teacher's (this student's blocks are the teacher's, pruned): near them after one epoch,
    # where a random start was at 0.35
    first = next(h["eval_cosine"] for h in record["log_history"] if "eval_cosine" in h)
    assert first > 0.9
    student = out / "distill" / "model"
    assert read_pooling(student) == Pooling("mean", True, dense=32)
    assert [m["path"] for m in json.loads((student / "modules.json").read_text())] == [
        "", "1_Pooling", "2_Dense", "3_Normalize"]
    assert not any(DENSE in k for k in load_file(student / "model.safetensors"))
    session = ort.InferenceSession(str(onnx_file(out / "quantize" / "student-int8")))
    assert session.get_outputs()[0].shape[-1] == 32


def test_a_teacher_with_a_dense_module_is_distilled_and_exported_with_it(tmp_path):
    # the student keeps two of its blocks and its tanh Dense layer onto 24 dimensions
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, pooling=MEAN_DENSE, **{"epochs: 3": "epochs: 1"})
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    rows = report_metrics(out)
    assert rows["teacher-onnx"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert rows["student-onnx"]["cosine"] == pytest.approx(rows["student"]["cosine"], abs=1e-3)
    for folder in (out / "teacher" / "model", out / "distill" / "model"):
        assert read_pooling(folder) == MEAN_DENSE
        assert (folder / "2_Dense" / "model.safetensors").is_file()
    teacher = load_file(tmp_path / "teacher" / "2_Dense" / "model.safetensors")
    student = load_file(out / "distill" / "model" / "2_Dense" / "model.safetensors")
    assert not torch.equal(teacher["linear.weight"], student["linear.weight"])  # trained


def test_teacher_embeddings_are_kept_for_the_next_run_with_the_same_teacher_and_texts(
        tmp_path, monkeypatch):
    task = get_task("sentence-embedding")
    teacher = task.load_model(make_embedder(tmp_path / "teacher"))
    tokenizer = make_tokenizer(tmp_path / "teacher")
    texts = make_texts(24)[0]  # 5 to 14 words: batches sorted by length
    first = teacher_embeddings(teacher, tokenizer, texts, batch_size=5)
    with torch.no_grad():  # text by text, as the model reads one alone: the order was kept
        for i in (0, 11, 23):
            ids = tokenizer(texts[i], return_tensors="pt")
            alone = pool(teacher(**ids).last_hidden_state, ids["attention_mask"], MEAN_UNIT)[0]
            assert torch.allclose(torch.tensor(first[i]), alone, atol=1e-5)

    def refuse(**batch):
        raise AssertionError("the teacher ran although its embeddings were kept")

    with monkeypatch.context() as patch:
        patch.setattr(teacher, "forward", refuse)
        assert teacher_embeddings(teacher, tokenizer, texts) == first
    # other texts, or the same texts cut shorter: computed again, into a file of their own
    teacher_embeddings(teacher, tokenizer, texts[:20])
    teacher_embeddings(teacher, tokenizer, texts, max_length=6)
    files = list((tmp_path / "teacher-logits").glob("embeddings-*.safetensors"))
    assert len(files) == 3


def test_labels_are_read_only_when_the_recipe_names_them(tmp_path):
    task = get_task("sentence-embedding")
    unlabelled = task.load_data(load_recipe(write_recipe(tmp_path, labels=False)).data, 42)
    assert unlabelled.labels == [] and unlabelled.test.column_names == ["text"]
    labelled = task.load_data(load_recipe(write_recipe(tmp_path)).data, 42)
    assert labelled.labels == ["negative", "neutral", "positive"]


@pytest.mark.parametrize("change, message", [
    ({"finetune: false": "finetune: true"}, "teacher.finetune: a sentence-embedding teacher"),
    ({"distill_loss: embedding_mse": "distill_loss: soft_cross_entropy"},
     "distill.distill_loss: 'soft_cross_entropy' does not compare sentence embeddings"),
    ({"alpha_distill: 1.0": "alpha_distill: 0"},
     "distill.alpha_distill: 0"),
    ({"quantize:": "transfer: {augment: {factor: 2}}\nquantize:"},
     "transfer: task sentence-embedding takes more text (transfer.unlabelled) only"),
])
def test_bad_settings_are_one_line_and_nothing_is_written(tmp_path, capsys, change, message):
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path, **change)), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (out / "teacher").exists()


def test_teacher_without_pooling_is_refused_in_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    for name in ("modules.json", "sentence_bert_config.json"):
        (tmp_path / "teacher" / name).unlink()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "teacher.model" in err and "has no pooling information" in err
    assert not (tmp_path / "out" / "teacher").exists()


def test_teacher_with_a_module_edgedistill_does_not_export_is_refused_in_one_line(tmp_path,
                                                                                 capsys):
    recipe = write_recipe(tmp_path, pooling=MEAN_DENSE)
    settings_file = tmp_path / "teacher" / "2_Dense" / "config.json"
    settings = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps({**settings, "activation_function": "my.Swish"}))
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Dense module's activation my.Swish is not one" in err
    assert not (tmp_path / "out" / "teacher").exists()


def test_student_model_without_pooling_is_refused_before_any_stage(tmp_path, capsys):
    # a bare encoder: nothing says how to pool it
    student = make_embedder(tmp_path / "plain", pooling=None, layers=2, seed=1)
    recipe = write_recipe(tmp_path,
                          **{"student: {num_layers: 2}": f"student: {{model: {student}}}"})
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"student.model: {student} has no pooling information" in err
    assert not (tmp_path / "out" / "teacher").exists()
