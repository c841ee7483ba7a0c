"""Accuracy-aware tuning (quantization.tuning): INC's tuner over our quantization settings,
fallback of the most harmful nodes to fp32, and an honest failure when the tolerance is not met."""

import json

import pytest
import torch

from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx
from edgedistill.quantization.tuning import FALLBACK_GROUPS, SETTINGS, OrtInt8Config, tune
from edgedistill.runtime.classifier import load_predictor
from edgedistill.artifacts import onnx_file
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer

TEXTS, TEXT_LABELS = make_texts(50, seed=1)


def _export(root, model):
    model.save_pretrained(root / "model")
    make_tokenizer(root / "model").save_pretrained(root / "model")
    export_onnx(root / "model", root / "onnx", texts=make_texts(8)[0])
    return root / "onnx"


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    """A tiny random classifier: int8 keeps its predictions."""
    return _export(tmp_path_factory.mktemp("plain"), make_bert(num_layers=1, hidden=32))


@pytest.fixture(scope="module")
def fragile_onnx(tmp_path_factory):
    """A classifier whose classes 0 and 1 are near-ties everywhere: their weight rows differ by
    far less than one int8 step, so int8 weights in the classifier flip about half of the
    predictions, while int8 anywhere else moves both logits alike (softmax ignores that). Class
    2 never wins. Keeping the classifier in fp32 is what fixes it (in dynamic mode onnxruntime
names its Gemm /classifier/Gemm_MatMul)."""
    model = make_bert(num_layers=1, hidden=32)
    noise = torch.randn(model.classifier.weight.shape[1],
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.classifier.weight[1] = model.classifier.weight[0] + 1e-5 * noise
        model.classifier.bias[1] = model.classifier.bias[0]
        model.classifier.bias[2] = -30.0
    return _export(tmp_path_factory.mktemp("fragile"), model)


def test_a_loose_tolerance_passes_at_the_first_trial(plain_onnx, tmp_path):
    """With labels the metric is macro-F1; dynamic fused int8 is tried first and kept, in place
    of what output_dir held before."""
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "stale.onnx").write_text("an older model")
    record = tune(plain_onnx, tmp_path / "int8", TEXTS, TEXT_LABELS, LABELS,
                  tolerable_loss=0.01, max_length=32)
    assert record["passed"] and record["chosen"] == 1 and record["metric"] == "macro_f1"
    [row] = record["trials"]
    assert row["setting"] == "dynamic-fused" and row["kept_fp32"] == [] and row["passed"]
    assert row["relative_loss"] <= 0.01 and row["agreement"] == 1.0 and row["p50_ms"] > 0
    assert record["baseline"]["metric"] > 0 and record["mode"] == "dynamic" and record["fused"]
    assert onnx_file(tmp_path / "int8").name.endswith("quantized.onnx")
    assert not (tmp_path / "int8" / "stale.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # trial folders are gone
    json.dumps(record)  # the pipeline stores it in a manifest


def test_a_tight_tolerance_keeps_the_most_harmful_node_in_fp32(fragile_onnx, tmp_path):
    """Both dynamic settings flip predictions (no calibration texts: the static ones are left
    out); the ranking puts the classifier first and keeping it fp32 meets the tolerance."""
    record = tune(fragile_onnx, tmp_path / "int8", TEXTS, tolerable_loss=0.02, max_length=32)
    rows = record["trials"]
    assert [r["setting"] for r in rows[:2]] == ["dynamic-fused", "dynamic-unfused"]
    assert all(not r["passed"] and r["agreement"] < 0.9 for r in rows[:2])
    assert "static-percentile: no calibration texts" in record["skipped"]
    base = max(rows[:2], key=lambda r: r["metric"])["setting"]
    assert record["ranking"]["base"] == base
    assert record["ranking"]["nodes"][0]["node"] == "/classifier/Gemm_MatMul"
    assert len(rows) == 3 and rows[2]["setting"] == base
    assert rows[2]["kept_fp32"] == ["/classifier/Gemm_MatMul"] and rows[2]["passed"]
    assert record["passed"] and record["chosen"] == 3
    assert record["nodes_to_exclude"] == ["/classifier/Gemm_MatMul"]
    # the model in place is the chosen one: its agreement with fp32, measured again, holds
    tokenizer = make_tokenizer(tmp_path / "tok")
    enc = dict(tokenizer(TEXTS, padding=True, return_tensors="np"))
    fp32 = load_predictor(fragile_onnx).logits(enc).argmax(-1)
    int8 = load_predictor(tmp_path / "int8").logits(enc).argmax(-1)
    assert (fp32 == int8).mean() >= 1 - 0.02


def test_a_tolerance_not_met_within_max_trials_is_reported_and_ships_nothing(
        fragile_onnx, tmp_path, monkeypatch):
    """Every trial goes through INC's TuningMonitor, which stops at max_trials; nothing passed,
    so nothing is written and the record says so."""
    from neural_compressor.common import base_tuning

    seen = []
    original = base_tuning.TuningMonitor.add_trial_result

    def spy(self, trial_index, trial_result, quant_config):
        seen.append((trial_index, trial_result, quant_config))
        return original(self, trial_index, trial_result, quant_config)

    monkeypatch.setattr(base_tuning.TuningMonitor, "add_trial_result", spy)
    record = tune(fragile_onnx, tmp_path / "int8", TEXTS, tolerable_loss=0.02, max_trials=2,
                  max_length=32)
    assert record["passed"] is False and record["chosen"] is None
    assert len(record["trials"]) == 2 and not any(r["passed"] for r in record["trials"])
    assert "mode" not in record  # no quantize record: there is no chosen model
    assert not (tmp_path / "int8").exists() and list(tmp_path.iterdir()) == []
    assert [(i, m) for i, m, _ in seen] == [(r["index"], r["metric"]) for r in record["trials"]]
    assert [c.setting for _, _, c in seen] == ["dynamic-fused", "dynamic-unfused"]
    assert all(isinstance(c, OrtInt8Config) for _, _, c in seen)


def test_the_default_tuning_space_is_expanded_by_inc():
    from neural_compressor.common.base_tuning import ConfigSet

    configs = ConfigSet.from_fwk_configs(OrtInt8Config.get_config_set_for_tuning()).config_list
    assert [c.setting for c in configs[:len(SETTINGS)]] == list(SETTINGS)
    assert [c.keep_fp32 for c in configs[len(SETTINGS):]] == FALLBACK_GROUPS
    assert len(configs) == len(SETTINGS) + len(FALLBACK_GROUPS) == 10  # the trial budget


@pytest.mark.parametrize("kwargs, message", [
    ({"tolerable_loss": 0}, r"tolerable_loss: 0 must be in \(0, 1\)"),
    ({"tolerable_loss": 1.5}, r"tolerable_loss: 1.5 must be in \(0, 1\)"),
    ({"max_trials": 0}, "max_trials: 0 must be > 0"),
    ({"texts": []}, "no texts"),
    ({"labels": ["good"]}, "1 labels for 2 texts"),
])
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, message):
    args = {"texts": ["good day", "bad day"], **kwargs}
    with pytest.raises(EdgeDistillError, match=message):
        tune(tmp_path / "onnx", tmp_path / "out", **args)


