import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from edgedistill.bench.stats import Latency
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import Recipe, load_recipe, recipe_from_dict
from edgedistill.report import build_report, judge_targets, write_report
from edgedistill.tasks import get_task


def fake_models():
    def m(name, role, backend, precision, f1, p50, size):
        samples = np.random.default_rng(0).lognormal(np.log(p50 / 1000), 0.2, 200)
        return {"name": name, "role": role, "backend": backend, "precision": precision,
                "path": f"/x/{name}", "metrics": {"accuracy": f1, "macro_f1": f1},
                "latency": {**Latency.from_seconds(list(samples)).to_dict(), "p50_ms": p50,
                            "p99_ms": p50 * 2}, "size_mb": size, "peak_rss_mb": 100.0}
    return [m("teacher", "teacher", "pytorch", "fp32", 0.50, 20.0, 90.0),
            m("teacher-onnx", "teacher", "onnxruntime", "fp32", 0.50, 10.0, 90.0),
            m("student-onnx", "student", "onnxruntime", "fp32", 0.49, 3.0, 40.0),
            m("student-int8", "student", "onnxruntime", "int8", 0.49, 1.5, 10.0)]


# What the hard-coded goals (report.TARGETS, LM_TARGETS, before the recipes stated them) gave
# on these model lists: the packaged recipes' report.targets must give the same rows.
OLD_TARGETS = [
    {"target": "student int8 macro-F1 / teacher macro-F1", "measured": 0.98, "goal": ">= 0.97",
     "met": True},
    {"target": "speed-up of student int8 over teacher PyTorch fp32 (p50)", "measured": 13.3333,
     "goal": ">= 10.0", "met": True},
    {"target": "speed-up of student int8 over teacher ONNX fp32 (p50)", "measured": 6.6667,
     "goal": ">= 4.0", "met": True},
    {"target": "student int8 size / student ONNX fp32 size", "measured": 0.25, "goal": "<= 0.3",
     "met": True}]
# the language-model recipe's goals are issue 20's phone goals, on the int4 model it ships
LM_TARGETS = [
    {"target": "student int4 perplexity / student fp32 perplexity", "measured": 1.02,
     "goal": "<= 1.03", "met": True},
    {"target": "student int4 decode tokens/s / teacher PyTorch fp32 decode tokens/s",
     "measured": 3.6667, "goal": ">= 8.0", "met": False}]


def lm_models():
    return [{"name": "teacher", "metrics": {"perplexity": 20.0}, "decode_tokens_per_s": 30.0},
            {"name": "student", "metrics": {"perplexity": 25.0}, "decode_tokens_per_s": 100.0},
            {"name": "student-int4", "metrics": {"perplexity": 25.5},
             "decode_tokens_per_s": 110.0}]


def test_packaged_recipes_state_the_goals_the_code_held():
    assert judge_targets(load_recipe().report.targets, fake_models()) == OLD_TARGETS
    lm = load_recipe("smollm2-distill").report.targets
    assert judge_targets(lm, lm_models()) == LM_TARGETS


def test_a_target_this_run_did_not_measure_is_left_out():
    targets = load_recipe().report.targets
    no_onnx_teacher = [m for m in fake_models() if m["name"] != "teacher-onnx"]
    assert judge_targets(targets, no_onnx_teacher) == [OLD_TARGETS[i] for i in (0, 1, 3)]
    models = fake_models()
    models[0]["metrics"]["macro_f1"] = 0.0  # a zero denominator
    models[3]["latency"] = None  # student-int8 not timed
    assert judge_targets(targets, models) == [OLD_TARGETS[3]]
    assert judge_targets(targets, []) == []


def test_targets_from_a_recipe_met_and_missed():
    recipe = recipe_from_dict(yaml.safe_load(
        "report:\n  targets:\n"
        "    - {name: fast, value: student-int8.latency.p50_ms, at_most: 2}\n"
        "    - {name: small, value: student-int8.size_mb, per: teacher.size_mb, at_most: 0.1}\n"
        "    - {value: student-int8.metrics.accuracy, at_least: 0.4}\n"))
    assert judge_targets(recipe.report.targets, fake_models()) == [
        {"target": "fast", "measured": 1.5, "goal": "<= 2.0", "met": True},
        {"target": "small", "measured": 0.1111, "goal": "<= 0.1", "met": False},
        {"target": "student-int8.metrics.accuracy", "measured": 0.49, "goal": ">= 0.4",
         "met": True}]
    # build_report judges the recipe's targets; a recipe without any reports none
    assert [t["target"] for t in report_for(recipe)["targets"]] == [
        "fast", "small", "student-int8.metrics.accuracy"]
    assert report_for(Recipe())["targets"] == []


