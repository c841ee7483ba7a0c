"""The search stage on a tiny random teacher: candidates measured before training, trials
driven by Optuna, the chosen student distilled in full, a killed search resumed."""

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from transformers import BertTokenizerFast

from edgedistill import search, search_costs
from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import load_recipe
from edgedistill.recipe_blocks import MatchConfig
from tests.conftest import make_bert, write_tsv
from tests.test_reliability import run_cli

RECIPE = """
version: 1
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 1, batch_size: 16, learning_rate: 1.0e-3}}
distill: {{epochs: 2, batch_size: 16, learning_rate: 1.0e-3}}
search: {{trials: 3, trial_epochs: 2, layers: [1, 2], widths: [1.0, 0.5],
          temperatures: [2.0], alpha_distill: [0.5, 0.9], match_losses: [none, hidden_mse],
          selection: one_se}}
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
    # TPE's first trials: each depth's widest shape at the recipe's settings (which is slower,
    # and so first, is left to the unit test: these tiny shapes time close)
    opening = {(t["student"], t["temperature"], t["alpha_distill"], t["match_loss"])
               for t in found["trials"][:2]}
    assert opening == {("2L-w1", 2.0, 0.5, "none"), ("1L-w1", 2.0, 0.5, "none")}
    chosen = found["chosen"]
    # one_se: the trial of the slowest student among those within one SE of the best
    how = found["selection"]
    best = max(t["value"] for t in found["trials"] if t["state"] == "COMPLETE")
    assert how["rule"] == "one_se" and how["draws"] == 1000
    assert next(t for t in found["trials"] if t["number"] == how["best_trial"])["value"] == best
    near = [t for t in found["trials"] if t["number"] in {w["trial"] for w in how["within"]}]
    assert chosen["trial"] in {t["number"] for t in near}
    assert chosen["p50_ms"] == max(t["p50_ms"] for t in near)
    # the full distillation ran on the chosen student with the chosen settings
    assert report["recipe"]["student"] == chosen["student"]
    assert report["recipe"]["distill"]["alpha_distill"] == chosen["distill"]["alpha_distill"]
    assert report["recipe"]["distill"]["epochs"] == 2
    assert (out / "search" / "recipe.chosen.yaml").is_file()
    assert (out / "plots" / "search.png").is_file()
    assert "Student search" in (out / "report.md").read_text()
    assert not (out / "search" / "trials").exists()
    assert "one_se: the slowest student of the" in (out / "report.md").read_text()
    # each finished trial kept its validation predictions, for one_se and for an audit
    done = [t for t in found["trials"] if t["state"] == "COMPLETE" and "repeat_of" not in t]
    assert done and all(len(t["predictions"]) == 6 for t in done)  # 10% of 60 rows

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


def test_a_budget_model_is_timed_beside_the_shapes_and_sets_the_budget(recipe, tmp_path,
                                                                       tiny_teacher_dir, capsys):
    out, shipped = tmp_path / "out", tmp_path / "shipped"
    # a copy of the tiny PyTorch teacher as the model to be as fast as: its int8 1-block
    # students are much faster, and a tolerance of 100% keeps this test off the timing noise
    shutil.copytree(tiny_teacher_dir, shipped)
    flags = ["search", str(recipe), "--budget-model", str(shipped), "--output", str(out),
             *ONE_SHAPE[2:], "--set", "search.budget_tolerance=1", "--set", "search.trials=1"]
    assert main(flags) == 0
    found = json.loads((out / "report.json").read_text())["search"]
    model = found["budget_model"]
    assert model["model"] == str(shipped) and model["tolerance"] == 1
    assert found["budget_ms"] == pytest.approx(2 * model["model_p50_ms"], rel=1e-3)
    assert [c["within_budget"] for c in found["candidates"]] == [True]
    assert len(found["candidates"][0]["round_p50_ms"]) == 1  # the recipe's bench.rounds
    # measured here, beside the model, not read from (or written to) the shared cache
    kept = json.loads((out / "search" / "costs-beside-budget-model.json").read_text())
    assert kept["budget"] == model and set(kept["costs"]) == {"1L-w1"}
    assert not (out / "search-cache").exists()
    assert "timed beside the shapes, + 100%" in (out / "report.md").read_text()
    # a model card written again into the model's folder (as every run does to its own) does
    # not make the search run again; other files of the model do
    (shipped / "README.md").write_text("a card")
    capsys.readouterr()
    assert main(flags) == 0
    assert "search: unchanged, skipped" in capsys.readouterr().err
    (shipped / "config.json").touch()
    assert main(flags) == 0
    assert "search: unchanged" not in capsys.readouterr().err


def fake_timing(p50: dict, calls: list):
    """search_costs.time_shapes without building or timing anything: the given p50s, by name."""
    def time_shapes(run, shapes, teacher_dir, teacher_config, where, reference=None):
        calls.append(reference)
        names = [c.name for c in shapes] + ([search_costs.REFERENCE] if reference else [])
        return {n: {"p50_ms": p50[n], "round_p50_ms": [p50[n]], "peak_rss_mb": 100.0,
                    "size_mb": 1.0, "parameters": None if n == search_costs.REFERENCE else 1000,
                    "over_budget": None} for n in names}
    return time_shapes


def test_the_budget_models_measures_are_kept_for_a_resumed_search(tmp_path, monkeypatch):
    r, config = candidate_recipe(tmp_path, layers="[1, 2]", widths="[1.0]")
    r = replace(r, search=replace(r.search, budget_ms=None, budget_model="shipped/int8",
                                  budget_tolerance=0.05))
    run = type("Run", (), {"recipe": r})()
    shapes = search.candidates(r, config)
    calls = []
    monkeypatch.setattr(search_costs, "time_shapes",
                        fake_timing({"1L-w1": 1.0, "2L-w1": 2.08, search_costs.REFERENCE: 2.0}, calls))
    costs, budget = search_costs.measure_beside(run, shapes, tmp_path / "t", config, tmp_path)
    assert calls == [Path("shipped/int8")]
    assert budget == {"model": "shipped/int8", "model_p50_ms": 2.0,
                      "model_round_p50_ms": [2.0], "tolerance": 0.05, "ms": 2.1}
    assert set(costs) == {"1L-w1", "2L-w1"}  # the model's own row is the budget, not a shape
    assert costs["2L-w1"]["pooled_p50_ms"] == 2.08  # one round: the paired p50 is the same
    assert search_costs.within_budget(costs["2L-w1"], budget["ms"], None)  # 4% slower: within 5%
    # a resumed search reads the same measures back: nothing is timed again
    assert search_costs.measure_beside(run, shapes, tmp_path / "t", config, tmp_path) == (costs, budget)
    assert len(calls) == 1


def test_a_shape_is_held_against_the_budget_model_round_by_round():
    # measured (tweets, seed 42): a slow spell in the model's first round, another in the
    # shape's third
    model = {"p50_ms": 3.76, "round_p50_ms": [10.92, 3.47, 3.89]}
    shape = {"p50_ms": 3.87, "round_p50_ms": [3.75, 3.70, 4.47], "peak_rss_mb": 100.0}
    budget_ms = 3.76 * 1.05
    assert search_costs.within_budget(shape, budget_ms, None)  # pooled: 1.03 times the model
    paired = search_costs.paired_p50(shape, model)
    assert paired == pytest.approx(3.76 * 3.70 / 3.47)  # the median round: 1.07 times
    assert not search_costs.within_budget({**shape, "p50_ms": paired}, budget_ms, None)
    # a side without rounds (over the memory budget: never timed) has no paired p50
    assert search_costs.paired_p50({"p50_ms": None, "round_p50_ms": None}, model) is None


def test_a_budget_model_no_shape_meets_ends_in_one_line_naming_its_p50(recipe, tmp_path,
                                                                        tiny_teacher_dir,
                                                                        capsys, monkeypatch):
    monkeypatch.setattr(search_costs, "time_shapes",
                        fake_timing({"1L-w1": 1.0, search_costs.REFERENCE: 0.5}, []))
    out = tmp_path / "out"
    assert main(["search", str(recipe), "--budget-model", str(tiny_teacher_dir), "--output",
                 str(out), *ONE_SHAPE[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (f"search.budget_model: no candidate meets 0.525 ms (0.50 ms p50 of "
            f"{tiny_teacher_dir}, timed beside them) on profile cpu; the fastest, 1L-w1, "
            "takes 1.00 ms p50") in err
    assert "raise search.budget_tolerance or give a slower search.budget_model" in err
    assert not (out / "search").exists() and not (out / "distill").exists()


def test_a_search_whose_every_shape_runs_past_the_memory_budget_says_so(recipe, tmp_path,
                                                                        capsys, monkeypatch):
    def over(*args, **kwargs):
        return {"1L-w1": {"p50_ms": None, "round_p50_ms": None, "peak_rss_mb": None,
                          "size_mb": 1.0, "parameters": 1000, "over_budget": "past 1 MB"}}

    monkeypatch.setattr(search_costs, "time_shapes", over)
    assert main(["search", str(recipe), "--output", str(tmp_path / "out"), *ONE_SHAPE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no candidate meets 1000 ms on profile cpu; every shape ran past the profile's " \
           "memory budget: raise the budget" in err


@pytest.mark.parametrize("flags, message", [
    (["--budget-model", "no/such/folder"],
     "search.budget_model: no/such/folder is not a saved model folder (no config.json)"),
    (["--budget-model", "{teacher}", "--set", "search.budget_ms=3"], None),  # the flag wins
    (["--budget-ms", "3", "--set", "search.budget_model={teacher}"], None),
])
def test_one_budget_at_a_time_and_a_budget_model_that_is_no_model(recipe, tmp_path,
                                                                  tiny_teacher_dir, capsys,
                                                                  monkeypatch, flags, message):
    # stop where the search would start: what is checked before it is what this test is for
    monkeypatch.setattr(search, "search", lambda *a: (_ for _ in ()).throw(
        EdgeDistillError("search: reached")))
    flags = [f.format(teacher=tiny_teacher_dir) for f in flags]
    assert main(["search", str(recipe), "--output", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (message or "search: reached") in err


def test_a_budget_model_the_run_would_overwrite_or_cannot_time_is_refused(recipe, tmp_path,
                                                                         tiny_teacher_dir,
                                                                         capsys):
    out = tmp_path / "out"
    inside = out / "quantize" / "student-int8"  # this run's own int8 model, made again here
    shutil.copytree(tiny_teacher_dir, inside)
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    shutil.copy(tiny_teacher_dir / "config.json", no_tokenizer)
    for folder, problem in ((inside, f"is inside this run's output folder {out}"),
                            (no_tokenizer, "has no tokenizer the benchmark can load")):
        assert main(["search", str(recipe), "--budget-model", str(folder), "--output",
                     str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"search.budget_model: {folder} {problem}" in err
        assert not (out / "teacher").exists()  # refused before any stage ran


def test_a_recipe_with_two_budgets_is_refused():
    with pytest.raises(EdgeDistillError, match="search.budget_ms and search.budget_model: give "
                                               "one latency budget"):
        load_recipe(None, ["search.budget_ms=3", "search.budget_model=shipped/int8"])


def candidate_recipe(tmp_path, **search_settings):
    teacher = make_bert(num_layers=4, hidden=32)  # 4 heads of 8
    teacher.save_pretrained(tmp_path / "t")
    overrides = [f"search.{k}={v}" for k, v in search_settings.items()]
    return load_recipe(None, ["search.budget_ms=1", *overrides]), teacher.config


# a search of one shape: its trials are what a test changes
ONE_SHAPE = ["--budget-ms", "1000", "--set", "search.layers=[1]", "--set", "search.widths=[1.0]"]


def test_a_trial_that_fails_ends_the_search_in_its_own_line(recipe, tmp_path, capsys,
                                                            monkeypatch):
    def broken(*args, **kwargs):
        raise EdgeDistillError("data.source: the trial's data broke")

    monkeypatch.setattr(search, "distill_student", broken)
    # Optuna prints through its own handler on the 'optuna' logger (not propagated): listen there
    optuna_records = []
    listener = logging.Handler()
    listener.emit = optuna_records.append
    logging.getLogger("optuna").addHandler(listener)
    try:
        assert main(["search", str(recipe), "--output", str(tmp_path / "out"), *ONE_SHAPE]) == 2
    finally:
        logging.getLogger("optuna").removeHandler(listener)
    assert "edgedistill: error: data.source: the trial's data broke" in capsys.readouterr().err
    # Optuna's own report of the same failure (a warning with the traceback) is not shown
    assert not [r for r in optuna_records if "failed with" in r.getMessage()]


def test_trials_without_a_score_are_said_and_a_search_with_none_ends_in_one_line(
        recipe, tmp_path, capsys, monkeypatch):
    from edgedistill.tasks.classification import ClassificationTask

    # every trial trains to a validation score of nan (as Spearman gives for constant output)
    monkeypatch.setattr(search, "distill_student",
                        lambda *a, **k: {"validation": {"macro_f1": float("nan")}})
    monkeypatch.setattr(ClassificationTask, "validation_predictions", lambda *a, **k: [])
    assert main(["search", str(recipe), "--output", str(tmp_path / "out"), *ONE_SHAPE]) == 2
    err = capsys.readouterr().err
    assert "trial 0: validation macro_f1 is nan; it does not count" in err
    assert "trial 2: validation macro_f1 is nan" in err  # Optuna went on after each
    assert "edgedistill: error: search: no trial ended with a validation macro_f1" in err


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
    with pytest.raises(EdgeDistillError, match="move it there"):
        search.candidates(r, config)


def test_a_pretrained_model_is_searched_at_its_depths_and_distilled_cut(
        recipe, tmp_path, capsys, monkeypatch):
    """search.student_models: a small pretrained model at each depth of search.layers it has,
    beside the teacher's shapes; the one chosen keeps its own blocks (its own tokenizer too)."""
    small = tmp_path / "small"  # 3 blocks of width 16, half the teacher's; its own vocabulary
    make_bert(num_layers=3, hidden=16, vocab_size=12, seed=1).save_pretrained(small)
    (small / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                               + [f"w{i}" for i in range(7)]) + "\n")
    BertTokenizerFast(vocab_file=str(small / "vocab.txt")).save_pretrained(small)
    # the teacher's shapes over the budget, the model's within: the search can only pick it
    monkeypatch.setattr(search_costs, "time_shapes", fake_timing(
        {"1L-w1": 5.0, "2L-w1": 6.0, "4L-w1": 7.0, "small-1L": 1.0, "small-2L": 1.5}, []))
    out = tmp_path / "out"
    flags = ["search", str(recipe), "--budget-ms", "2", "--output", str(out),
             "--set", "search.layers=[1, 2, 4]", "--set", "search.widths=[1.0]",
             "--set", f"search.student_models=[{small}]", "--set", "search.trials=2"]
    # its own tokenizer cannot follow a feature match's token positions: refused before timing
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("search.student_models (small-1L): a trial with match loss hidden_mse would be "
            "refused (student.model: its tokenizer differs") in err
    assert err.endswith("leave the model or that loss out of the search")
    assert not (out / "search").exists()

    two_labels = tmp_path / "two"  # a head trained on other labels: no loss makes it fit
    make_bert(num_layers=2, num_labels=2).save_pretrained(two_labels)
    BertTokenizerFast(vocab_file=str(small / "vocab.txt")).save_pretrained(two_labels)
    assert main([*flags, "--set", f"search.student_models=[{two_labels}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("search.student_models (two-1L): it would be refused (student.model: its "
            "classification head predicts 2 labels") in err
    assert err.endswith("; leave the model out")
    short = tmp_path / "short"  # 16 positions, where the recipe reads 32 tokens
    config = make_bert(num_layers=2).config
    config.max_position_embeddings = 16
    config.save_pretrained(short)
    assert main([*flags, "--set", f"search.student_models=[{short}]"]) == 2
    assert ("data.max_length: 32 exceeds the student short-1L's 16 positions"
            in capsys.readouterr().err)

    assert main([*flags, "--set", "search.match_losses=[none]"]) == 0
    report = json.loads((out / "report.json").read_text())
    found = report["search"]
    # depth 4 is more blocks than the model has: the teacher's shape only
    assert [c["name"] for c in found["candidates"]] == ["1L-w1", "2L-w1", "4L-w1", "small-1L",
                                                        "small-2L"]
    # the first trials: the slowest fitting depth of each family, here the model's two
    assert {t["student"] for t in found["trials"]} == {"small-1L", "small-2L"}
    chosen = found["chosen"]["student"]
    assert chosen["model"] == str(small) and report["recipe"]["student"] == chosen
    distilled = json.loads((out / "distill" / "model" / "config.json").read_text())
    assert (distilled["num_hidden_layers"], distilled["hidden_size"]) == (chosen["num_layers"], 16)
    assert "edgedistill_teacher_layers" not in distilled  # its own blocks, not the teacher's
    assert (out / "distill" / "model" / "vocab.txt").read_text() == \
        (small / "vocab.txt").read_text()
    card = (out / "quantize" / "student-int8" / "README.md").read_text()
    assert (f"the pretrained `{small}`, {chosen['num_layers']} of its blocks (uniform)"
            in card)


def test_a_pretrained_candidate_is_exported_and_timed_as_the_shapes_are(recipe, tmp_path,
                                                                        tiny_teacher_dir):
    small = tmp_path / "small"  # the teacher's tokenizer, half its width
    make_bert(num_layers=3, hidden=16, seed=1).save_pretrained(small)
    shutil.copy(tiny_teacher_dir / "vocab.txt", small / "vocab.txt")
    BertTokenizerFast(vocab_file=str(small / "vocab.txt")).save_pretrained(small)
    out = tmp_path / "out"
    assert main(["distill", str(recipe), "--output", str(out), "--set", "search.budget_ms=1000",
                 "--set", "search.layers=[2]", "--set", "search.widths=[1.0]",
                 "--set", f"search.student_models=[{small}]", "--set", "search.trials=1"]) == 0
    found = json.loads((out / "search" / "manifest.json").read_text())["record"]
    shapes = {c["name"]: c for c in found["candidates"]}
    assert set(shapes) == {"2L-w1", "small-2L"}
    assert shapes["small-2L"]["p50_ms"] > 0 and shapes["small-2L"]["size_mb"] > 0
    # its own 2 blocks of width 16 with the 3-label head, not a teacher shape's
    assert shapes["small-2L"]["parameters"] == sum(
        p.numel() for p in make_bert(num_layers=2, hidden=16).parameters())
    assert shapes["small-2L"]["parameters"] < shapes["2L-w1"]["parameters"]


def test_student_models_too_shallow_or_named_alike_are_refused(tmp_path):
    r, config = candidate_recipe(tmp_path, layers="[3]", widths="[1.0]")
    for name in ("a/small", "b/small"):
        make_bert(num_layers=2).save_pretrained(tmp_path / name)
    with pytest.raises(EdgeDistillError, match=r"search.student_models: .*a/small has 2 blocks, "
                                               r"fewer than every depth of search.layers \[3\]"):
        search.candidates(replace(r, search=replace(r.search, student_models=[
            str(tmp_path / "a/small")])), config)
    # a depth past the teacher's (4) is a deeper model's alone
    make_bert(num_layers=6).save_pretrained(tmp_path / "deep")
    deep = replace(r, search=replace(r.search, layers=[2, 5],
                                     student_models=[str(tmp_path / "deep")]))
    assert [c.name for c in search.candidates(deep, config)] == ["2L-w1", "deep-2L", "deep-5L"]
    with pytest.raises(EdgeDistillError, match="search.layers: 7 is more blocks than the "
                                               "teacher's 4 and every search.student_models'"):
        search.candidates(replace(deep, search=replace(deep.search, layers=[7, 2])), config)
    both = [str(tmp_path / "a/small"), str(tmp_path / "b/small")]
    r = replace(r, search=replace(r.search, layers=[2], student_models=both))
    with pytest.raises(EdgeDistillError, match="two models named small-2L"):
        search.candidates(r, config)


def test_a_searched_setting_the_task_refuses_is_refused_before_any_shape_is_timed(tmp_path):
    from edgedistill.tasks import get_task

    r, config = candidate_recipe(tmp_path, alpha_distill="[0.5, 0.0]")
    # a transfer set's rows carry only soft targets: a trial on the labels alone is refused
    r = replace(r, transfer=load_recipe(
        None, ["transfer.unlabelled=[{source: drug-reviews}]"]).transfer)
    with pytest.raises(EdgeDistillError) as refused:
        search.check(r, tmp_path / "t", config, get_task("classification"), tmp_path / "out")
    assert str(refused.value).startswith("search.alpha_distill: a trial with 0.0 would be "
                                         "refused (transfer: the transfer rows have only")
    assert str(refused.value).endswith("; leave 0.0 out")
    search.check(replace(r, search=replace(r.search, alpha_distill=[0.5])), tmp_path / "t",
                 config, get_task("classification"), tmp_path / "out")  # the rest is fine


def test_first_trials_are_the_widest_fitting_shape_of_each_depth(tmp_path):
    recipe, config = candidate_recipe(tmp_path, layers="[1,2,3]", widths="[1.0,0.5]",
                                      temperatures="[1.0,4.0]", trials=2)
    shapes = {c.name: c for c in search.candidates(recipe, config)}
    fitting = [shapes[n] for n in ("1L-w1", "1L-w0.5", "2L-w0.5", "3L-w0.5")]  # 2L, 3L-w1 over
    costs = {n: {"p50_ms": int(n[0]) * (4 if n.endswith("w1") else 1)} for n in shapes}
    # the two slowest of 1L-w1 (4 ms), 2L-w0.5 (2), 3L-w0.5 (3); the recipe's temperature, 2,
    # is not among those tried, so the sampler draws it
    assert search.first_trials(recipe, fitting, costs) == [
        {"student": "1L-w1", "alpha_distill": 0.5, "match_loss": "none"},
        {"student": "3L-w0.5", "alpha_distill": 0.5, "match_loss": "none"}]
    # settings a trial would not train alike are left to the sampler
    for distill in (replace(recipe.distill, matches=[MatchConfig(loss="hidden_mse"),
                                                     MatchConfig(loss="minilm_relation")]),
                    replace(recipe.distill, matches=[MatchConfig(loss="hidden_mse", weight=3)])):
        assert "match_loss" not in search.first_trials(replace(recipe, distill=distill),
                                                       fitting, costs)[0]
    one_loss = replace(recipe.distill, matches=[MatchConfig(loss="hidden_mse")])
    assert search.first_trials(replace(recipe, distill=one_loss), fitting,
                               costs)[0]["match_loss"] == "hidden_mse"
    no_ce = replace(recipe.distill, alpha_ce=0.0)  # alpha_distill 0.5 with no label loss
    assert "alpha_distill" not in search.first_trials(replace(recipe, distill=no_ce), fitting,
                                                      costs)[0]


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
    assert [t["number"] for t in found["trials"]] == [0, 2, 3]
    # trials 0 and 1 were the queued first trials (each depth's full width at the recipe's
    # alpha_distill 0.5); trial 1 ran again as 2, and the resumed study queued nothing twice
    assert {t["student"] for t in found["trials"][:2]} == {"1L-w1", "2L-w1"}
    assert [t["alpha_distill"] for t in found["trials"][:2]] == [0.5, 0.5]
    assert found["trials"][2]["alpha_distill"] is not None
    study = optuna.load_study(study_name=search.STUDY,
                              storage=f"sqlite:///{out / 'search' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def trial(number, student, value, p50=1.0, state="COMPLETE", **extra):
    return {"number": number, "student": student, "value": value, "p50_ms": p50,
            "state": state, **extra}


def test_one_se_takes_the_slowest_student_within_one_standard_error_of_the_best():
    import numpy as np
    rng = np.random.default_rng(0)
    # the difficulty of each resample, shared by every trial: it cancels in the paired gap
    noise = rng.normal(0, 0.05, 1000)
    p50 = {"1L-w1": 1.0, "1L-w0.5": 0.5, "2L-w0.5": 1.2, "2L-w1": 2.0}
    trials = [trial(n, student, value, p50[student], **extra) for n, student, value, extra in
              [(0, "1L-w1", 0.62, {}), (1, "2L-w0.5", 0.60, {}), (2, "2L-w1", 0.40, {}),
               (3, "2L-w1", None, {"state": "PRUNED"}), (4, "1L-w1", 0.62, {"repeat_of": 0}),
               (5, "1L-w0.5", 0.61, {})]]
    scores = {0: 0.62 + noise + rng.normal(0, 0.03, 1000),  # paired: own noise 0.03 each
              1: 0.60 + noise + rng.normal(0, 0.03, 1000),
              2: 0.40 + noise + rng.normal(0, 0.03, 1000),
              5: 0.61 + noise + rng.normal(0, 0.03, 1000)}
    chosen, how = search.choose(trials, "one_se", True, scores)
    # 2L-w1 is the slowest but 0.22 behind (SE about 0.04); 2L-w0.5 is 0.02 behind: within
    assert chosen["number"] == 1
    assert how["rule"] == "one_se" and how["best_trial"] == 0 and how["draws"] == 1000
    assert {w["trial"] for w in how["within"]} == {0, 1, 5}
    assert all(0.03 < w["se"] < 0.06 for w in how["within"] if w["trial"] != 0)
    assert search.choose(trials, "best", True, None)[0]["number"] == 0
    # a loss (lower is better): the best is the lowest, the gap counted the other way
    loss = [trial(0, "1L-w1", 0.50, 1.0), trial(1, "2L-w1", 0.51, 2.0),
            trial(2, "2L-w0.5", 0.90, 1.2)]
    loss_scores = {0: 0.50 + noise, 1: 0.51 + noise + rng.normal(0, 0.03, 1000),
                   2: 0.90 + noise}
    assert search.choose(loss, "one_se", False, loss_scores)[0]["number"] == 1
    assert search.choose(loss, "best", False, None)[0]["number"] == 0


def test_resampled_validation_scores_keep_every_class_in_each_draw():
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from edgedistill.data import TaskData
    from edgedistill.tasks import get_task
    names = ["negative", "neutral", "positive"]
    labels = [0] * 20 + [1] * 3 + [2] * 17  # a rare class, as in the default recipe
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    split = Dataset.from_dict({"text": ["x"] * 40, "label": labels}, features=features)
    data = TaskData(DatasetDict(train=split, validation=split, test=split), names)
    task = get_task("classification")
    wrong_rare = [0 if y == 1 else y for y in labels]  # never predicts the rare class
    scores = task.resampled_scores({"perfect": labels, "wrong_rare": wrong_rare}, data,
                                   "macro_f1", 200, 0)
    assert np.all(scores["perfect"] == 1.0)  # the rare class is in every draw
    # without the rare class in a draw, missing it would cost nothing; here it always costs
    assert np.all(scores["wrong_rare"] < 0.7)
    again = task.resampled_scores({"perfect": labels, "wrong_rare": wrong_rare}, data,
                                  "macro_f1", 200, 0)
    assert np.array_equal(again["wrong_rare"], scores["wrong_rare"])  # seeded


def test_one_se_is_refused_for_a_task_without_per_row_predictions(tmp_path):
    from edgedistill.tasks import get_task
    r, config = candidate_recipe(tmp_path, selection="one_se")
    with pytest.raises(EdgeDistillError, match="search.selection: one_se resamples per-row "
                                               "validation predictions, which the "
                                               "sentence-embedding task does not give; use best"):
        search.check(r, tmp_path / "t", config, get_task("sentence-embedding"), tmp_path / "out")
    with pytest.raises(EdgeDistillError, match="search.selection: 'one_sd' is not one of best, "
                                               "one_se; did you mean 'one_se'"):
        candidate_recipe(tmp_path, selection="one_sd")
