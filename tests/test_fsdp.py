"""FSDP2 with the teacher sharded too: 2 CPU processes (gloo) against 1 process.

accelerate does not set up FSDP on CPU by itself; tests/scripts/fsdp_distill.py switches the
Trainer's accelerator to FSDP (allow_fsdp_on_cpu there). Everything after that, the student's
FSDP2 wrapping by accelerate and the teacher's by DistillationTrainer, is the code that runs on
GPUs.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# The accelerate config of docs/scale-out.md, for 2 CPU processes. The script sets
# FSDP_TRANSFORMER_CLS_TO_WRAP (fsdp_transformer_layer_cls_to_wrap) for each of its two models.
FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_fsdp2_shards_the_teacher_and_matches_one_process(tmp_path):
    """accelerate launch with 2 processes, 4 examples each, against 1 process with 8 (the same
    global batch), for a BERT classifier (soft targets + labels) and a Llama (token KD only)."""
    from safetensors.torch import load_file

    script = Path(__file__).parent / "scripts" / "fsdp_distill.py"
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    runs = {"fsdp": [str(accelerate), "launch", "--config_file", str(config),
                     "--main_process_port", str(free_port()), str(script),
                     str(tmp_path / "fsdp"), "4"],
            "single": [sys.executable, str(script), str(tmp_path / "single"), "8"]}
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    for model in ("bert", "llama"):
        shards = [json.loads((tmp_path / "fsdp" / model / f"shards-{rank}.json").read_text())
                  for rank in (0, 1)]
        for part in ("teacher", "student"):
            total = shards[0]["total"][part]
            held = [s[part] for s in shards]
            # each rank holds about half (FSDP2 splits every parameter on dim 0)
            assert sum(held) == total, (model, part, held, total)
            assert all(0.45 * total < h < 0.55 * total for h in held), (model, part, held, total)
        assert all(s["teacher_class"].startswith("FSDP") for s in shards)
        fsdp = load_file(tmp_path / "fsdp" / model / "student" / "model.safetensors")
        single = load_file(tmp_path / "single" / model / "student" / "model.safetensors")
        # the gathered state dict also names the tied head, which save_pretrained leaves out
        assert set(single) <= set(fsdp) and set(fsdp) - set(single) <= {"lm_head.weight"}
        worst = max((fsdp[k] - single[k]).abs().max().item() for k in single)
        assert worst < 1e-4, (model, worst)
