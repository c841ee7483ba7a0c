"""Roofline model: operation and byte counts read from exported graphs, host peaks measured
once and cached, bounds and projections."""

import json

import pytest

from edgedistill.bench import roofline
from edgedistill.profiles import load_profile, resolve_target
from edgedistill.bench.roofline import (at_host_efficiency, efficiency, estimate_target,
                                        graph_cost, host_peaks, profile_peaks, project)
from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx
from edgedistill.quantization import quantize, quantize_int4
from tests.conftest import make_bert, make_texts, make_tokenizer

LAYERS, HIDDEN, LABELS = 2, 64, 3
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT classifier exported to ONNX, and its int8 dynamic quantization."""
    root = tmp_path_factory.mktemp("roofline")
    make_bert(num_layers=LAYERS, hidden=HIDDEN, num_labels=LABELS).save_pretrained(root / "model")
    make_tokenizer(root / "model").save_pretrained(root / "model")
    export_onnx(root / "model", root / "onnx", texts=make_texts(8)[0])
    quantize(root / "onnx", root / "int8", profile="cpu")
    return root


def hand_count(batch, seq, hidden=HIDDEN, layers=LAYERS, labels=LABELS):
    """FLOPs (a multiply-add is 2) of make_bert's model, from its config: embeddings are
    lookups; per layer Q, K, V, O (4 h^2) and the FFN (2 h i, i = 2h) on every token, and
    QK^T and AV (2 x 2 x seq^2 x h per sequence); pooler and classifier on [CLS] only."""
    tokens, inter = batch * seq, 2 * hidden
    per_layer = (2 * tokens * (4 * hidden * hidden + 2 * hidden * inter)
                 + 4 * batch * seq**2 * hidden)
    head = 2 * batch * (hidden * hidden + hidden * labels)
    return layers * per_layer + head


def test_fp32_flops_match_a_hand_count(bert):
    cost = graph_cost(bert / "onnx", BATCH, SEQ)
    assert cost["flops"] == pytest.approx(hand_count(BATCH, SEQ), rel=0.02)
    assert cost["attention_flops"] == 4 * LAYERS * BATCH * SEQ**2 * HIDDEN
    assert cost["precision"] == "fp32" and cost["flops_by_compute"]["int8"] == 0
    # bytes: the weights once, and only the looked-up rows of the embedding tables
    assert cost["matmul_weight_bytes"] == 4 * (LAYERS * 8 * HIDDEN**2 + HIDDEN**2 + HIDDEN * LABELS)
    assert cost["matmul_weight_bytes"] < cost["bytes"] < 1.2 * cost["matmul_weight_bytes"]
    assert cost["arithmetic_intensity"] == pytest.approx(cost["flops"] / cost["bytes"])


def test_int8_dynamic_has_the_same_flops_and_a_quarter_of_the_weight_bytes(bert):
    fp32, int8 = graph_cost(bert / "onnx", BATCH, SEQ), graph_cost(bert / "int8", BATCH, SEQ)
    assert int8["flops"] == pytest.approx(fp32["flops"], rel=1e-9)
    assert int8["precision"] == "int8" and int8["flops_by_compute"]["int8"] > 0
    assert int8["matmul_weight_bytes"] == pytest.approx(fp32["matmul_weight_bytes"] / 4, rel=0.05)
    assert int8["bytes"] < fp32["bytes"] / 2


def test_fused_graph_counts_the_same(bert, tmp_path):
    """onnxruntime's transformer optimizer: Attention (QKV weight as one initializer),
    SkipLayerNormalization, EmbedLayerNormalization, where shape inference stops."""
    import shutil

    import onnx
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(bert / "onnx" / "model.onnx"), model_type="bert",
                                     num_heads=4, hidden_size=HIDDEN)
    fused.save_model_to_file(str(tmp_path / "model.onnx"))
    shutil.copy(bert / "onnx" / "config.json", tmp_path)
    assert "Attention" in {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    cost = graph_cost(tmp_path / "model.onnx", BATCH, SEQ)
    assert cost["flops"] == pytest.approx(graph_cost(bert / "onnx", BATCH, SEQ)["flops"], rel=1e-9)


def test_doubling_the_sequence_doubles_the_weight_flops(bert):
    short, long = graph_cost(bert / "onnx", BATCH, SEQ), graph_cost(bert / "onnx", BATCH, 2 * SEQ)
    assert long["weight_flops"] / short["weight_flops"] == pytest.approx(2, rel=0.02)
    assert long["attention_flops"] == 4 * short["attention_flops"]  # quadratic in length
    assert long["flops"] == pytest.approx(hand_count(BATCH, 2 * SEQ), rel=0.02)


def test_without_config_the_attention_products_are_said_to_be_missing(bert, tmp_path):
    import shutil

    shutil.copy(bert / "onnx" / "model.onnx", tmp_path)
    cost = graph_cost(tmp_path, BATCH, SEQ)
    assert cost["attention_flops"] is None and "no config.json" in cost["notes"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeDistillError, match="no .onnx file"):
        graph_cost(tmp_path / "empty", BATCH, SEQ)
    with pytest.raises(EdgeDistillError, match="no such ONNX file"):
        graph_cost(tmp_path / "missing.onnx", BATCH, SEQ)


def test_int4_decoder(tiny_llama_dir, tmp_path):
    export_onnx(tiny_llama_dir, tmp_path / "onnx", texts=make_texts(4)[0])
    quantize_int4(tmp_path / "onnx", tmp_path / "int4")
    fp32, int4 = graph_cost(tmp_path / "onnx", 1, SEQ), graph_cost(tmp_path / "int4", 1, SEQ)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    # q, o: h x h; k, v: h x kv (grouped-query); gate, up, down: h x i; lm_head (tied to the
    # embedding, read through a Transpose): h x vocab
    weights = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * config["vocab_size"]
    assert fp32["weight_flops"] == 2 * SEQ * weights
    assert int4["flops"] == pytest.approx(fp32["flops"], rel=1e-9)
    assert int4["precision"] == "int4" and fp32["precision"] == "fp32"
    assert int4["matmul_weight_bytes"] < fp32["matmul_weight_bytes"] / 4


COST = {"flops": 2e9, "bytes": 1e8, "flops_by_compute": {"int8": 2e9, "fp32": 0.0}}


def test_project_picks_the_limiting_roof():
    slow_memory = project(COST, {"int8_gops": 1000, "fp32_gflops": 100, "bandwidth_gbs": 0.1})
    assert slow_memory["limited_by"] == "memory"
    assert slow_memory["bound_ms"] == pytest.approx(1e8 / 0.1e9 * 1e3)  # 1 s of memory traffic
    slow_compute = project(COST, {"int8_gops": 0.001, "fp32_gflops": 100, "bandwidth_gbs": 10})
    assert slow_compute["limited_by"] == "compute"
    assert slow_compute["bound_ms"] == pytest.approx(2e9 / 1e6 * 1e3)
    assert slow_compute["arithmetic_intensity"] == 20 and slow_compute["compute"] == "int8"
    with pytest.raises(EdgeDistillError, match="no positive 'int8_gops'"):
        project(COST, {"fp32_gflops": 100, "bandwidth_gbs": 10, "source": "x"})


def test_efficiency_and_the_estimate_on_the_target():
    assert efficiency(10.0, 2.5) == 0.25
    assert at_host_efficiency(4.0, 0.25) == 16.0
    host = {"int8_gops": 1000, "fp32_gflops": 100, "bandwidth_gbs": 100}
    target = load_profile("mobile-arm64").roofline
    record = estimate_target(COST, measured_ms=8.0, host=host, target=target)
    assert record["host"]["bound_ms"] == pytest.approx(2.0)  # 2 GOP at 1000 GOPS
    assert record["host_efficiency"] == pytest.approx(0.25)
    assert record["estimated_target_ms"] == pytest.approx(record["target"]["bound_ms"] / 0.25)
    assert "estimate" in record["label"]
    with pytest.raises(EdgeDistillError):
        efficiency(0, 1.0)


def test_profiles_give_target_peaks_or_the_host():
    for name in ("mobile-arm64", "smart-speaker", "gpu-cuda"):
        peaks = load_profile(name).roofline
        assert all(peaks[k] > 0 for k in ("int8_gops", "fp32_gflops", "bandwidth_gbs"))
        assert "theoretical" in peaks["source"] and profile_peaks(resolve_target(name)) == peaks
    assert "H100" in load_profile("gpu-cuda").roofline["source"]
    assert not {"int8_gops", "fp32_gflops"} & set(load_profile("cpu").roofline)


def test_cpu_profile_peaks_are_the_host_measured(monkeypatch):
    monkeypatch.setattr(roofline, "host_peaks", lambda threads: {"measured_with": threads})
    cpu = resolve_target("cpu")
    assert profile_peaks(cpu) == {"measured_with": cpu.threads}


def test_host_peaks_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(roofline, "SECONDS", 0.05)  # fewer repeats: positive numbers suffice
    monkeypatch.setattr(roofline.os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # a quiet host
    peaks = host_peaks(1)
    assert all(peaks[k] > 0 for k in ("int8_gops", "fp32_gflops", "bandwidth_gbs"))
    cached = json.loads((tmp_path / "host_peaks.json").read_text())
    assert list(cached.values()) == [peaks] and "1 threads | onnxruntime" in peaks["host"]

    def measure(threads):
        raise AssertionError("measured again")

    monkeypatch.setattr(roofline, "_measure", measure)
    assert host_peaks(1) == peaks  # from the cache
    with pytest.raises(AssertionError, match="measured again"):
        host_peaks(1, refresh=True)
    # a refresh slowed by other work keeps the better figures (a peak is a maximum)
    monkeypatch.setattr(roofline, "_measure", lambda threads: {
        "int8_gops": 1e-3, "fp32_gflops": 1e6, "bandwidth_gbs": peaks["bandwidth_gbs"]})
    again = host_peaks(1, refresh=True)
    assert again["int8_gops"] == peaks["int8_gops"] and again["fp32_gflops"] == 1e6
    # measured on a busy host: the next call measures again, keeping the better figures
    monkeypatch.setattr(roofline.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    busy = host_peaks(1, refresh=True)
    assert busy["load_per_core"] > roofline.BUSY
    monkeypatch.setattr(roofline, "_measure", measure)
    with pytest.raises(AssertionError, match="measured again"):
        host_peaks(1)
    assert not list(tmp_path.glob("*.tmp"))
