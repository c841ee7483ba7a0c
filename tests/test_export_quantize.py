import collections
import json
import onnx
import pytest

from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx
from edgedistill.profiles import Profile, resolve_target
from edgedistill.quantization import quantize, to_fp16
from edgedistill.recipe_blocks import QuantizeConfig
from edgedistill.runtime.classifier import load_predictor
from edgedistill.artifacts import onnx_file, size_on_disk_mb
from tests.conftest import make_bert, make_texts, make_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = root / "model"
    make_bert(num_layers=2, hidden=64).save_pretrained(model_dir)
    make_tokenizer(model_dir).save_pretrained(model_dir)
    record = export_onnx(model_dir, root / "onnx", texts=make_texts(8)[0])
    return root, record


def test_export_matches_pytorch(exported):
    root, record = exported
    assert record["max_abs_diff"] <= 1e-4 and record["samples"] == 8
    assert record["argmax_agreement"] == 1.0
    assert onnx_file(root / "onnx").name == "model.onnx"
    assert (root / "onnx" / "tokenizer.json").is_file()  # deployable: tokenizer travels along


def test_quantize_int8(exported):
    root, _ = exported
    settings = quantize(root / "onnx", root / "int8", profile="cpu")
    assert settings["preset"] in {"avx512_vnni", "avx512", "avx2", "arm64"}
    # fused first (one attention per layer), so the attention runs as integer QAttention
    assert settings["fused"]["Attention"] == 2 and settings["fused"]["SkipLayerNormalization"]
    ops = {n.op_type for n in onnx.load(str(onnx_file(root / "int8"))).graph.node}
    assert "MatMulInteger" in ops and "QAttention" in ops
    assert not (root / "int8" / "fused.tmp").exists()
    assert size_on_disk_mb(root / "int8") < size_on_disk_mb(root / "onnx")
    tokenizer = make_tokenizer(root / "tok")
    enc = dict(tokenizer(make_texts(4)[0], padding=True, return_tensors="np"))
    fp32 = load_predictor(root / "onnx").logits(enc)
    int8 = load_predictor(root / "int8").logits(enc)
    assert abs(fp32 - int8).max() < 0.1  # int8 stays close to fp32 on a tiny model
    assert (root / "int8" / "ort_config.json").is_file()  # the settings that made it
    with pytest.raises(EdgeDistillError, match="already quantized"):
        quantize(root / "int8", root / "int8-again")


def test_export_rejects_a_tight_atol(exported, tmp_path):
    root, _ = exported
    with pytest.raises(EdgeDistillError, match="differ from PyTorch"):
        export_onnx(root / "model", tmp_path / "onnx", atol=0.0, texts=make_texts(4)[0])


def test_corrupted_onnx_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EdgeDistillError, match="onnxruntime cannot load"):
        load_predictor(tmp_path)
    with pytest.raises(EdgeDistillError, match="not a readable ONNX model"):
        quantize(tmp_path, tmp_path / "q")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model", "architectures": ["X"]}')
    with pytest.raises(EdgeDistillError, match="cannot export"):
        export_onnx(tmp_path, tmp_path / "onnx")


def test_presets():
    cpu = resolve_target("cpu")
    assert cpu.int8_for(QuantizeConfig(preset="avx2"))["preset"] == "avx2"
    assert cpu.int8_for(QuantizeConfig(per_channel=False))["per_channel"] is False
    with pytest.raises(EdgeDistillError, match="unknown"):
        cpu.int8_for(QuantizeConfig(preset="sse2"))
    with pytest.raises(EdgeDistillError, match="profile 'cpuu' is unknown; did you mean 'cpu'"):
        resolve_target("cpuu")


