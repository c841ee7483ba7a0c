"""A crash costs minutes, not the run: kill a real run at every stage, rerun, compare."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgedistill.artifacts import write_atomic
from edgedistill.cli import main
from edgedistill.distill import losses
from edgedistill.distill.training import last_good_checkpoint
from tests.conftest import write_tsv

RECIPE = """
version: 1
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 4, batch_size: 16, learning_rate: 1.0e-3}}
student: {{num_layers: 2}}
distill: {{epochs: 4, batch_size: 16, learning_rate: 1.0e-3}}
export: {{export_teacher: false}}
bench: {{iterations: 20, min_seconds: 0.3, warmup: 1, real_length_samples: 4,
         sequence_length: 32, rounds: 2}}
"""


@pytest.fixture
def recipe(tmp_path, tiny_teacher_dir):
    data = write_tsv(tmp_path / "data", 400, 60)  # 25 steps an epoch: time to kill mid-stage
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(data=data, teacher=tiny_teacher_dir))
    return path


def checkpointed(stage):
    return lambda out: any((out / f"{stage}.partial" / "checkpoints").glob(
        "checkpoint-*/trainer_state.json"))


def started(stage):
    return lambda out: (out / f"{stage}.partial").is_dir()


def run_cli(recipe: Path, out: Path, kill_when=None, timeout: float = 300) -> tuple[bool, str]:
    """Run `edgedistill run` in a real process; SIGKILL it as soon as ``kill_when(out)``.
    Returns (killed, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "run", str(recipe),
                             "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when is not None and kill_when(out):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    output = proc.communicate(timeout=60)[0]
    assert killed or proc.returncode == 0, output[-2000:]
    return killed, output


def test_sigkill_at_every_stage_then_rerun(recipe, tmp_path):
    out = tmp_path / "out"
    outputs = []
    for stage, point in (("teacher", checkpointed("teacher")), ("distill", checkpointed("distill")),
                         ("export", started("export")), ("quantize", started("quantize")),
                         ("bench", started("bench"))):
        killed, output = run_cli(recipe, out, point)
        assert killed, f"the run ended before the kill point in {stage}"
        assert not (out / stage / "manifest.json").exists()  # never looks finished
        outputs.append(output)
    # the rerun after each kill resumed the interrupted training from its checkpoint
    assert "resuming training from checkpoint-" in outputs[1]   # teacher
    assert "resuming training from checkpoint-" in outputs[2]   # distill
    killed, output = run_cli(recipe, out)
    assert not killed and "[6/6] bench" in output
    assert "teacher: unchanged, skipped" in output and "export: unchanged, skipped" in output
    assert not list(out.glob("*.partial"))

    # the same recipe without interruptions gives the same models
    _, _ = run_cli(recipe, tmp_path / "clean")
    resumed = json.loads((out / "report.json").read_text())
    clean = json.loads((tmp_path / "clean" / "report.json").read_text())
    for a, b in zip(resumed["models"], clean["models"]):
        assert a["name"] == b["name"]
        assert a["metrics"]["accuracy"] == pytest.approx(b["metrics"]["accuracy"], abs=0.02)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-20" / "trainer_state.json").write_text('{"trunc')  # cut mid-write
    assert last_good_checkpoint(folder) == str(folder / "checkpoint-10")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10"]
    assert last_good_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("stop", [OSError(errno.ENOSPC, "No space left on device"),
                                  KeyboardInterrupt()])
def test_an_atomic_write_stopped_midway_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch,
                                                                             stop):
    path = tmp_path / "logits.safetensors"
    path.write_bytes(b"old")
    real = Path.write_bytes

    def cut(self, data):  # half the bytes reach the disk, then the write stops
        real(self, data[: len(data) // 2])
        raise stop

    monkeypatch.setattr(Path, "write_bytes", cut)
    with pytest.raises(type(stop)):
        write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoint_with_a_cut_rng_state_of_another_process_is_skipped(tmp_path):
    # under a launcher a kill can cut rank 1's RNG file after rank 0 wrote trainer_state.json
    folder = tmp_path / "checkpoints"
    for step in (10, 20):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        for rank in (0, 1):
            torch.save({"python": [1, 2, 3]}, folder / f"checkpoint-{step}" / f"rng_state_{rank}.pth")
    whole = (folder / "checkpoint-20" / "rng_state_1.pth").read_bytes()
    (folder / "checkpoint-20" / "rng_state_1.pth").write_bytes(whole[: len(whole) // 2])
    assert last_good_checkpoint(folder) == str(folder / "checkpoint-10")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10"]


def test_non_finite_loss_stops_names_the_step_and_resumes(recipe, tmp_path, monkeypatch, capsys,
                                                          caplog):
    calls = {"n": 0}
    real = losses.LOGIT_LOSSES["soft_cross_entropy"]

    def breaks_in_epoch_two(s, t, temperature):
        calls["n"] += 1
        value = real(s, t, temperature)
        return value * float("nan") if calls["n"] > 30 else value

    monkeypatch.setitem(losses.LOGIT_LOSSES, "soft_cross_entropy", breaks_in_epoch_two)
    out = tmp_path / "out"
    assert main(["distill", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    # 360 training rows: 23 steps an epoch; the 31st loss call is step 30 (one was validation)
    assert "training loss is not finite at step 30" in err and "distill=nan" in err
    assert (out / "teacher" / "manifest.json").is_file()
    assert not (out / "distill").exists()
    assert last_good_checkpoint(out / "distill.partial" / "checkpoints").endswith("checkpoint-23")

    monkeypatch.setitem(losses.LOGIT_LOSSES, "soft_cross_entropy", real)
    with caplog.at_level(logging.WARNING, logger="edgedistill"):
        assert main(["distill", str(recipe), "--output", str(out)]) == 0
    assert "resuming training from checkpoint-23" in caplog.text
    assert (out / "distill" / "manifest.json").is_file()


def test_disk_full_while_exporting(recipe, tmp_path, monkeypatch, capsys):
    import optimum.exporters.onnx as exporter

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.onnx"))

    monkeypatch.setattr(exporter, "main_export", disk_full)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out), "--set", "teacher.epochs=1",
                 "--set", "distill.epochs=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgedistill: error:") and "disk full" in err[-1]
    assert (out / "distill" / "manifest.json").is_file()      # finished work is kept
    assert not (out / "export").exists()                      # the export never looks done


def test_a_model_with_its_own_code_needs_the_flag(recipe, tmp_path, tiny_teacher_dir, capsys):
    config = json.loads((tiny_teacher_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (tiny_teacher_dir / "config.json").write_text(json.dumps(config))
    (tiny_teacher_dir / "configuration_evil.py").write_text("raise SystemExit('ran!')\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ships its own Python code (configuration_evil)" in err
    assert "set teacher.trust_remote_code: true" in err and not (out / "teacher").exists()


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 examples each, against 1 process with 8."""
    from safetensors.torch import load_file

    script = Path(__file__).parent / "scripts" / "ddp_distill.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    runs = {"ddp": [str(torchrun), "--standalone", "--nproc_per_node=2", str(script),
                    str(tmp_path / "ddp"), "4"],
            "single": [sys.executable, str(script), str(tmp_path / "single"), "8"]}
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp = load_file(tmp_path / "ddp" / "student" / "model.safetensors")
    single = load_file(tmp_path / "single" / "student" / "model.safetensors")
    assert ddp.keys() == single.keys()
    worst = max((ddp[k] - single[k]).abs().max().item() for k in ddp)
    assert worst < 1e-4, worst
