"""Causal-LM export with its KV cache, and its int8 / int4 quantization, on a tiny Llama."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx, validate_causal_onnx
from edgedistill.runtime.causal_lm import OnnxCausalLM, load_causal_lm
from edgedistill.quantization import quantize, quantize_int4
from edgedistill.quantization.int4 import float_compute_copy
from edgedistill.artifacts import onnx_file, size_on_disk_mb
from tests.conftest import make_llama, make_llm_tokenizer, make_texts


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    model = make_llama()
    with torch.no_grad():  # sharper logits than the random init (std 1 instead of 0.1): greedy
        for p in model.parameters():  # tokens then vary, so they exercise the KV cache
            if p.dim() > 1:
                p.mul_(10)
    model.save_pretrained(root / "llama")
    make_llm_tokenizer().save_pretrained(root / "llama")
    record = export_onnx(root / "llama", root / "onnx", texts=make_texts(4)[0])
    return root, record


def session(folder):
    return ort.InferenceSession(str(onnx_file(folder)), providers=["CPUExecutionProvider"])


def logits_on_texts(folder):
    """Full-sequence logits of 8 padded texts, the padded positions dropped."""
    enc = dict(make_llm_tokenizer()(make_texts(8, seed=3)[0], padding=True, return_tensors="np"))
    logits = load_causal_lm(folder).logits(enc["input_ids"], enc["attention_mask"])
    return logits[enc["attention_mask"].astype(bool)]


def ops(folder):
    return [n.op_type for n in onnx.load(str(onnx_file(folder))).graph.node]


def test_causal_export_is_validated_with_its_kv_cache(causal):
    root, record = causal
    assert record["greedy_tokens_match"] and record["new_tokens"] == 16
    assert record["max_abs_diff"] <= 1e-4 and record["samples"] == 4
    assert len(set(record["greedy_tokens"])) > 2  # a varied continuation, not one repeated id
    graph = onnx.load(str(root / "onnx" / "model.onnx"), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [n for n in inputs if n.startswith("past_key_values.")] == [
        f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(4)
                                    for kv in ("key", "value")]
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        assert (root / "onnx" / name).is_file()  # self-contained: generate() needs them


def test_a_cached_step_gives_the_full_sequence_logits(causal):
    """The decode path: prompt with an empty cache, then one token reading the cache."""
    root, _ = causal
    sess = session(root / "onnx")
    ids = np.array([make_llm_tokenizer()(make_texts(1)[0][0])["input_ids"]], dtype=np.int64)
    n = ids.shape[1]
    empty = {i.name: np.zeros((1, 2, 0, 8), np.float32) for i in sess.get_inputs()
             if i.name.startswith("past_key_values.")}
    first = sess.run(None, {"input_ids": ids[:, :-1], "position_ids": np.arange(n - 1)[None],
                            "attention_mask": np.ones((1, n - 1), np.int64), **empty})
    past = {name.replace("present", "past_key_values"): value for name, value in
            zip([o.name for o in sess.get_outputs()][1:], first[1:])}
    step = sess.run(["logits"], {"input_ids": ids[:, -1:], "position_ids": np.array([[n - 1]]),
                                 "attention_mask": np.ones((1, n), np.int64), **past})[0]
    full = load_causal_lm(root / "onnx").logits(ids)
    assert np.abs(step[0, -1] - full[0, -1]).max() < 1e-4


def test_int8_dynamic_of_a_causal_export(causal):
    root, _ = causal
    record = quantize(root / "onnx", root / "int8")
    assert record["mode"] == "dynamic" and "MatMulInteger" in ops(root / "int8")
    # no size check: on a 0.3 MB model the quantize/dequantize nodes outweigh the saved bytes
    fp32, int8 = logits_on_texts(root / "onnx"), logits_on_texts(root / "int8")
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.99  # measured 0.998
    assert np.abs(fp32 - int8).max() < 0.6  # measured 0.32, logits' std is 1.05


def test_int4_of_a_causal_export(causal):
    root, _ = causal
    record = quantize_int4(root / "onnx", root / "int4")
    # 7 projections in each of 4 layers in 4 bits, and the tied lm_head untied into its own
    # 8-bit weight; the 9 float MatMuls left multiply activations (8 in attention, 1 rotary)
    assert (record["matmuls_quantized"], record["matmuls_total"]) == (29, 38)
    assert record["lm_head"] == "int8"
    assert record["untied"] == ["model.embed_tokens.weight_transposed"]
    assert ops(root / "int4").count("MatMulNBits") == 29
    onnx.checker.check_model(str(onnx_file(root / "int4")))  # a valid model, domains declared
    assert record["size_mb_after"] < record["size_mb_before"]
    assert size_on_disk_mb(root / "int4") < size_on_disk_mb(root / "onnx")
    saved = json.loads((root / "int4" / "quantize_config.json").read_text())
    assert saved["block_size"] == 32 and not saved["symmetric"] and saved["algorithm"] == "rtn"
    assert (root / "int4" / "tokenizer.json").is_file()
    fp32, int4 = logits_on_texts(root / "onnx"), logits_on_texts(root / "int4")
    # 4-bit random (unstructured) weights lose more than trained ones: measured 0.92 and 2.0
    assert np.corrcoef(fp32.ravel(), int4.ravel())[0, 1] > 0.85
    assert np.abs(fp32 - int4).max() < 3.0


@pytest.mark.parametrize("bits, quantized, head", [(32, 28, "float (tied"), (4, 29, "int4")])
def test_int4_lm_head_can_stay_float_or_go_to_4_bits(causal, tmp_path, bits, quantized, head):
    root, _ = causal
    record = quantize_int4(root / "onnx", tmp_path / "int4", lm_head_bits=bits, block_size=16,
                           symmetric=True, accuracy_level=4)
    assert record["matmuls_quantized"] == quantized and record["lm_head"].startswith(head)
    assert record["untied"] == ([] if bits == 32 else ["model.embed_tokens.weight_transposed"])
    assert np.isfinite(logits_on_texts(tmp_path / "int4")).all()


def test_a_float_compute_copy_keeps_the_4_bit_weights_only(causal, tmp_path):
    root, _ = causal
    quantize_int4(root / "onnx", tmp_path / "int4", accuracy_level=4)
    copy = float_compute_copy(tmp_path / "int4", tmp_path / "float")
    nodes = [n for n in onnx.load(str(onnx_file(copy))).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 29 and not any(a.name == "accuracy_level" for n in nodes
                                        for a in n.attribute)
    assert (copy / "tokenizer.json").is_file()
    fp32, int8_act, float_act = (logits_on_texts(f) for f in (root / "onnx", tmp_path / "int4",
                                                              copy))
    assert not np.array_equal(int8_act, float_act)  # the activations were rounded before
    # the weights' rounding is most of the error: the copy is not the fp32 model again
    assert np.abs(float_act - int8_act).max() < np.abs(float_act - fp32).max()
    # weights beside the graph (a genai package): a copy killed before its rename left them;
    # the next copy replaces them instead of appending another model's worth
    outside = tmp_path / "external"
    outside.mkdir()
    onnx.save_model(onnx.load(str(onnx_file(tmp_path / "int4"))), str(outside / "model.onnx"),
                    save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    weights = float_compute_copy(outside, tmp_path / "again") / "model.onnx.data"
    size = weights.stat().st_size
    (tmp_path / "again" / "model.onnx").unlink()
    float_compute_copy(outside, tmp_path / "again")
    assert weights.stat().st_size == size
    # another model written where the source was is copied again, not taken for the kept copy
    changed = onnx.load(str(outside / "model.onnx"))
    changed.graph.node[0].name = "another model"
    onnx.save_model(changed, str(outside / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    again = onnx.load(str(float_compute_copy(outside, tmp_path / "again") / "model.onnx"),
                      load_external_data=False)
    assert again.graph.node[0].name == "another model"
    with pytest.raises(EdgeDistillError, match="no ONNX model to copy"):
        float_compute_copy(tmp_path, tmp_path / "none")


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 48}, "not a power of two"), ({"block_size": 8}, "not a power of two"),
    ({"accuracy_level": 5}, "accuracy_level: 5 is unknown"),
    ({"lm_head_bits": 16}, "lm_head_bits: 16 is unknown"),
    ({"algorithm": "awq"}, "'awq' is unknown; valid: rtn, gptq"),
    ({"algorithm": "gptq"}, "gptq needs calibration texts")])
def test_int4_rejects_bad_settings(causal, tmp_path, kwargs, message):
    root, _ = causal
    with pytest.raises(EdgeDistillError, match=message):
        quantize_int4(root / "onnx", tmp_path / "int4", **kwargs)


def test_int4_refuses_a_quantized_model(causal, tmp_path):
    root, _ = causal
    quantize_int4(root / "onnx", tmp_path / "int4")
    with pytest.raises(EdgeDistillError, match=r"already quantized \(has MatMulNBits\)"):
        quantize_int4(tmp_path / "int4", tmp_path / "again")
    with pytest.raises(EdgeDistillError, match="already quantized"):
        quantize(tmp_path / "int4", tmp_path / "int8")
    with pytest.raises(EdgeDistillError, match="another folder"):
        quantize_int4(root / "onnx", root / "onnx")


def test_greedy_mismatch_is_reported(causal, monkeypatch):
    root, _ = causal
    greedy = OnnxCausalLM.greedy

    def last_token_off_by_one(self, *args, **kwargs):
        out = greedy(self, *args, **kwargs)
        out[-1] = (out[-1] + 1) % self.config["vocab_size"]
        return out

    monkeypatch.setattr(OnnxCausalLM, "greedy", last_token_off_by_one)
    with pytest.raises(EdgeDistillError, match="greedy generation differs from PyTorch at "
                                               "new token 15.*top-2 logit gap"):
        validate_causal_onnx(root / "llama", root / "onnx", 1e-4, make_texts(2)[0])


def test_unsupported_architecture_lists_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"]}')
    with pytest.raises(EdgeDistillError,
                       match=r"cannot export T5.*ForSequenceClassification.*ForCausalLM"):
        export_onnx(tmp_path, tmp_path / "onnx")


def test_cli_quantizes_to_int4(causal, tmp_path, capsys):
    from edgedistill.cli import main

    root, _ = causal
    assert main(["quantize", str(root / "onnx"), str(tmp_path / "q"), "--int4",
                 "--block-size", "16"]) == 0
    assert "MatMulNBits" in ops(tmp_path / "q")
    assert main(["quantize", str(root / "onnx"), str(tmp_path / "r"), "--int4",
                 "--block-size", "24"]) == 2
    assert "not a power of two" in capsys.readouterr().err