def test_the_nodes_static_int8_quantizes_on_the_fused_graph(plain_onnx, tmp_path):
    """Static mode's attention pass rewrites the pooler's Gemm as a float MatMul + Add: not a
    quantized node. The fused attention is one, and excluding it keeps it fp32."""
    import onnx

    from edgedistill.quantization import fuse_graph, quantize
    from edgedistill.quantization.tuning import quantized_nodes

    fuse_graph(plain_onnx, onnx_file(plain_onnx), tmp_path / "fused")
    source = onnx.load(str(onnx_file(tmp_path / "fused"))).graph

    def names(folder, exclude=()):
        record = quantize(plain_onnx, tmp_path / folder, mode="static", max_length=32,
                          calibration_texts=TEXTS[:8], nodes_to_exclude=list(exclude))
        return quantized_nodes(source, onnx.load(str(onnx_file(tmp_path / folder))).graph,
                               record["operators"])

    quantized = names("q")
    types = {n.name: n.op_type for n in source.node}
    assert {types[n] for n in quantized} == {"MatMul", "Attention"}
    attention = next(n for n in quantized if types[n] == "Attention")
    assert attention not in names("kept", [attention])


def test_an_excluded_matmul_in_a_qdq_model_counts_as_fp32(plain_onnx, tmp_path):
    """Q, K and V read one tensor: keeping Q in fp32 leaves that tensor dequantized for K and
    V, so Q still reads a DequantizeLinear output; its own weight is what shows it was kept."""
    import onnx

    from edgedistill.quantization import quantize
    from edgedistill.quantization.tuning import quantized_nodes

    source = onnx.load(str(onnx_file(plain_onnx))).graph
    query = next(n.name for n in source.node if "query" in n.name and n.op_type == "MatMul")
    key = query.replace("query", "key")
    record = quantize(plain_onnx, tmp_path / "q", mode="static", calibration_texts=TEXTS[:8],
                      max_length=32, nodes_to_exclude=[query], fuse=False)
    names = quantized_nodes(source, onnx.load(str(onnx_file(tmp_path / "q"))).graph,
                            record["operators"])
    assert key in names and query not in names
