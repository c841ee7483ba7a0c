"""The whole pipeline on a tiny random model, through the CLI a user types."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.tasks.classification import ClassificationTask
from tests.conftest import write_tsv

RECIPE = """
version: 1
name: "../../<b>tiny</b>"
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 2, batch_size: 16, learning_rate: 1.0e-3}}
student: {{num_layers: 2}}
distill: {{epochs: 2, batch_size: 16, learning_rate: 1.0e-3,
          matches: [{{loss: hidden_mse, strategy: uniform, weight: 0.5}},
                    {{loss: minilm_relation, weight: 0.5}}]}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 4,
         sequence_length: 32, rounds: 1}}
report:
  targets:
    - {{name: int8 keeps F1, value: student-int8.metrics.macro_f1,
       per: teacher.metrics.macro_f1, at_least: 0.5}}
    - {{value: teacher.latency.p50_ms, per: student-int8.latency.p50_ms, at_least: 1.0}}
    - {{value: student-int8.size_mb, per: student-onnx.size_mb, at_most: 0.5}}
    - {{value: student-fp16.size_mb, at_most: 1}}
"""


@pytest.fixture
def recipe(tmp_path, tiny_teacher_dir):
    data = write_tsv(tmp_path / "data", 80, 30)
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(data=data, teacher=tiny_teacher_dir))
    return path


def mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/manifest.json")}


def test_run_end_to_end_then_skip_then_partial_rerun(recipe, tmp_path, capsys,
                                                        monkeypatch):
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out)]) == 0

    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    # the cpu profile ships the int8 student on onnxruntime and OpenVINO, both measured
    assert names == ["teacher", "teacher-onnx", "student", "student-onnx", "student-int8",
                     "student-int8-openvino"]
    openvino = report["models"][-1]
    assert openvino["backend"] == "openvino" and openvino["inference_precision"] == "f32"
    for m in report["models"]:
        assert 0 <= m["metrics"]["macro_f1"] <= 1 and m["latency"]["p50_ms"] > 0
        assert m["peak_rss_mb"] > 0 and m["size_mb"] > 0
    student = next(m for m in report["models"] if m["name"] == "student")
    assert student["metrics"]["agreement"] is not None
    assert report["training"]["distill"]["teacher_layers"] == [0, 3]
    # the recipe's own targets, one per line; student-fp16 was not made (cpu profile): skipped
    assert [t["goal"] for t in report["targets"]] == [">= 0.5", ">= 1.0", "<= 0.5"]
    assert report["targets"][0]["target"] == "int8 keeps F1"
    assert report["targets"][2]["met"] is True  # int8 weights: about a quarter of fp32
    assert (out / "report.html").is_file() and (out / "plots" / "size.png").is_file()
    # the run's name is text, never a path, and it is escaped in the HTML
    assert "&lt;b&gt;tiny&lt;/b&gt;" in (out / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out", "teacher", "tiny.yaml"]
    first = mtimes(out)
    assert set(first) == {"teacher", "distill", "export", "quantize", "evaluate", "bench"}
    assert not list(out.glob("*.partial")) and not list(out.glob("*/checkpoints"))

    # the training log: one line per epoch, never the Trainer's raw dict (that goes to the
    # stage's log file with the libraries' own logs); no library warning on the terminal
    printed = "".join(capsys.readouterr())
    assert "{'loss'" not in printed and "{'eval_loss'" not in printed
    assert "epoch 1: loss " in printed and "epoch 1: validation " in printed
    assert "kept the best epoch: validation " in printed and "done in " in printed
    assert "Warning" not in printed and "Opset" not in printed and "%|" not in printed
    assert "Statistics collection" not in printed  # NNCF's bars go to quantize.log
    assert {p.name for p in (out / "logs").iterdir()} == {
        "preflight.log", *(f"{s}.log" for s in first)}
    assert "trainer log: {'loss'" in (out / "logs" / "distill.log").read_text()
    # the export took the exporter's recommended opset, so it has nothing to warn about
    assert json.loads((out / "export" / "manifest.json").read_text())["record"]["student"][
        "opset"] == 18
    assert "WARNING" not in (out / "logs" / "export.log").read_text()

    # unchanged recipe: nothing reruns
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    assert mtimes(out) == first
    assert capsys.readouterr().err.count("unchanged, skipped") == 6

    # a model moved out of a finished stage by hand: the next stage that loads the models
    # (evaluation, its settings changed) names the folder to delete; deleting it rebuilds it
    (out / "quantize" / "student-int8").rename(tmp_path / "int8")
    again = ["run", str(recipe), "--output", str(out), "--set", "evaluate.batch_size=4"]
    assert main(again) == 2
    assert (f"{out / 'quantize' / 'student-int8'}: student-int8 is missing from a finished "
            f"stage; delete {out / 'quantize'} to build it again") in capsys.readouterr().err
    shutil.rmtree(out / "quantize")
    assert main(again) == 0 and (out / "quantize" / "student-int8").is_dir()
    rebuilt = mtimes(out)
    assert rebuilt["export"] == first["export"] and rebuilt["quantize"] != first["quantize"]

    # code that names or places its models otherwise (another edgedistill) builds them again
    # instead of reading the old folders under the new names
    listed = ClassificationTask.models
    monkeypatch.setattr(ClassificationTask, "models", lambda *a: [
        {**m, "name": "student-q8"} if m["name"] == "student-int8" else m for m in listed(*a)])
    assert main(again) == 0
    renamed = mtimes(out)
    assert renamed["export"] == first["export"]
    assert all(renamed[s] != rebuilt[s] for s in ("quantize", "evaluate", "bench"))
    assert "student-q8" in {m["name"] for m in json.loads((out / "report.json").read_text())[
        "models"]}
    monkeypatch.undo()

    # a distillation setting changed: the teacher is kept, the student and what follows redone
    assert main(["run", str(recipe), "--output", str(out), "--set",
                 "distill.temperature=4"]) == 0
    second = mtimes(out)
    assert second["teacher"] == first["teacher"]
    assert all(second[s] != first[s] for s in ("distill", "export", "quantize", "bench"))

    # a stage whose manifest is missing is not finished, so it runs again
    (out / "quantize" / "manifest.json").unlink()
    assert main(["run", str(recipe), "--output", str(out), "--set",
                 "distill.temperature=4"]) == 0
    third = mtimes(out)
    assert third["quantize"] != second["quantize"] and third["export"] == second["export"]

    # static int8, calibrated on training texts: only quantization and what follows rerun;
    # --quiet --json: stderr has the summary alone, stdout the JSON alone (onnxruntime's
    # calibrator prints its progress: into the stage's log)
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(out), "--set", "distill.temperature=4",
                 "--set", "quantize.mode=static", "--quiet", "--json"]) == 0
    stdout, stderr = capsys.readouterr()
    assert [m["model"] for m in json.loads(stdout)["models"]][-2:] == [
        "student-int8", "student-int8-openvino"]
    assert "[4/6]" not in stderr and "done in" not in stderr and "student-int8" in stderr
    assert "Collecting tensor data" in (out / "logs" / "quantize.log").read_text()
    fourth = mtimes(out)
    assert fourth["export"] == third["export"] and fourth["quantize"] != third["quantize"]
    record = json.loads((out / "quantize" / "manifest.json").read_text())["record"]
    assert record["mode"] == "static" and record["calibration_samples"] == 72  # 80 - 10%
    assert ("int8: static (ranges from percentile calibration on 72 training texts)"
            in (out / "report.md").read_text())


def test_tuned_quantization_and_a_tuning_that_finds_nothing(recipe, tmp_path, monkeypatch):
    """quantize.tolerable_loss: the trials go into the report; when none passes, the default
    int8 model is evaluated and benchmarked, and the report says it fails the tolerance."""
    import edgedistill.tasks.classification as classification

    out = tmp_path / "out"
    loose = ["run", str(recipe), "--output", str(out), "--set", "quantize.tolerable_loss=0.5"]
    assert main(loose) == 0
    record = json.loads((out / "quantize" / "manifest.json").read_text())["record"]
    assert record["tuning"]["passed"] and record["tuning"]["chosen"] == 1
    assert record["tuning"]["texts"] == 8  # the validation split (10% of 80), not the test's
    text = (out / "report.md").read_text()
    assert "## Quantization tuning" in text and "student-int8 is trial 1" in text

    def nothing_passes(*args, **kwargs):
        return {"passed": False, "metric": "macro_f1", "tolerable_loss": 0.001, "max_trials": 1,
                "baseline": {"metric": 0.5}, "trials": [
                    {"index": 1, "setting": "dynamic-fused", "kept_fp32": [], "metric": 0.4,
                     "relative_loss": 0.2, "agreement": 0.9, "kl": 0.01, "p50_ms": 1.0,
                     "passed": False}], "chosen": None, "skipped": [], "ranking": None}

    monkeypatch.setattr(classification, "tune", nothing_passes)
    assert main(loose[:-1] + ["quantize.tolerable_loss=0.001"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["tuning"]["passed"] is False
    assert report["quantization"]["mode"] == "dynamic"  # the default int8, evaluated anyway
    assert "student-int8" in [m["name"] for m in report["models"]]
    assert "NO setting kept macro_f1 within 0.1%" in (out / "report.md").read_text()
    assert main(loose[:-1] + ["quantize.tolerable_loss=2"]) == 2  # refused before any work


def test_distill_command_stops_after_the_student(recipe, tmp_path):
    out = tmp_path / "out"
    assert main(["distill", str(recipe), "--output", str(out)]) == 0
    assert (out / "distill" / "model" / "model.safetensors").is_file()
    assert not (out / "export").exists() and not (out / "report.json").exists()


def test_a_run_stops_after_the_teacher_when_asked(recipe, tmp_path):
    from edgedistill.pipeline import run

    out = tmp_path / "out"
    with pytest.raises(EdgeDistillError, match="until: 'export' is not a stage a run can stop"):
        run(recipe, out, until="export")
    assert run(recipe, out, until="teacher") is None
    assert (out / "teacher" / "manifest.json").is_file() and not (out / "distill").exists()


def test_a_task_registered_outside_the_package_runs_and_an_unknown_one_is_refused(
        recipe, tmp_path, capsys, monkeypatch):
    """A third task is one Task subclass and one register_task call; the pipeline asks it."""
    from edgedistill import tasks
    from edgedistill.tasks.classification import ClassificationTask

    asked = []

    class TopicTask(ClassificationTask):
        name = "topic"

        def check(self, r):
            asked.append(r.task)
            super().check(r)

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # undone after the test
    tasks.register_task(TopicTask())
    out = tmp_path / "out"
    assert main(["distill", str(recipe), "--output", str(out), "--set", "task=topic"]) == 0
    assert asked == ["topic"] and (out / "distill" / "model" / "config.json").is_file()
    assert main(["run", str(recipe), "--output", str(tmp_path / "o2"), "--set", "task=topik"]) == 2
    assert f"{recipe}: task: 'topik' is unknown; did you mean 'topic'?" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_a_narrower_random_student_is_saved_without_its_projections(recipe, tmp_path):
    out = tmp_path / "out"
    assert main(["distill", str(recipe), "--output", str(out), "--set", "student.init=random",
                 "--set", "student.config={hidden_size: 16, intermediate_size: 32}"]) == 0
    model = out / "distill" / "model"
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 16
    assert not any(k.startswith("distill_projections")
                   for k in load_file(model / "model.safetensors"))
    log = json.loads((out / "distill" / "manifest.json").read_text())["record"]["log_history"]
    assert any("loss_hidden_mse" in h and "loss_minilm_relation" in h for h in log)


def test_a_task_missing_what_it_must_say_is_refused_when_registered():
    from edgedistill.tasks import register_task
    from edgedistill.tasks.base import Task
    from edgedistill.tasks.classification import ClassificationTask

    class Half(Task):
        name = "half"

    with pytest.raises(EdgeDistillError, match="missing: selection, training_sets, evaluate, "
                                               "bench"):
        register_task(Half())
    with pytest.raises(EdgeDistillError, match="'classification' is registered already"):
        register_task(ClassificationTask())
