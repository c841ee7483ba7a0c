"""The OpenVINO int8 student on a tiny random BERT: conversion, NNCF int8, evaluation, a
benchmark run, and the profiles' runtime rules."""

import json

import pytest

from edgedistill.artifacts import backend_of, size_on_disk_mb
from edgedistill.bench import benchmark_model
from edgedistill.bench.runner import BenchSettings
from edgedistill.errors import EdgeDistillError
from edgedistill.evaluation import predict
from edgedistill.export import export_onnx
from edgedistill.profiles import resolve_target
from edgedistill.quantization import quantize, quantize_openvino
from edgedistill.recipe_blocks import QuantizeConfig
from edgedistill.runtime.classifier import load_predictor
from edgedistill.tasks import get_task
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    make_bert(num_layers=2, hidden=64).save_pretrained(root / "model")
    make_tokenizer(root / "model").save_pretrained(root / "model")
    export_onnx(root / "model", root / "onnx", texts=make_texts(8)[0])
    return root


@pytest.fixture(scope="module")
def openvino_int8(exported):
    record = quantize_openvino(exported / "onnx", exported / "ov", make_texts(32, seed=1)[0],
                               max_length=32)
    return exported / "ov", record


def test_nncf_int8_is_smaller_and_close_to_fp32(exported, openvino_int8):
    folder, record = openvino_int8
    assert backend_of(folder) == "openvino"
    assert record["calibration_samples"] == 32 and record["inference_precision"] == "f32"
    # the settings it runs with travel with it, and the tokenizer, so the folder deploys alone
    saved = json.loads((folder / "openvino_config.json").read_text())
    assert saved["inference_precision"] == "f32" and (folder / "tokenizer.json").is_file()
    # int8 weights (on a model this tiny the graph's XML outweighs them: compare the weights)
    assert (folder / "openvino_model.bin").stat().st_size / 1e6 < 0.5 * size_on_disk_mb(
        exported / "onnx")
    assert size_on_disk_mb(folder) > (folder / "openvino_model.bin").stat().st_size / 1e6
    tokenizer = make_tokenizer(exported / "tok")
    enc = dict(tokenizer(make_texts(8, seed=2)[0], padding=True, return_tensors="np"))
    fp32 = load_predictor(exported / "onnx").logits(enc)
    int8 = load_predictor(folder).logits(enc)
    assert int8.shape == fp32.shape and abs(fp32 - int8).max() < 0.1
    # evaluation reads it like any other model folder
    texts = make_texts(16, seed=3)[0]
    assert (predict(folder, texts) == predict(exported / "onnx", texts)).mean() >= 0.8


def test_benchmark_runs_it_in_its_own_process_and_says_its_precision(openvino_int8):
    folder, _ = openvino_int8
    settings = BenchSettings(warmup=1, iterations=5, min_seconds=0.05, sequence_length=32,
                             real_length_samples=2, rounds=1)
    # under a profile's constraints like any model: one thread, one pinned core, 512 MB
    result = benchmark_model(folder, "smart-speaker", texts=make_texts(4)[0], settings=settings)
    assert result["backend"] == "openvino" and result["inference_precision"] == "f32"
    assert result["latency"]["p50_ms"] > 0 and 0 < result["peak_rss_mb"] < 512
    assert result["threads"] == 1 and result["cores"] == result["constraints"]["pinned_cores"]
    assert len(result["cores"]) == 1
    assert "roofline" not in result  # counted from ONNX graphs only


def test_a_fused_int8_graph_is_refused_naming_the_operator(exported, tmp_path):
    quantize(exported / "onnx", tmp_path / "int8", profile="cpu")
    with pytest.raises(EdgeDistillError, match="QAttention") as e:
        quantize_openvino(tmp_path / "int8", tmp_path / "ov", ["some text"])
    assert "\n" not in str(e.value) and "export/student" in str(e.value)
    assert not (tmp_path / "ov").exists()


def test_bad_settings_are_refused_before_any_work(exported, tmp_path):
    with pytest.raises(EdgeDistillError, match="calibration_texts"):
        quantize_openvino(exported / "onnx", tmp_path / "ov", [])
    with pytest.raises(EdgeDistillError, match="precision 'f16' is unknown"):
        quantize_openvino(exported / "onnx", tmp_path / "ov", ["a"], precision="f16")
    with pytest.raises(EdgeDistillError, match="no .onnx file"):
        quantize_openvino(tmp_path, tmp_path / "ov", ["a"])
    assert not (tmp_path / "ov").exists()


def test_accuracy_control_keeps_the_loss_within_the_tolerance(exported, tmp_path):
    texts, labels = make_texts(24, seed=4)
    record = quantize_openvino(exported / "onnx", tmp_path / "ov", make_texts(16, seed=1)[0],
                               max_length=32, tolerable_loss=0.05,
                               validation=(texts, [LABELS.index(y) for y in labels], LABELS))
    control = record["accuracy_control"]
    assert control["validation_texts"] == 24
    assert control["passed"] == (control["relative_loss"] <= 0.05)
    assert backend_of(tmp_path / "ov") == "openvino"


