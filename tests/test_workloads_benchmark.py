"""The workloads benchmark's own logic (benchmarks/workloads.py), without training anything: its
verdict on "KD beats labels-only by more than twice the seed spread, on every seed", and
--keep, which adds a seed to a results table without running the kept rows again."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import workloads  # noqa: E402

TEACHER_F1 = 0.78


def row(int8_f1: float, teacher_f1: float = TEACHER_F1) -> dict:
    """A run's row as one_run writes it, with the values the summary reads."""
    return {"minutes": 1.0, "distill_seconds": 1.0, "transfer_rows": 0, "p50_ms": {},
            "over_budget": [], "teacher_f1": teacher_f1, "teacher_accuracy": 0.8,
            "teacher_agreement": 1.0, "student_f1": int8_f1, "student_accuracy": 0.8,
            "student_agreement": 0.9, "student_int8_f1": int8_f1,
            "student_int8_accuracy": 0.8, "student_int8_agreement": 0.9}


def test_the_verdict_needs_every_seeds_gain_over_twice_the_larger_spread():
    runs = [{"seed": 1, "labels": row(0.70), "kd": row(0.73)},
            {"seed": 2, "labels": row(0.71), "kd": row(0.74)},
            {"seed": 3, "labels": row(0.72), "kd": row(0.75)}]
    gain = workloads.summarise(runs)["kd_over_labels"]
    assert gain["seeds"] == [1, 2, 3] and gain["per_seed"] == pytest.approx([0.03] * 3)
    assert gain["spread"] == pytest.approx(0.01)  # both sides' stdev over the three seeds
    assert gain["beats_by_twice_the_spread_on_every_seed"]
    runs[2]["kd"] = row(0.735)  # seed 3 gains 0.015, under twice the (now larger) spread
    assert not workloads.summarise(runs)["kd_over_labels"][
        "beats_by_twice_the_spread_on_every_seed"]


@pytest.fixture
def kept_table(tmp_path, monkeypatch):
    """A results file of seeds 1 and 2 (kd, labels, a tried variant) whose work folders are
    gone, and a fake one_run that records what it is asked to run."""
    runs = [{"seed": s, "kd": row(0.73 + d), "labels": row(0.70 + d), "mix": row(0.74 + d)}
            for s, d in ((1, 0.0), (2, 0.01))]
    variants = {**workloads.VARIANTS, "mix": ["distill.alpha_distill=0.5"]}
    results = tmp_path / "results"
    speed = {"threads": 2, "sequence_length": 128, "teacher_pytorch_p50_ms": 90.0,
             "student_int8_p50_ms": 10.0, "speedup": 9.0, "teacher_peak_rss_mb": 800.0,
             "int8_peak_rss_mb": 100.0}
    workloads.write(results, "tweets-mpnet", "tweets-mpnet", runs, 20.0, [], speed, variants,
                    teacher_seed=1)
    teacher = tmp_path / "teacher" / "model"
    teacher.mkdir(parents=True)
    (teacher.parent / "manifest.json").write_text(json.dumps({"seconds": 60.0}))
    asked = []
    monkeypatch.setattr(workloads, "shared_teacher",
                        lambda recipe, work, seed, overrides: asked.append(seed) or teacher)

    def one_run(recipe, folder, overrides, teacher_f1=TEACHER_F1):
        asked.append(folder.name)
        return row(0.76, teacher_f1)

    monkeypatch.setattr(workloads, "one_run", one_run)
    return results, asked, tmp_path


def main(tmp_path, *args):
    sys_argv = ["workloads.py", "tweets-mpnet", "--work", str(tmp_path / "work"),
                "--results", str(tmp_path / "results"), *args]
    old, sys.argv = sys.argv, sys_argv
    try:
        workloads.main()
    finally:
        sys.argv = old


def test_keep_runs_only_the_new_rows_and_writes_them_beside_the_kept_ones(kept_table):
    results, asked, tmp = kept_table
    main(tmp, "--keep", "--seeds", "3", "2", "--try", "mix", "distill.alpha_distill=0.5")
    assert asked.pop(0) == 1  # the kept rows' teacher (seed 1), not one of this run's seeds
    # seed 2's rows are kept, not run again; seed 3 runs every variant; the transfer variant
    # runs on both seeds, as seed 2 had no row of it
    assert sorted(asked) == ["seed-2-kd+transfer", "seed-3-kd", "seed-3-kd+transfer",
                             "seed-3-labels", "seed-3-mix"]
    table = json.loads((results / "tweets-mpnet.json").read_text())
    assert [r["seed"] for r in table["runs"]] == [1, 2, 3]
    assert table["runs"][1]["mix"]["student_int8_f1"] == pytest.approx(0.75)  # kept
    assert table["teacher_minutes"] == 20.0 and table["one_core"]["speedup"] == 9.0
    assert table["summary"]["mix_over_labels"]["seeds"] == [1, 2, 3]


def test_keep_refuses_a_kept_variant_under_other_settings(kept_table, capsys):
    _, asked, tmp = kept_table
    with pytest.raises(SystemExit):
        main(tmp, "--keep", "--seeds", "3", "--try", "mix", "distill.alpha_distill=0.9")
    assert "the kept mix rows ran with" in capsys.readouterr().err
    assert asked == []  # refused before the teacher


def test_keep_stops_when_this_runs_teacher_is_another(kept_table, monkeypatch):
    results, asked, tmp = kept_table
    before = (results / "tweets-mpnet.json").read_text()
    monkeypatch.setattr(workloads, "one_run",
                        lambda recipe, folder, overrides: row(0.76, teacher_f1=0.79))
    with pytest.raises(SystemExit, match="another teacher"):
        main(tmp, "--keep", "--seeds", "3")
    assert (results / "tweets-mpnet.json").read_text() == before  # nothing written
