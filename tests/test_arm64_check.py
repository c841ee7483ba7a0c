"""The arm64 checker's own verdicts (benchmarks/arm64_check.py), run natively on both sides: a
model against itself passes, a wrong model fails. The emulated arm64 run itself is a benchmark
(slow, needs root and Debian's packages), not a test."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
spec = importlib.util.spec_from_file_location("arm64_check", BENCHMARKS / "arm64_check.py")
arm64_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arm64_check)


def tiny_classifier(path: Path, seed: int) -> Path:
    """input_ids (batch, tokens) -> logits (batch, 3): an embedding table, averaged over tokens,
    times a matrix."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "table")
    head = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "head")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["vectors"]),
         helper.make_node("ReduceMean", ["vectors", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "head"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [table, head, axes])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                    str(path))
    return path


def device_outputs(tmp_path: Path, model: Path, name: str) -> dict:
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, input_ids=np.random.default_rng(0).integers(0, 50, (20, 12)),
             attention_mask=np.ones((20, 12), dtype=np.int64))  # not a graph input: left out
    spec_file = tmp_path / f"{name}.json"
    spec_file.write_text(json.dumps({"artifacts": {"classifier": {
        "kind": "classifier", "model": str(model), "inputs": str(inputs)}}}))
    return arm64_check.on_host(spec_file, tmp_path / f"{name}-out.json")


def test_the_same_model_passes_and_a_wrong_one_fails(tmp_path):
    right = tiny_classifier(tmp_path / "right.onnx", seed=1)
    reference = device_outputs(tmp_path, right, "reference")
    same = arm64_check.compare(reference, device_outputs(tmp_path, right, "again"))
    assert same["classifier"]["passed"] and same["classifier"]["max_logit_difference"] == 0
    wrong = tiny_classifier(tmp_path / "wrong.onnx", seed=2)
    verdict = arm64_check.compare(reference, device_outputs(tmp_path, wrong, "wrong"))
    assert not verdict["classifier"]["passed"]
    assert verdict["classifier"]["max_logit_difference"] > verdict["classifier"]["tolerance"]


def test_the_int8_tolerance_is_the_int8_models_own_error_against_fp32():
    fp32 = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])
    x86 = fp32 + [[0.2, 0.0, 0.0], [0.0, -0.1, 0.0]]  # its error against fp32: at most 0.2
    close = {"results": {"c": {"logits": (x86 + 0.15).tolist()}}}
    far = {"results": {"c": {"logits": (x86 + [[0.0, 0.0, 0.0], [0.0, 0.0, 0.3]]).tolist()}}}
    reference = {"results": {"c": {"logits": x86.tolist()}}}
    verdict = arm64_check.compare(reference, close, {"c": fp32.tolist()})["c"]
    assert verdict["passed"] and verdict["tolerance"] == pytest.approx(0.2)
    assert not arm64_check.compare(reference, far, {"c": fp32.tolist()})["c"]["passed"]


def test_generated_tokens_must_be_identical():
    reference = {"results": {"llm": {"tokens": [[5, 6, 7], [8, 9, 10]]}}}
    assert arm64_check.compare(reference, reference)["llm"]["passed"]
    other = {"results": {"llm": {"tokens": [[5, 6, 7], [8, 9, 11]]}}}
    verdict = arm64_check.compare(reference, other)["llm"]
    assert not verdict["passed"] and verdict["identical_prompts"] == 1


def test_where_greedy_tokens_part_the_logits_of_both_choices_are_read_back(tmp_path):
    from edgedistill.quantization.genai import build_genai_package
    from edgedistill.quantization.int4 import float_compute_copy
    from edgedistill.runtime.causal_lm import load_causal_lm
    from tests.test_genai import tiny_decoder

    _, tokenizer = tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    build_genai_package(tmp_path / "model", tmp_path / "int4", block_size=16)
    copy = float_compute_copy(tmp_path / "int4", tmp_path / "float")
    prompts = [tokenizer("the cat saw a dog")["input_ids"], tokenizer("a dog")["input_ids"]]
    x86 = [load_causal_lm(tmp_path / "int4").greedy(np.array([p]), 6) for p in prompts]
    arm = [list(x86[0]), [*x86[1][:2], (x86[1][2] + 1) % len(tokenizer), *x86[1][3:]]]
    found = arm64_check.divergences(tmp_path / "int4", copy, prompts, x86, arm)
    assert [(d["prompt"], d["step"]) for d in found] == [(1, 2)]  # prompt 0 never parts
    d = found[0]
    assert (d["x86_token"], d["arm64_token"]) == (x86[1][2], arm[1][2])
    # fed as in generation, the package's logits at that step choose what it chose on x86
    assert d["int8"]["argmax"] == x86[1][2]
    assert d["int8"]["x86_over_arm64_choice"] >= d["int8"]["top2_margin"] > 0
    assert d["int8_vs_float_max_difference"] > 0  # int8 activations do move the logits
    assert "| 1 | 2 |" in "\n".join(arm64_check.divergence_lines(found))


def test_the_package_int8_kernels_are_cut_out_alone_with_their_weights(tmp_path):
    import onnxruntime as ort

    from edgedistill.quantization.genai import build_genai_package
    from tests.test_genai import tiny_decoder

    _, tokenizer = tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    build_genai_package(tmp_path / "model", tmp_path / "int4", block_size=16)
    ops = arm64_check.operator_specs(tmp_path / "int4", tmp_path)
    assert sorted(ops) == ["op-matmulnbits-4bit", "op-matmulnbits-head-8bit"]
    outputs = {}
    for name, op in ops.items():
        session = ort.InferenceSession(op["model"], providers=["CPUExecutionProvider"])
        outputs[name] = session.run(None, {"A": np.load(op["inputs"])["A"]})[0]
        assert np.isfinite(outputs[name]).all() and np.abs(outputs[name]).max() > 0
    assert outputs["op-matmulnbits-head-8bit"].shape == (4, len(tokenizer))
    # cut out as it runs in the package: int8 activations (accuracy level 4)
    head = onnx.load(ops["op-matmulnbits-head-8bit"]["model"])
    assert {a.name: a.i for a in head.graph.node[0].attribute}["accuracy_level"] == 4