def test_profiles_choose_runtimes_and_refuse_openvino_off_the_cpu():
    cpu = resolve_target("cpu")
    assert cpu.runtimes == ("onnxruntime", "openvino") and cpu.openvino_precision == "f32"
    classification, causal = get_task("classification"), get_task("causal-lm")
    assert cpu.runtimes_for(QuantizeConfig(), classification.runtimes) == cpu.runtimes
    # a task without an OpenVINO path takes the profile's runtimes it has
    assert cpu.runtimes_for(QuantizeConfig(), causal.runtimes) == ("onnxruntime",)
    assert resolve_target("smart-speaker").runtimes == ("onnxruntime",)  # phones: onnxruntime
    asked = QuantizeConfig(runtimes=["onnxruntime", "openvino"])
    assert resolve_target("smart-speaker").runtimes_for(asked) == ("onnxruntime", "openvino")
    with pytest.raises(EdgeDistillError, match="openvino runs on the CPU here and profile "
                                               "'gpu-cuda' measures CUDAExecutionProvider"):
        resolve_target("gpu-cuda").runtimes_for(asked, classification.runtimes)
    with pytest.raises(EdgeDistillError, match="not a runtime this task ships"):
        cpu.runtimes_for(asked, causal.runtimes)
    with pytest.raises(EdgeDistillError, match="tensorrt is not a runtime this task ships; "
                                               "valid: onnxruntime, openvino"):
        cpu.runtimes_for(QuantizeConfig(runtimes=["onnxruntime", "tensorrt"]))
    with pytest.raises(EdgeDistillError, match="onnxruntime is missing"):
        cpu.runtimes_for(QuantizeConfig(runtimes=["openvino"]))


def test_cli_quantizes_for_openvino_and_refuses_a_gpu_profile(exported, tmp_path, capsys):
    from edgedistill.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(make_texts(8, seed=5)[0]))
    assert main(["quantize", str(exported / "onnx"), str(tmp_path / "ov"), "--openvino",
                 "--calibration-texts", str(texts)]) == 0
    assert backend_of(tmp_path / "ov") == "openvino"
    capsys.readouterr()
    assert main(["quantize", str(exported / "onnx"), str(tmp_path / "gpu"), "--openvino",
                 "--calibration-texts", str(texts), "--profile", "gpu-cuda"]) == 2
    err = capsys.readouterr().err
    assert "openvino runs on the CPU here" in err and not (tmp_path / "gpu").exists()


def test_a_run_asking_openvino_on_a_gpu_profile_stops_before_any_stage(tmp_path,
                                                                         tiny_teacher_dir, capsys):
    from edgedistill.cli import main
    from tests.conftest import write_tsv

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{source: {write_tsv(tmp_path / 'data', 40, 10)}, max_length: 32}}\n"
                      f"teacher: {{model: {tiny_teacher_dir}}}\n"
                      "quantize: {runtimes: [onnxruntime, openvino]}\n"
                      "bench: {profile: gpu-cuda}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgedistill: error: quantize.runtimes: openvino runs on the CPU here and "
                   "profile 'gpu-cuda' measures CUDAExecutionProvider; drop openvino or choose "
                   "profile cpu"]
    assert not list((tmp_path / "out").glob("*/manifest.json"))


def test_report_says_which_runtime_was_fastest_and_how_openvino_was_made():
    from edgedistill.report import _runtime_lines
    from edgedistill.report_training import openvino_line

    view = {"timing": "latency"}
    rows = [{"name": "student-int8", "role": "student", "backend": "onnxruntime",
             "precision": "int8", "latency": {"p50_ms": 4.0}},
            {"name": "student-int8-openvino", "role": "student", "backend": "openvino",
             "precision": "int8", "latency": {"p50_ms": 3.2}, "inference_precision": "f32"},
            {"name": "student-onnx", "role": "student", "backend": "onnxruntime",
             "precision": "fp32", "latency": {"p50_ms": 9.0}}]
    rows[0]["latency_real_lengths"] = {"p50_ms": 3.0}
    rows[1]["latency_real_lengths"] = {"p50_ms": 5.0}
    assert _runtime_lines({"view": view, "models": rows}) == [
        "int8 student p50 by runtime on this host: openvino 3.20 ms (computes in f32), "
        "onnxruntime 4.00 ms; the fastest here is openvino (student-int8-openvino), at 0.80x "
        "onnxruntime's p50",
        # one text at a time at its own length, the verdict can turn
        "int8 student real-length p50 by runtime on this host: onnxruntime 3.00 ms, openvino "
        "5.00 ms (computes in f32); the fastest here is onnxruntime (student-int8), at 0.60x "
        "openvino's real-length p50"]
    assert _runtime_lines({"view": view, "models": rows[:1] + rows[2:]}) == []  # one runtime
    record = {"openvino": "2026.4.1", "nncf": "3.4.0", "model_type": "transformer",
              "calibration_samples": 128, "inference_precision": "f32",
              "accuracy_control": {"passed": False, "int8_macro_f1": 0.40,
                                   "fp32_macro_f1": 0.44, "relative_loss": 0.0909,
                                   "tolerable_loss": 0.01}}
    line = openvino_line(record)
    assert "calibrated on 128 training texts; computes in f32" in line
    assert "(9.1% loss, NOT within the tolerated 1.0%)" in line
