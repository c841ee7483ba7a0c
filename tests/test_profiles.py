"""Hardware profiles: shipped data, honest constraints on this host, refusals."""

import pytest

from edgedistill.profiles import Profile, list_profiles, load_profile
from edgedistill.bench.roofline import estimate_target
from edgedistill.bench.runner import BenchSettings, benchmark
from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx

SETTINGS = BenchSettings(warmup=1, iterations=3, min_seconds=0.01, sequence_length=16,
                         real_length_samples=0, max_length=16, rounds=1)


def test_shipped_profiles(capsys):
    names = {p.name for p in list_profiles()}
    assert names == {"cpu", "mobile-arm64", "smart-speaker", "gpu-cuda"}
    speaker = load_profile("smart-speaker")
    assert (speaker.threads, speaker.cpu_affinity, speaker.memory_budget_mb) == (1, 1, 512)
    assert load_profile("mobile-arm64").quantization["preset"] == "arm64"
    assert main(["profiles"]) == 0
    assert "memory budget 512 MB" in capsys.readouterr().out


def test_gpu_profile_without_a_gpu_is_refused_not_faked(tiny_teacher_dir):
    with pytest.raises(EdgeDistillError, match="needs CUDAExecutionProvider.*nothing was measured"):
        benchmark([tiny_teacher_dir], "gpu-cuda", settings=SETTINGS)


def test_gpu_profile_in_a_recipe_fails_before_training(tmp_path, tiny_teacher_dir, capsys):
    from tests.conftest import write_tsv

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{source: {write_tsv(tmp_path / 'd', 20, 10)}}}\n"
                      f"teacher: {{model: {tiny_teacher_dir}}}\nbench: {{profile: gpu-cuda}}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "profile 'gpu-cuda' needs CUDAExecutionProvider" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "teacher").exists()


def test_pinning_and_memory_budget_are_enforced(tiny_teacher_dir, tmp_path):
    onnx_dir = tmp_path / "onnx"
    export_onnx(tiny_teacher_dir, onnx_dir)
    # onnxruntime alone stays near 100 MB; a PyTorch worker imports torch and transformers
    speaker = {"int8_gops": 20.8, "fp32_gflops": 10.4, "bandwidth_gbs": 7.5, "source": "A53"}
    profile = Profile(name="tight", threads=1, cpu_affinity=1, memory_budget_mb=200,
                      target="a 200 MB device", roofline=speaker)
    fits, over = benchmark([onnx_dir, tiny_teacher_dir], profile, ["good pain"], SETTINGS,
                           progress=False)
    assert fits["latency"]["p50_ms"] > 0 and fits["peak_rss_mb"] <= 200
    assert len(fits["cores"]) == 1 and fits["constraints"]["pinned_cores"] == fits["cores"]
    assert "over the 200 MB memory budget of profile 'tight'" in over["over_budget"]
    assert "latency" not in over and over["size_mb"] > 0
    assert over["constraints"]["target"] == "a 200 MB device"
    # the ONNX model's roofline: this host's measured peaks, then the target's (an estimate)
    roof = fits["roofline"]
    assert roof["flops"] > 0 and roof["host"]["bound_ms"] > 0
    assert roof["measured_ms"] == fits["latency"]["p50_ms"]
    assert 0 < roof["host_efficiency"] == pytest.approx(roof["host"]["bound_ms"] / roof["measured_ms"])
    assert roof["target"]["peaks_source"] == "A53" and "estimate" in roof["label"]
    assert roof["estimated_target_ms"] == pytest.approx(
        roof["target"]["bound_ms"] / roof["host_efficiency"])
    assert "roofline" not in over


def test_a_profile_asking_for_more_cores_than_the_host_says_so(tiny_teacher_dir):
    import os

    host = len(os.sched_getaffinity(0))
    profile = Profile(name="big", threads=host + 2, cpu_affinity=host + 2)
    result = benchmark([tiny_teacher_dir], profile, ["good"], SETTINGS, progress=False)[0]
    assert len(result["cores"]) == host
    assert f"asks for {host + 2} cores, this host has {host}" in result["constraints"]["note"]


