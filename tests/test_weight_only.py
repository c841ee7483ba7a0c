"""Weight-only quantization with Intel Neural Compressor (quantization/weight_only.py).

Each algorithm runs once per module on a tiny random Llama (4 layers of 32, grouped-query
attention, tied embeddings) and the tests read what it wrote. Errors are the relative
Frobenius norm of the logits' difference from fp32 on random token ids. Measured here over 3
model seeds (groups of 16, 6 calibration texts), 4 bits: RTN 0.056-0.059, GPTQ 0.038-0.054,
AWQ 0.050-0.061; 8 bits: 0.002-0.004. The bound 0.15 leaves 2.5x for other seeds and torch
builds and still fails a model whose rounding went wrong: INC's asymmetric 8-bit codes, which
its CPU module unpacks through int8, gave 0.53 (hence symmetric 8 bits, see weight_only.py).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from edgedistill.errors import EdgeDistillError
from edgedistill.quantization import weight_only as W
from edgedistill.quantization.weight_only import load_weight_only, quantize_weight_only

from .conftest import WORDS, make_llama, make_llm_tokenizer

GROUP = 16  # the tiny model's rows have 32 or 64 inputs: 2 or 4 groups each
BOUND_4BIT = 0.15
# 4 decoder layers x (q, k, v, o, gate, up, down); the tied lm_head stays float
TARGETED = 4 * 7


def texts(n: int, seed: int, words: tuple[int, int] = (8, 24)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def rel_error(model, reference, ids) -> float:
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weight_only") / "llama"
    make_llama().save_pretrained(folder)
    make_llm_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp32_model(fp32_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fp32_dir).eval()


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(4, len(WORDS) + 4, (3, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantized(fp32_dir):
    """Each algorithm at 4 and 8 bits, quantized once: {(algorithm, bits): (folder, record)}."""
    calibration = texts(6, seed=0)
    out = {}
    for algorithm in W.ALGORITHMS:
        for bits in (4, 8):
            folder = fp32_dir.parent / f"{algorithm}-{bits}"
            record = quantize_weight_only(fp32_dir, folder, algorithm, bits=bits,
                                          group_size=GROUP, calibration_texts=calibration)
            out[algorithm, bits] = folder, record
    return out


@pytest.mark.parametrize("algorithm", W.ALGORITHMS)
def test_writes_a_model_that_loads_back_close_to_fp32(algorithm, quantized, fp32_model,
                                                      eval_ids):
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    folder, record = quantized[algorithm, 4]
    assert record == {"backend": "neural-compressor", "algorithm": algorithm, "bits": 4,
                      "group_size": GROUP, "quantized_layers": TARGETED,
                      "size_mb": record["size_mb"], "seconds": record["seconds"],
                      "calibration_texts": 0 if algorithm == "rtn" else 6}
    model = load_weight_only(folder)
    packed = [m for m in model.modules() if isinstance(m, INCWeightOnlyLinear)]
    assert len(packed) == TARGETED and all(m.bits == 4 and m.group_size == GROUP for m in packed)
    # the head is float and still the embedding matrix (no extra copy was stored)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    error = rel_error(model, fp32_model, eval_ids)
    assert 0.01 < error < BOUND_4BIT, error  # close, and not the fp32 model itself
    generated = model.generate(eval_ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, eval_ids.shape[1] + 4)

    settings = json.loads((folder / W.SETTINGS_FILE).read_text())
    assert settings["quantized_layers"] == TARGETED and settings["linear_layers"] == TARGETED + 1
    assert settings["kept_float"] == ["lm_head"] and settings["symmetric"] is False
    assert settings["neural_compressor"] == __import__("neural_compressor").__version__
    assert settings["size_mb"] == record["size_mb"] < settings["size_mb_before"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= \
        {p.name for p in folder.iterdir()}
    assert not folder.with_name(folder.name + ".partial").exists()


@pytest.mark.parametrize("algorithm", W.ALGORITHMS)
def test_eight_bits_are_closer_to_fp32_than_four(algorithm, quantized, fp32_model, eval_ids):
    errors = {bits: rel_error(load_weight_only(quantized[algorithm, bits][0]), fp32_model,
                              eval_ids) for bits in (4, 8)}
    # measured 12-20x closer; each bit halves the rounding step, 4 bits -> 16x
    assert 0 < errors[8] < errors[4] / 4, errors
    assert quantized[algorithm, 8][1]["size_mb"] > quantized[algorithm, 4][1]["size_mb"]


def test_gptq_calibrates_on_exactly_the_texts_it_is_given(fp32_dir, tmp_path, monkeypatch):
    from neural_compressor.torch.algorithms.weight_only import gptq

    seen = []
    original = gptq.RAWGPTQuantizer.remove_prepare_for_calibration

    def spy(self):  # INC's hook has stored the first decoder layer's input of every call
        seen.append([tuple(h.shape) for h in self.cache_positional_arguments[0]])
        return original(self)

    monkeypatch.setattr(gptq.RAWGPTQuantizer, "remove_prepare_for_calibration", spy)
    a, b = texts(5, seed=1), texts(5, seed=2)
    record = quantize_weight_only(fp32_dir, tmp_path / "a", "gptq", group_size=GROUP,
                                  calibration_texts=a, calibration_samples=3, max_length=10)
    # the first 3 texts, each truncated to 10 tokens (all have 8 to 24 words)
    lengths = [min(10, len(t.split())) for t in a[:3]]
    assert seen == [[(1, n, 32) for n in lengths]]
    assert record["calibration_texts"] == 3
    assert json.loads((tmp_path / "a" / W.SETTINGS_FILE).read_text())["calibration_tokens"] \
        == sum(lengths)

    quantize_weight_only(fp32_dir, tmp_path / "a2", "gptq", group_size=GROUP,
                         calibration_texts=a, calibration_samples=3, max_length=10)
    quantize_weight_only(fp32_dir, tmp_path / "b", "gptq", group_size=GROUP,
                         calibration_texts=b, calibration_samples=3, max_length=10)
    weights = {name: load_weight_only(tmp_path / name).state_dict() for name in ("a", "a2", "b")}
    packed = [k for k in weights["a"] if k.endswith(".qweight")]
    assert len(packed) == TARGETED
    # same texts, same rounding; other texts move some weights to the other grid point
    assert all(torch.equal(weights["a"][k], weights["a2"][k]) for k in packed)
    assert any(not torch.equal(weights["a"][k], weights["b"][k]) for k in packed)


def test_awq_folds_its_scales_into_the_layers_before(quantized, fp32_model):
    from neural_compressor.torch.algorithms.weight_only.modules import MulLinear

    # grouped-query attention: v_proj (16 outputs) cannot take o_proj's (32 inputs) scale
    assert W._awq_absorb(fp32_model, 4) == {
        "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.up_proj": ("mlp.down_proj",), "self_attn.o_proj": ("self_attn.o_proj",)}
    model = load_weight_only(quantized["awq", 4][0])
    assert [n for n, m in model.named_modules() if isinstance(m, MulLinear)] == \
        [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    # 8 bits run without INC's clip search, which would leave a multiplied o_proj in float:
    # o_proj is rounded to nearest instead, and every targeted layer is still packed
    assert "self_attn.o_proj" not in W._awq_absorb(fp32_model, 8)
    eight = load_weight_only(quantized["awq", 8][0])
    assert not any(isinstance(m, MulLinear) for m in eight.modules())
    # the norms now carry AWQ's input scales (all ones in the random fp32 model)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, fp32_model.model.layers[0].input_layernorm.weight)


def test_rtn_needs_no_texts(fp32_dir, tmp_path):
    record = quantize_weight_only(fp32_dir, tmp_path / "rtn", calibration_texts=texts(3, 0))
    assert record["calibration_texts"] == 0 and record["group_size"] == 32


@pytest.mark.parametrize("kwargs, message", [
    ({"algorithm": "gptqq"}, "'gptqq' is unknown (did you mean 'gptq'?); valid: rtn, gptq, awq"),
    ({"algorithm": "smoothquant"}, "valid: rtn, gptq, awq"),
    ({"bits": 3}, "bits: 3 is not supported; valid: 4, 8"),
    ({"bits": True}, "bits: True is not supported"),
    ({"bits": 4.0}, "bits: 4.0 is not supported"),
    ({"group_size": 24}, "group_size: 24 is not a power of two >= 16 or -1"),
    ({"group_size": 8}, "group_size: 8 is not a power of two >= 16"),
    ({"group_size": -2}, "group_size: -2 is not"),
    ({"max_length": 0}, "max_length: 0 must be a whole number > 0"),
    ({"algorithm": "gptq"}, "weight-only gptq: no calibration texts"),
    ({"algorithm": "awq", "calibration_texts": ["", "  "]}, "weight-only awq: no calibration"),
])
def test_bad_settings_fail_in_one_line(kwargs, message, fp32_dir, tmp_path):
    with pytest.raises(EdgeDistillError) as info:
        quantize_weight_only(fp32_dir, tmp_path / "out", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_causal_lm_fails_in_one_line(tiny_teacher_dir, tmp_path):
    with pytest.raises(EdgeDistillError, match="BertForSequenceClassification, not a causal "
                                               "language model") as info:
        quantize_weight_only(tiny_teacher_dir, tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(EdgeDistillError, match="no config.json"):
        quantize_weight_only(tmp_path, tmp_path / "out")
    with pytest.raises(EdgeDistillError, match="not a weight-only model"):
        load_weight_only(tiny_teacher_dir)


def test_refuses_to_write_over_its_source(fp32_dir):
    with pytest.raises(EdgeDistillError, match="outside"):
        quantize_weight_only(fp32_dir, fp32_dir)
    with pytest.raises(EdgeDistillError, match="outside"):
        quantize_weight_only(fp32_dir, fp32_dir.parent)


def test_a_failure_during_quantization_leaves_no_out_dir(fp32_dir, tmp_path, monkeypatch):
    import neural_compressor.torch.quantization as inc

    def broken(model, *args, **kwargs):
        raise RuntimeError("killed mid-quantization")

    monkeypatch.setattr(inc, "convert", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        quantize_weight_only(fp32_dir, out, "gptq", calibration_texts=texts(2, 0))
    assert list(tmp_path.iterdir()) == []


def test_layers_inc_left_float_fail_the_run(fp32_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_quantized_layers", lambda model: ["model.layers.0.mlp.up_proj"])
    with pytest.raises(RuntimeError, match="quantized 1 of the 28 Linear layers"):
        quantize_weight_only(fp32_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_keeps_the_previous_model(fp32_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    quantize_weight_only(fp32_dir, out, bits=8)
    before = (out / W.SETTINGS_FILE).read_text()

    def broken(folder, settings):
        raise OSError("disk full")

    monkeypatch.setattr(W, "_write_settings", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize_weight_only(fp32_dir, out, bits=4)
    # the model files were written into out.partial, which is gone; out is the 8-bit run
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / W.SETTINGS_FILE).read_text() == before