def test_preset_options_and_unfused_quantization(exported, tmp_path):
    """A profile's preset options reach onnxruntime's quantizer; fuse=False quantizes the graph
    as exported."""
    import json

    root, _ = exported
    record = quantize(root / "onnx", tmp_path / "plain", fuse=False)
    ops = {n.op_type for n in onnx.load(str(onnx_file(tmp_path / "plain"))).graph.node}
    assert record["fused"] is None and "QAttention" not in ops and "MatMulInteger" in ops
    profile = Profile(name="cpu", quantization={"preset": "auto", "reduce_range": True,
                                                "weights": "uint8"})
    record = quantize(root / "onnx", tmp_path / "options", profile=profile)
    saved = json.loads((tmp_path / "options" / "ort_config.json").read_text())["quantization"]
    assert record["reduce_range"] is True and saved["reduce_range"] is True
    assert saved["weights_dtype"] == "QUInt8"
    profile.quantization.update(weights="int4")
    with pytest.raises(EdgeDistillError, match="quantization.weights 'int4' is invalid"):
        quantize(root / "onnx", tmp_path / "bad", profile=profile)
    profile.quantization = {"preset": "auto", "reduce_rang": True}
    with pytest.raises(EdgeDistillError, match="quantization.reduce_rang is unknown"):
        quantize(root / "onnx", tmp_path / "bad", profile=profile)


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_int8_calibrated_on_given_texts(exported, tmp_path, calibration):
    root, _ = exported
    texts = make_texts(16, seed=2)[0]
    record = quantize(root / "onnx", tmp_path / "int8", mode="static", calibration=calibration,
                      calibration_texts=texts, max_length=32)
    assert record["calibration_samples"] == 16 and record["mode"] == "static"
    # the fused graph: MatMuls static (QDQ), the fused attention made QAttention by a dynamic
    # pass (onnxruntime's static quantizers have no form for it)
    assert record["fused"]["Attention"] == 2 and record["dynamic_operators"] == ["Attention"]
    ops = collections.Counter(
        n.op_type for n in onnx.load(str(onnx_file(tmp_path / "int8"))).graph.node)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]  # QDQ format
    assert ops["QAttention"] == 2 and not ops["Attention"] and not ops["DynamicQuantizeMatMul"]
    assert not list(tmp_path.glob("int8/*.tmp"))
    assert [p.name for p in tmp_path.glob("int8/*.onnx")] == [onnx_file(tmp_path / "int8").name]
    saved = json.loads((tmp_path / "int8" / "ort_config.json").read_text())["quantization"]
    assert saved["is_static"] is True  # the static pass's settings, not the attention pass's
    tokenizer = make_tokenizer(tmp_path / "tok")
    enc = dict(tokenizer(make_texts(4)[0], padding=True, return_tensors="np"))
    fp32 = load_predictor(root / "onnx").logits(enc)
    int8 = load_predictor(tmp_path / "int8").logits(enc)
    assert abs(fp32 - int8).max() < 0.2


def test_static_int8_of_the_exported_graph_when_fusion_is_off(exported, tmp_path):
    root, _ = exported
    record = quantize(root / "onnx", tmp_path / "int8", mode="static", fuse=False,
                      calibration_texts=make_texts(8, seed=2)[0], max_length=32)
    assert record["fused"] is None and record["dynamic_operators"] == []
    ops = {n.op_type for n in onnx.load(str(onnx_file(tmp_path / "int8"))).graph.node}
    assert "DequantizeLinear" in ops and not ops & {"Attention", "QAttention"}


def test_static_calibration_uses_the_data_it_is_given(exported, tmp_path):
    """Ranges come from the calibration texts: texts of a few repeated words give other scales
    than varied texts."""
    root, _ = exported

    def scales(texts, name):
        quantize(root / "onnx", tmp_path / name, mode="static", calibration_texts=texts,
                 max_length=32)
        graph = onnx.load(str(onnx_file(tmp_path / name))).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        return {n.input[1]: float(inits[n.input[1]]) for n in graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in inits}

    varied = scales(make_texts(16, seed=2)[0], "a")
    narrow = scales(["good"] * 16, "b")
    assert varied.keys() == narrow.keys()
    assert any(abs(varied[k] - narrow[k]) > 1e-6 for k in varied)
    with pytest.raises(EdgeDistillError, match="needs calibration texts"):
        quantize(root / "onnx", tmp_path / "c", mode="static")
    with pytest.raises(EdgeDistillError, match="calibration: 'kl' is unknown"):
        quantize(root / "onnx", tmp_path / "d", mode="static", calibration="kl",
                 calibration_texts=["good"])


def test_fp16_for_a_gpu_profile(exported, tmp_path):
    """The gpu-cuda profile's fp16 student: float16 weights, fp32 inputs and outputs as before,
    and (run here on the CPU provider) logits close to fp32."""
    root, _ = exported
    assert resolve_target("gpu-cuda").fp16 and not resolve_target("cpu").fp16
    record = to_fp16(root / "onnx", tmp_path / "fp16")
    assert record["precision"] == "fp16" and record["fp16_initializers"] > 0
    assert record["fused"]["Attention"] == 2
    assert (tmp_path / "fp16" / "tokenizer.json").is_file()
    tokenizer = make_tokenizer(tmp_path / "tok")
    enc = dict(tokenizer(make_texts(4)[0], padding=True, return_tensors="np"))
    fp32 = load_predictor(root / "onnx").logits(enc)
    fp16 = load_predictor(tmp_path / "fp16").logits(enc)
    assert fp16.dtype == fp32.dtype and abs(fp32 - fp16).max() < 0.02
    quantize(root / "onnx", tmp_path / "int8")
    with pytest.raises(EdgeDistillError, match="already quantized"):
        to_fp16(tmp_path / "int8", tmp_path / "again")