@pytest.mark.parametrize("target, message", [
    ("{valu: teacher.size_mb, at_least: 1}",
     "report.targets[0].valu: unknown key; did you mean 'value'?"),
    ("{value: teacher.size_mb, at_least: 1, at_most: 2}",
     "report.targets[0]: give exactly one of at_least and at_most (got both)"),
    ("{value: teacher.size_mb}",
     "report.targets[0]: give exactly one of at_least and at_most (got neither)"),
    ("{value: macro_f1, at_least: 1}",
     "report.targets[0].value: 'macro_f1' is not a model's name followed by the path"),
    ("{value: teacher.size_mb, per: 'student.', at_most: 1}", "report.targets[0].per: 'student.'"),
    ("{value: teacher.size_mb, at_least: high}", "report.targets[0].at_least: expected float"),
])
def test_a_bad_target_fails_when_the_recipe_is_read(tmp_path, target, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"report:\n  targets:\n    - {target}\n")
    with pytest.raises(EdgeDistillError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def report_for(recipe):
    """build_report's output for the fake models measured under ``recipe``."""
    models = fake_models()
    records = {"evaluate": {"models": {m["name"]: m["metrics"] for m in models}, "test_rows": 7},
               "bench": {"models": {m["name"]: {"latency": m["latency"], "size_mb": m["size_mb"]}
                                    for m in models}}}
    return build_report(recipe, [{k: m[k] for k in ("name", "role", "backend", "precision",
                                                    "path")} for m in models], records,
                        get_task(recipe.task).report)


def written_report(tmp_path, name="default"):
    recipe = load_recipe()  # the default recipe, with its targets
    recipe.name = name
    report = report_for(recipe)
    write_report(report, tmp_path)
    return report


def test_report_files_and_escaping(tmp_path):
    written_report(tmp_path, name="<script>alert(1)</script>")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["models"][0]["latency"]["p50_ms"] == 20.0 and data["test_rows"] == 7
    assert data["environment"]["libraries"]["onnxruntime"]
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    # quality vs latency, latency distribution, size and memory
    assert page.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_distribution.png", "quality_vs_latency.png", "size.png"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| student-int8 |" in markdown
    assert "| student int8 size / student ONNX fp32 size | 0.25 | <= 0.3 | yes |" in markdown


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_a_browser(tmp_path):
    """report.html as a person sees it: headless Chromium draws the page, and the plots' blue
    and orange (matplotlib's tab:blue, tab:orange, used nowhere else on the page) must be on
    the screenshot, so the embedded images decoded and displayed."""
    import matplotlib.image

    written_report(tmp_path)
    shot = tmp_path / "page.png"
    # flags as for a sandboxed CI machine: no network, a throwaway profile
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}",
                    (tmp_path / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30).sum())

    assert count((31, 119, 180)) > 2000 and count((255, 127, 14)) > 500


def test_an_under_fit_or_outgrown_teacher_is_flagged():
    from edgedistill.report_training import training_warnings

    def record(per_epoch, greater=True):
        metric = "macro_f1" if greater else "loss"
        best = (max if greater else min)(per_epoch)  # the best epoch's model is kept
        return {"finetuned": True, "validation": {metric: best},
                "selection": {"metric": metric, "greater_is_better": greater,
                              "per_epoch": per_epoch,
                              "last_epoch_improved": per_epoch.index(best) == len(per_epoch) - 1}}

    still_learning = {"teacher": record([0.40, 0.47, 0.53]), "distill": record([0.50, 0.52])}
    (under_fit,) = training_warnings(still_learning)
    assert "still improved in its last epoch (last epochs: 0.400, 0.470, 0.530)" in under_fit
    outgrown = {"teacher": record([0.55, 0.53]), "distill": record([0.50, 0.56])}
    (beaten,) = training_warnings(outgrown)
    assert "the student beat its teacher on validation (macro_f1 0.560 against 0.550)" in beaten
    # lower is better for a language model's loss; a settled teacher and a weaker student: none
    settled = {"teacher": record([3.1, 2.9, 3.0], greater=False),
               "distill": record([3.5, 3.3], greater=False)}
    assert training_warnings(settled) == []


def test_the_summary_reads_whole_at_80_columns(tmp_path):
    from rich.console import Console

    from edgedistill.report import print_summary

    console = Console(width=80, record=True, force_terminal=False)
    print_summary(written_report(tmp_path), console)
    text = console.export_text()
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert "…" not in text and max(len(line) for line in table) <= 80
    assert "student-int8" in text and "macro-F1" in text and "p50 ms" in text
    # a target's line is not broken at column 80: a log reader greps it whole
    assert "speed-up of student int8 over teacher PyTorch fp32 (p50): 13.3333 (goal >= 10.0)" \
        in text.splitlines()[-3]


def test_the_json_summary_is_the_printed_one_as_numbers(tmp_path, monkeypatch, capsys):
    import edgedistill.pipeline as pipeline
    from edgedistill.cli import main

    report = written_report(tmp_path)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: report)
    assert main(["run", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    int8 = next(m for m in printed["models"] if m["model"] == "student-int8")
    assert int8 == {"model": "student-int8", "precision": "int8", "macro-F1": 0.49,
                    "agreement": None, "p50 ms": 1.5, "size MB": 10.0}
    assert printed["targets"] == report["targets"] and printed["task"] == "classification"