def test_phone_artifact_is_ort_format_with_its_operator_list(tiny_teacher_dir, tmp_path):
    import onnxruntime as ort

    from edgedistill.mobile import phone_artifact
    from edgedistill.quantization import quantize

    export_onnx(tiny_teacher_dir, tmp_path / "onnx")
    quantize(tmp_path / "onnx", tmp_path / "int8", profile="mobile-arm64")
    record = phone_artifact(tmp_path / "int8", tmp_path / "mobile")
    folder = tmp_path / "mobile"
    assert not (tmp_path / "mobile.partial").exists()
    session = ort.InferenceSession(str(folder / record["ort_file"]),
                                   providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} >= {"input_ids", "attention_mask"}
    operators = (folder / record["required_operators"]).read_text()
    assert "MatMulInteger" in operators or "DynamicQuantizeMatMul" in operators
    assert record["operator_types"] > 5 and (folder / "tokenizer_config.json").is_file()
    usability = record["usability"]
    assert {usability["NNAPI"], usability["CoreML MLProgram"]} <= {"YES", "MAYBE", "NO"}
    assert "input_ids" in usability["dynamic_inputs"]  # batch and length are dynamic


def test_report_says_what_the_profile_imitated():
    from dataclasses import asdict

    from edgedistill.report import _plots, to_markdown
    from edgedistill.tasks import get_task

    constraints = {"target": "arm64 phone", "host_cores": 2, "threads": 4, "pinned_cores": [0, 1],
                   "memory_budget_mb": 1024, "note": "profile asks for 4 cores, this host has 2"}
    models = [{"name": "teacher", "backend": "pytorch", "precision": "fp32",
               "profile": "mobile-arm64", "constraints": constraints,
               "over_budget": "over the 1024 MB memory budget"},
              {"name": "student-int8", "backend": "onnxruntime", "precision": "int8",
               "profile": "mobile-arm64", "constraints": constraints,
               "latency": {"p50_ms": 3.0}, "metrics": {"macro_f1": 0.5},
               "roofline": {**estimate_target(
                   {"flops": 2e9, "bytes": 4e6, "flops_by_compute": {"int8": 2e9, "fp32": 0}},
                   3.0, {"int8_gops": 2000, "fp32_gflops": 200, "bandwidth_gbs": 20,
                         "source": "host"},
                   {"int8_gops": 665.6, "fp32_gflops": 166.4, "bandwidth_gbs": 51.2,
                    "source": "4x A78"}), "flops": 2e9, "bytes": 4e6}}]
    view = asdict(get_task("classification").report)
    report = {"name": "r", "created": "now", "models": models, "targets": [], "training": {},
              "view": view,
              "environment": {"cpu": "x", "cpu_count": 2, "int8_isa": "avx2"},
              "quantization": {}}
    text = to_markdown(report)
    assert "stands for arm64 phone; measured on 2 host cores with 4 threads" in text
    for m, size in zip(models, (90.0, 16.0)):
        m.update(role="student", size_mb=size)
    models[1]["peak_rss_mb"] = 120.0
    assert set(_plots(report)) == {"quality_vs_latency.png", "size.png"}  # over budget drawn too
    assert "asks for 4 cores, this host has 2" in text
    assert "teacher: over the 1024 MB memory budget" in text
    # host bound 1 ms of a measured 3 ms (33%); the target's 3.0 ms bound / 0.33 = 9.0 ms
    assert ("student-int8: 2.00 GFLOP, 4.0 MB read; host bound 1.00 ms (compute-bound, int8), "
            "measured 3.00 ms = 33% of the host's roofline; ESTIMATE on the target: bound "
            "3.00 ms (compute-bound), 9.0 ms at the host's efficiency") in text
    assert "target peaks: 4x A78" in text


def test_bench_shape_comes_from_the_profile_unless_the_recipe_sets_it(tmp_path):
    from edgedistill.pipeline import Run
    from edgedistill.recipe import Recipe

    recipe = Recipe()
    recipe.bench.profile = "smart-speaker"
    Run(recipe, tmp_path)
    assert (recipe.bench.batch_size, recipe.bench.sequence_length) == (1, 32)
    recipe = Recipe()
    recipe.bench.profile, recipe.bench.sequence_length = "smart-speaker", 64
    Run(recipe, tmp_path)
    assert recipe.bench.sequence_length == 64
    assert load_profile("cpu").sequence_length == 128
