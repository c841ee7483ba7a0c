"""A recipe run on several processes: two CPU processes (gloo) train like one with the same
global batch, a process killed during distillation resumes to the same weights, the stages after
training run once, and a bad launch fails in one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from edgedistill import distributed
from edgedistill.cli import _without_nproc, main
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe_blocks import DistributedConfig
from tests.conftest import make_bert, make_tokenizer, write_tsv

# 180 training rows (200 less the validation tenth) make 9 whole steps of 20: on several
# processes accelerate completes a last partial step with rows from the start of the data, so
# only whole steps can match one process exactly. SGD without warm-up or decay: AdamW would turn
# float noise in near-zero gradients into whole steps.
RECIPE = """
version: 1
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 1, batch_size: 20, learning_rate: 0.5, optimizer: sgd,
          warmup_ratio: 0.0, weight_decay: 0.0}}
student: {{num_layers: 2}}
distill: {{epochs: 4, batch_size: 20, learning_rate: 0.5, optimizer: sgd, warmup_ratio: 0.0,
          weight_decay: 0.0}}
export: {{export_teacher: false}}
quantize: {{runtimes: [onnxruntime]}}
bench: {{iterations: 5, min_seconds: 0.1, warmup: 1, real_length_samples: 2,
         sequence_length: 32, rounds: 1}}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    teacher = tmp_path / "teacher"
    model = make_bert()
    # no dropout: each process would draw its own masks for its half of a batch
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(teacher)
    make_tokenizer(teacher).save_pretrained(teacher)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(data=write_tsv(tmp_path / "data", 200, 40), teacher=teacher))
    return path


def _cli(*args: str, kill_when=None) -> tuple[int, str, bool]:
    """Run ``edgedistill ARGS`` in a real process; with ``kill_when(...)`` true, SIGKILL one of
    the processes it launched (the last). Returns (exit code, output, killed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = False
    deadline = time.monotonic() + 400
    while kill_when is not None and proc.poll() is None and time.monotonic() < deadline:
        workers = psutil.Process(proc.pid).children()
        if kill_when() and len(workers) == 2:
            workers[-1].send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    output = proc.communicate(timeout=400)[0]
    return proc.returncode, output, killed


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


def test_two_processes_match_one_resume_after_a_kill_and_write_once(recipe, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    code, output, _ = _cli("distill", str(recipe), "-o", str(one), "-q")
    assert code == 0, output[-3000:]

    checkpointed = lambda: any((two / "distill.partial" / "checkpoints").glob(  # noqa: E731
        "checkpoint-*/trainer_state.json"))
    code, output, killed = _cli("run", str(recipe), "-o", str(two), "--nproc", "2",
                                kill_when=checkpointed)
    assert killed, "the run ended before the kill point"
    assert code == 128 + signal.SIGKILL, output[-3000:]
    assert "was killed by signal 9; rerun the same command to resume" in output
    assert (two / "teacher" / "manifest.json").is_file()
    assert not (two / "distill" / "manifest.json").exists()  # never looks finished

    code, output, _ = _cli("run", str(recipe), "-o", str(two), "--nproc", "2")
    assert code == 0, output[-3000:]
    assert "teacher: unchanged, skipped" in output
    # every process resumed; one of them says so
    assert output.count("resuming training from checkpoint-") == 1, output[-3000:]

    for stage in ("teacher", "distill"):  # same global batch, same weights
        single, launched = _weights(one / stage), _weights(two / stage)
        worst = max((single[k] - launched[k]).abs().max().item() for k in single)
        assert worst < 1e-4, (stage, worst)

    # the main process alone wrote the manifests, the report and the model cards
    assert sorted(p.parent.name for p in two.rglob("manifest.json")) == sorted(
        ["teacher", "distill", "export", "quantize", "evaluate", "bench"])
    assert [p.name for p in two.rglob("report.json")] == ["report.json"]
    assert not list(two.glob("*.partial"))
    # each process logs its training to its own files; a process that only waited has none
    assert sorted(p.name for p in (two / "logs" / "rank-1").iterdir()) == [
        "distill.log", "preflight.log", "teacher.log"]
    report = json.loads((two / "report.json").read_text())
    assert report["environment"]["training_processes"]["distill"] == {
        "world_size": 2, "backend": "gloo", "devices": ["cpu"]}
    assert "distilled on 2 processes (gloo: cpu)" in (two / "report.md").read_text()
    assert "batch: global" in (two / "recipe.resolved.yaml").read_text()


def test_per_device_and_global_batches():
    global_, per_device = DistributedConfig(), DistributedConfig(batch="per-device")
    assert distributed.per_device_batch(20, global_, 2, "distill.batch_size") == 10
    assert distributed.per_device_batch(20, per_device, 2, "distill.batch_size") == 20
    assert distributed.global_batch(20, global_, 2) == 20
    assert distributed.global_batch(20, per_device, 2) == 40
    with pytest.raises(EdgeDistillError, match=r"distill.batch_size: 15 examples a step do not "
                       r"split evenly over 2 processes .*use a multiple of 2"):
        distributed.per_device_batch(15, global_, 2, "distill.batch_size")


def test_without_nproc():
    assert _without_nproc(["run", "r.yaml", "--nproc", "2", "-q"]) == ["run", "r.yaml", "-q"]
    assert _without_nproc(["run", "--nproc=4", "r.yaml"]) == ["run", "r.yaml"]


def test_bad_launches_fail_in_one_line(recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "--nproc", "999"]) == 2
    assert "--nproc 999: this machine has" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(recipe), "-o", str(out), "--set",
                     "distributed.backend=nccl"]) == 2
        err = capsys.readouterr().err
        assert "distributed.backend: nccl needs CUDA GPUs" in err and len(err.splitlines()) == 1
    # a launcher's variables left in the shell, their processes long gone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for rank in ("1", "0"):  # 1 looks for rank 0's store; 0 hosts it and waits for 1
        for name, value in (("WORLD_SIZE", "2"), ("RANK", rank), ("LOCAL_RANK", rank),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            monkeypatch.setenv(name, value)
        assert main(["run", str(recipe), "-o", str(out), "--set",
                     "distributed.rendezvous_timeout=1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"rank {rank}: could not join the other 1 process(es) at 127.0.0.1:{port} " \
               "within 1 s" in err and "unset them to run in one process" in err
    assert not list(out.rglob("manifest.json"))  # nothing marked finished


def _fail_on_main(rank: int, port: int, messages) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    world = distributed.World(2, rank, rank, "gloo")
    assert distributed.on_main(world, lambda: {"seen": rank}, "a") == {"seen": 0}

    def fail():
        raise EdgeDistillError("export: broken")
    try:
        distributed.on_main(world, fail, "the export stage")
    except EdgeDistillError as e:
        messages[rank] = str(e)
    torch.distributed.destroy_process_group()


def test_a_failure_on_the_main_process_stops_the_others(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    messages = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_fail_on_main, args=(port, messages), nprocs=2)
    assert messages[0] == "export: broken"
    assert messages[1] == ("rank 1: stopped because the export stage failed on the main "
                           "process (rank 0; its error is above)")


def test_the_main_process_gets_every_core_while_the_others_wait():
    from edgedistill.host import usable_cores

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with distributed.all_cores(distributed.World(2, 1, 1, "gloo")):
            assert torch.get_num_threads() == 1  # a waiting process keeps its share
        with distributed.all_cores(distributed.World(2, 0, 0, "gloo")):
            assert torch.get_num_threads() == usable_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
