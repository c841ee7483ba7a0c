"""Mistakes a user can make: one clear line on stderr, a non-zero exit, nothing half-done."""

import subprocess
import sys

import pytest

from edgedistill.cli import main
from transformers import BertTokenizerFast

from tests.conftest import make_bert, write_tsv


@pytest.fixture
def base(tmp_path, tiny_teacher_dir):
    data = write_tsv(tmp_path / "data", 40, 12)
    return (f"version: 1\ndata: {{source: {data}, max_length: 32}}\n"
            f"teacher: {{model: {tiny_teacher_dir}, epochs: 1}}\n"
            "bench: {sequence_length: 32}\n")


CASES = {
    "malformed_yaml": ("data: [oops\n", "malformed YAML"),
    "unknown_key": ("teacher:\n  modle: x\n", "did you mean 'model'"),
    "wrong_type": ("distill:\n  epochs: many\n", "distill.epochs: expected float"),
    "missing_model": ("teacher:\n  model: ./no/model\n", "model path does not exist"),
    "missing_data": ("data:\n  source: ./no/data\n", "no such file, folder"),
    "missing_label_column": ("data:\n  label_column: stars\n", "column 'stars' is missing"),
    "unknown_profile": ("bench:\n  profile: phone\n", "profile 'phone' is unknown"),
    "unknown_loss": ("distill:\n  distill_loss: kl\n", "unknown loss 'kl'"),
    "too_long": ("data:\n  max_length: 4096\n", "exceeds the teacher's 64 positions"),
    "bad_layers": ("student:\n  num_layers: 9\n", "student.num_layers: 9 must be between"),
    "match_key_typo": ("distill:\n  matches: [{lose: hidden_mse}]\n",
                       "distill.matches[0].lose: unknown key; did you mean 'loss'"),
    "heads_mismatch": ("student: {init: random, config: {num_attention_heads: 2}}\n"
                       "distill:\n  matches: [{loss: attention_mse}]\n",
                       "distill.matches[0]: 'attention_mse' compares attention maps head by head"),
    "shape_without_random": ("student: {config: {hidden_size: 16}}\n",
                             "set student.init: pruned or random"),
    "student_positions": ("student: {init: random, config: {max_position_embeddings: 16}}\n",
                          "data.max_length: 32 exceeds the student's 16 positions"),
}


def merge(base: str, extra: str) -> str:
    """Later keys win in our loader only via overrides, so rebuild the recipe text by block."""
    import yaml

    try:
        extra_data = yaml.safe_load(extra)
    except yaml.YAMLError:
        return extra  # deliberately malformed
    data = yaml.safe_load(base)
    for block, values in extra_data.items():
        data.setdefault(block, {}).update(values)
    return yaml.safe_dump(data)


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, base, tmp_path, capsys):
    extra, message = CASES[case]
    path = tmp_path / "r.yaml"
    path.write_text(merge(base, extra))
    out = tmp_path / "out"
    code = main(["run", str(path), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("edgedistill: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list(out.glob("*/manifest.json"))  # no stage looks finished


def test_bad_override_and_unwritable_output(tmp_path, capsys):
    assert main(["run", "--set", "nonsense"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--output", str(blocker / "sub")]) == 2
    assert "output folder is not writable" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  temprature: 2\n")
    proc = subprocess.run([sys.executable, "-m", "edgedistill.cli", "run", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edgedistill: error: {bad}: distill.temprature: unknown key; did you mean 'temperature'?"]


def test_help_and_listing_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0 and "--set" in capsys.readouterr().out
    assert main(["profiles"]) == 0 and "cpu" in capsys.readouterr().out
    assert main(["settings"]) == 0 and "distill.temperature" in capsys.readouterr().out


def test_bench_and_export_refuse_folders_that_are_not_models(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "not a saved model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": '
                                          '["BertForSequenceClassification"]}')
    assert main(["export", str(tmp_path), str(tmp_path / "onnx")]) == 2  # no weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgedistill: error:")


def test_out_of_range_settings_fail_before_training(base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(base)
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out), "--set", "distill.temperature=0"]) == 2
    assert "distill.temperature: 0.0 must be > 0" in capsys.readouterr().err
    assert not (out / "teacher").exists()


def test_a_student_model_that_cannot_learn_from_this_teacher_fails_before_training(
        base, tmp_path, capsys):
    """Another tokenizer with layer losses (they compare token positions), and a trained head
    for other labels: one line each, before any training."""
    other = tmp_path / "other"
    make_bert(vocab_size=12).save_pretrained(other)
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                               + [f"w{i}" for i in range(7)]) + "\n")
    BertTokenizerFast(vocab_file=str(other / "vocab.txt")).save_pretrained(other)
    path = tmp_path / "r.yaml"
    path.write_text(base)
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out), "--set", f"student.model={other}",
                 "--set", "distill.matches=[{loss: hidden_mse}]"]) == 2
    assert ("student.model: its tokenizer differs from the teacher's, and distill.matches "
            "compare") in capsys.readouterr().err

    two_labels = tmp_path / "two-labels"
    make_bert(num_labels=2).save_pretrained(two_labels)
    BertTokenizerFast(vocab_file=str(other / "vocab.txt")).save_pretrained(two_labels)
    assert main(["run", str(path), "--output", str(out), "--set",
                 f"student.model={two_labels}"]) == 2
    assert ("student.model: its classification head predicts 2 labels (negative, neutral), "
            "the data has 3") in capsys.readouterr().err
    assert not (out / "teacher").exists()


def test_an_empty_recipe_says_how_to_run_the_default_even_when_quiet(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    assert main(["run", str(path), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgedistill: error: {path}: the recipe is empty")
    assert "edgedistill run" in err and not (tmp_path / "out").exists()


def test_a_teacher_still_learning_is_flagged_when_its_stage_ends(base, tmp_path, capsys,
                                                                 monkeypatch):
    """The teacher's record says its validation metric rose in the last epoch (a tiny random
    model learns too little to be sure of that on its own): the warning follows its stage."""
    import edgedistill.pipeline as pipeline

    real = pipeline.finetune_teacher

    def still_learning(*args, **kwargs):
        record = real(*args, **kwargs)
        record["selection"].update(per_epoch=[0.30, 0.41], last_epoch_improved=True)
        return record

    monkeypatch.setattr(pipeline, "finetune_teacher", still_learning)
    path = tmp_path / "r.yaml"
    path.write_text(base)
    assert main(["distill", str(path), "--output", str(tmp_path / "out"),
                 "--set", "distill.epochs=1"]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    flagged = next(i for i, line in enumerate(lines) if "still improved in its last epoch" in line)
    assert lines[flagged].strip().startswith("warning") and "raise teacher.epochs" in err
    assert "[1/6] teacher" in "".join(lines[:flagged]) and "[2/6]" in lines[flagged + 1]
