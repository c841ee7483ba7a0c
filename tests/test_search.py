"""The search stage on a tiny random teacher: candidates measured before training, trials
driven by Optuna, the chosen student distilled in full, a killed search resumed."""

import json

import optuna
import pytest

from edgedistill import search
from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import load_recipe
from tests.conftest import make_bert, write_tsv
from tests.test_reliability import run_cli

RECIPE = """
version: 1
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 1, batch_size: 16, learning_rate: 1.0e-3}}
distill: {{epochs: 2, batch_size: 16, learning_rate: 1.0e-3}}
search: {{trials: 3, trial_epochs: 2, layers: [1, 2], widths: [1.0, 0.5],
          temperatures: [2.0], alpha_distill: [0.5, 0.9], match_losses: [none, hidden_mse]}}
quantize: {{runtimes: [onnxruntime]}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 0,
         sequence_length: 32, rounds: 1}}
"""


@pytest.fixture
def recipe(tmp_path, tiny_teacher_dir):
    data = write_tsv(tmp_path / "data", 60, 20)
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(data=data, teacher=tiny_teacher_dir))
    return path


def test_search_chooses_a_student_within_budget_then_runs_every_stage(recipe, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    assert main(["search", str(recipe), "--budget-ms", "1000", "--output", str(out)]) == 0
    assert "[2/7] search" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    found = report["search"]
    assert [c["name"] for c in found["candidates"]] == ["1L-w1", "1L-w0.5", "2L-w1", "2L-w0.5"]
    assert all(c["p50_ms"] > 0 and c["within_budget"] for c in found["candidates"])
    assert len(found["trials"]) == 3
    chosen = found["chosen"]
    best = max(t["value"] for t in found["trials"] if t["state"] == "COMPLETE")
    assert chosen["value"] == best and chosen["trial"] in found["pareto"]
    # the full distillation ran on the chosen student with the chosen settings
    assert report["recipe"]["student"] == chosen["student"]
    assert report["recipe"]["distill"]["alpha_distill"] == chosen["distill"]["alpha_distill"]
    assert report["recipe"]["distill"]["epochs"] == 2
    assert (out / "search" / "recipe.chosen.yaml").is_file()
    assert (out / "plots" / "search.png").is_file()
    assert "Student search" in (out / "report.md").read_text()
    assert not (out / "search" / "trials").exists()

    # a second run reuses the search and applies its choice again: nothing is retrained
    assert main(["run", str(recipe), "--output", str(out), "--set", "search.budget_ms=1000"]) == 0
    err = capsys.readouterr().err
    assert "search: unchanged, skipped" in err and "distill: unchanged, skipped" in err
    assert json.loads((out / "report.json").read_text())["search"] == found


def test_a_budget_no_candidate_meets_ends_in_one_line_naming_the_fastest(recipe, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    assert main(["search", str(recipe), "--budget-ms", "0.0001", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "search.budget_ms: no candidate meets 0.0001 ms on profile cpu; the fastest, " in err
    assert " ms p50 " in err and "raise the budget" in err
    assert not (out / "search").exists() and not (out / "distill").exists()
    # the measures were kept: a second budget measures nothing again
    cached = json.loads((out / "search-cache" / "costs.json").read_text())
    assert len(cached) == 4 and all(v["p50_ms"] > 0 for v in cached.values())


def candidate_recipe(tmp_path, **search_settings):
    teacher = make_bert(num_layers=4, hidden=32)  # 4 heads of 8
    teacher.save_pretrained(tmp_path / "t")
    overrides = [f"search.{k}={v}" for k, v in search_settings.items()]
    return load_recipe(None, ["search.budget_ms=1", *overrides]), teacher.config


def test_candidates_keep_whole_heads_and_refuse_what_cannot_be_built(tmp_path):
    r, config = candidate_recipe(tmp_path, layers="[1, 4]", widths="[1.0, 0.5, 0.501, 0.3]")
    shapes = search.candidates(r, config)
    # 0.5 and 0.501 make the same shape: one candidate; 0.3 of 32 keeps one 8-wide head
    assert [c.name for c in shapes] == ["1L-w1", "1L-w0.501", "1L-w0.3", "4L-w1", "4L-w0.501",
                                        "4L-w0.3"]
    assert shapes[1].student.init == "pruned"
    assert shapes[1].student.config == {"hidden_size": 16, "intermediate_size": 32}
    assert shapes[2].student.config == {"hidden_size": 8, "intermediate_size": 19}
    assert shapes[0].student.init == "teacher" and shapes[0].student.config == {}
    with pytest.raises(EdgeDistillError, match="search.layers: 5 is more blocks than the "
                                               "teacher's 4"):
        search.candidates(candidate_recipe(tmp_path, layers="[5]")[0], config)
    llama = type(config).from_dict({**config.to_dict(), "model_type": "llama"})
    with pytest.raises(EdgeDistillError, match=r"search.widths: 0.5 needs a pruned student.*"
                                               r"set search.widths: \[1.0\]"):
        search.candidates(r, llama)
    r.student.model = "some/model"
    with pytest.raises(EdgeDistillError, match="remove student.model"):
        search.candidates(r, config)


def test_pareto_front_of_score_against_latency():
    trials = [{"number": 0, "state": "COMPLETE", "value": 0.5, "p50_ms": 1.0},
              {"number": 1, "state": "COMPLETE", "value": 0.6, "p50_ms": 2.0},
              {"number": 2, "state": "COMPLETE", "value": 0.4, "p50_ms": 1.5},  # dominated by 0
              {"number": 3, "state": "PRUNED", "value": None, "p50_ms": 0.5},
              {"number": 4, "state": "COMPLETE", "value": 0.5, "p50_ms": 1.0, "repeat_of": 0}]
    assert search.pareto(trials, greater_is_better=True) == [0, 1]
    assert search.pareto(trials, greater_is_better=False) == [0, 2]  # a loss: lower is better


def test_a_trial_cut_off_by_a_kill_runs_again(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_categorical("student", ["1L-w1", "2L-w1"])
    params = dict(trial.params)
    del study  # the process died with the trial running
    study = optuna.load_study(study_name="s", storage=storage)
    search._resume(study)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    again = study.ask()
    assert again.suggest_categorical("student", ["1L-w1", "2L-w1"]) == params["student"]


def test_a_sigkilled_search_resumes_where_it_stopped(tmp_path, tiny_teacher_dir):
    data = write_tsv(tmp_path / "data", 400, 30)  # 25 steps an epoch: time to kill in a trial
    path = tmp_path / "r.yaml"
    one_shape = ("search: {budget_ms: 1000, trials: 3, trial_epochs: 2, layers: [1, 2], "
                 "widths: [1.0], temperatures: [2.0], alpha_distill: [0.5, 0.9], "
                 "match_losses: [none]}")
    text = RECIPE.format(data=data, teacher=tiny_teacher_dir)
    path.write_text(text[:text.index("search:")] + one_shape + text[text.index("quantize:") - 1:])
    out = tmp_path / "out"
    def in_trial_1(o):
        return any((o / "search.partial" / "trials" / "1" / "checkpoints").glob(
            "checkpoint-*/trainer_state.json"))

    killed, _ = run_cli(path, out, in_trial_1)
    assert killed
    killed, output = run_cli(path, out)
    assert "trial 1 was interrupted; it runs again" in output
    assert "trial 0:" not in output  # a finished trial is not trained again
    found = json.loads((out / "report.json").read_text())["search"]
    assert [t["number"] for t in found["trials"]] == [0, 2, 3]  # trial 1 ran again as 3
    assert found["trials"][2]["alpha_distill"] is not None
