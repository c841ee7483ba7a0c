"""Quantization-aware distillation: the fake quantization computes what onnxruntime's int8
model computes, comes off cleanly, trains, and runs as a recipe's last distillation phase."""

import json

import pytest
import torch
from safetensors.torch import load_file

from edgedistill.cli import main
from edgedistill.distill.qat import (attach_fake_quant, fake_quant_matches_onnxruntime,
                                     int8_scheme, is_fake_quantized, remove_fake_quant)
from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx
from edgedistill.host import host_isa
from edgedistill.quantization import int8_config, quantize
from edgedistill.recipe_blocks import QuantizeConfig
from tests.conftest import make_bert, make_texts, make_tokenizer

# onnxruntime's int8 products are the exact integer math only where the CPU has VNNI
# (vpdpbusd); an AVX2-only x86 CPU takes them through 16-bit pair sums that saturate, so no
# simulation of the integer math can match it there (measured on an AMD EPYC without AVX-512:
# the fake-quantized logits 0.83 from onnxruntime's at most, the float ones 0.76)
EXACT_INT8 = host_isa() == "avx512_vnni"
needs_exact_int8 = pytest.mark.skipif(not EXACT_INT8, reason="this CPU's int8 kernels saturate "
                                      "(no VNNI): onnxruntime's int8 is not exact integer math")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    model = make_bert(num_layers=2, seed=3)
    # wider weights than the initialisation gives, so that rounding shows in the logits
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    model.save_pretrained(d / "model")
    make_tokenizer(d / "model")
    export_onnx(d / "model", d / "onnx")
    return d


@needs_exact_int8
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quantization_computes_what_the_int8_model_computes(exported, per_channel):
    out = exported / f"int8-{per_channel}"
    quantize(exported / "onnx", out, per_channel=per_channel)
    scheme = int8_scheme(int8_config(QuantizeConfig(per_channel=per_channel))[0])
    texts, _ = make_texts(24)
    check = fake_quant_matches_onnxruntime(exported / "model", out, texts, scheme, 32)
    assert check["fp32_max_abs_diff"] > 1e-3  # the rounding is visible in float
    if per_channel:
        # the same integers as onnxruntime's: only float summation order differs
        assert check["fake_quant_max_abs_diff"] < 1e-3 * check["fp32_max_abs_diff"]
    else:
        # per tensor, the fused QAttention shares one weight range over query, key and value;
        # the simulation keeps one range per projection, so it is closer, not exact
        assert check["fake_quant_max_abs_diff"] < 0.5 * check["fp32_max_abs_diff"]


@pytest.mark.parametrize("per_channel", [True, False])
def test_with_7_bit_weights_fake_quantization_is_exact_on_every_cpu(exported, per_channel):
    # mobile-arm64's reduce_range: pair sums of 7-bit weights never saturate 16 bits, so an
    # AVX2 CPU too computes the exact integer products (measured here on AVX2: 0.0011 and
    # 0.0020 from onnxruntime's logits, against 0.72 and 0.59 for the float model)
    out = exported / f"int8-7bit-{per_channel}"
    config = QuantizeConfig(per_channel=per_channel)
    quantize(exported / "onnx", out, config, "mobile-arm64")
    qconfig = int8_config(config, "mobile-arm64")[0]
    assert qconfig.reduce_range
    texts, _ = make_texts(24)
    check = fake_quant_matches_onnxruntime(exported / "model", out, texts, int8_scheme(qconfig),
                                           32)
    assert check["fake_quant_max_abs_diff"] < 0.01 * check["fp32_max_abs_diff"]
    assert check["fake_quant_agreement"] == 1.0


def test_fake_quantization_comes_off_without_a_trace_and_trains():
    model = make_bert(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = int8_scheme(int8_config()[0])
    n = attach_fake_quant(model, scheme)
    assert n == sum(isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                    for m in model.modules())
    assert is_fake_quantized(model)
    with pytest.raises(EdgeDistillError, match="already fake-quantized"):
        attach_fake_quant(model, scheme)
    ids = torch.randint(5, model.config.vocab_size, (4, 12))
    rounded = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(rounded, torch.tensor([0, 1, 2, 0]))
    loss.backward()  # straight-through: gradients reach the float weights
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.parametrizations.weight.original.grad.abs().sum() > 0
    remove_fake_quant(model)
    assert not is_fake_quantized(model)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.allclose(model(input_ids=ids).logits, rounded)  # float again


def test_a_text_is_rounded_by_its_own_range_whatever_its_batch():
    from edgedistill.distill.qat import fake_quant_activation
    small, large = torch.randn(1, 7, 16), 50 * torch.randn(1, 7, 16)
    alone = fake_quant_activation(small)
    assert not torch.equal(alone, small)  # rounded
    # beside a text with a 50x range, a batch-wide range would round it far more coarsely
    assert torch.equal(fake_quant_activation(torch.cat([small, large]))[:1], alone)


def test_the_scheme_follows_the_quantization_settings():
    avx2 = int8_scheme(int8_config(QuantizeConfig(preset="avx2"))[0])  # optimum's avx2 preset: uint8 weights
    assert (avx2.weight_min, avx2.weight_max) == (0, 255)
    qconfig = int8_config(QuantizeConfig(preset="avx512_vnni"))[0]  # int8 weights
    qconfig.reduce_range = True  # a profile's 'reduce_range: true'
    assert (int8_scheme(qconfig).weight_min, int8_scheme(qconfig).weight_max) == (-64, 64)
    assert int8_scheme(int8_config(QuantizeConfig(per_channel=False))[0]).per_channel is False
    with pytest.raises(EdgeDistillError, match="set quantize.mode: dynamic"):
        int8_scheme(int8_config(QuantizeConfig(mode="static"))[0])


# --------------------------------------------------------------------------- in a recipe

@pytest.fixture
def recipe(tmp_path, tiny_teacher_dir):
    from tests.conftest import write_tsv
    from tests.test_pipeline import RECIPE
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(data=write_tsv(tmp_path / "data", 80, 30),
                                  teacher=tiny_teacher_dir))
    return path


def test_a_recipe_with_an_int8_aware_phase(recipe, tmp_path):
    out = tmp_path / "out"
    sets = ["--set", "distill.qat_epochs=1", "--set", "distill.matches=[]",
            "--set", "bench.rounds=1", "--set", "bench.real_length_samples=0"]
    assert main(["run", str(recipe), "--output", str(out), *sets]) == 0
    qat = json.loads((out / "distill" / "manifest.json").read_text())["record"]["qat"]
    assert qat["modules"] > 0 and qat["learning_rate"] == pytest.approx(1e-4)
    assert 0 <= qat["validation"]["macro_f1"] <= 1
    assert qat["kept"] == (qat["validation"]["macro_f1"] > qat["before"]["macro_f1"])
    # the saved student is a plain float model: no parametrization keys, nothing left over
    keys = load_file(out / "distill" / "model" / "model.safetensors")
    assert not any("parametrizations" in k for k in keys)
    assert not (out / "distill" / "qat").exists()
    check = json.loads((out / "quantize" / "manifest.json").read_text())["record"]["qat_check"]
    if EXACT_INT8:  # see needs_exact_int8
        assert check["fake_quant_max_abs_diff"] < check["fp32_max_abs_diff"]
    assert "int8-aware phase: 1 epochs" in (out / "report.md").read_text()


def test_a_killed_int8_aware_phase_resumes_after_the_float_phase(recipe, tmp_path, monkeypatch):
    import edgedistill.distill.training as training
    out = tmp_path / "out"
    sets = ["--set", "distill.qat_epochs=1", "--set", "distill.matches=[]"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real_phase = training._quantization_aware
    monkeypatch.setattr(training, "_quantization_aware", killed)
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 130
    assert (out / "distill.partial" / "distilled.json").is_file()
    # only this patch goes (undo() would also drop the suite's own, e.g. the logits cache's)
    monkeypatch.setattr(training, "_quantization_aware", real_phase)
    calls = []
    real_fit = training._fit
    monkeypatch.setattr(training, "_fit", lambda *a, **k: calls.append(a[3]) or real_fit(*a, **k))
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 0
    assert [p.name for p in calls] == ["qat"]  # the float phase was not run again
    assert "qat" in json.loads((out / "distill" / "manifest.json").read_text())["record"]


def test_an_int8_aware_phase_that_does_not_beat_the_float_model_is_not_shipped(
        recipe, tmp_path, monkeypatch):
    import edgedistill.distill.training as training
    out = tmp_path / "out"
    saved = {}
    real_fit = training._fit

    def fit(model, *args, **kwargs):
        record = real_fit(model, *args, **kwargs)
        if args[2].name == "distill.partial":  # the float phase: remember what it saved
            saved.update(load_file(args[2] / "model" / "model.safetensors"))
        else:  # the int8-aware phase: wreck its weights and score it below anything
            for p in model.parameters():
                p.data.add_(torch.randn_like(p) * 10)
            record["validation"]["macro_f1"] = -1.0
        return record

    monkeypatch.setattr(training, "_fit", fit)
    assert main(["distill", str(recipe), "--output", str(out),
                 "--set", "distill.qat_epochs=1", "--set", "distill.matches=[]"]) == 0
    qat = json.loads((out / "distill" / "manifest.json").read_text())["record"]["qat"]
    assert qat["kept"] is False and qat["before"]["macro_f1"] >= 0
    shipped = load_file(out / "distill" / "model" / "model.safetensors")
    assert shipped.keys() == saved.keys()
    assert all(torch.equal(shipped[k], saved[k]) for k in saved)


@pytest.mark.parametrize("setting, message", [
    ("quantize.tolerable_loss=0.01", "accuracy-aware tuning may ship another"),
    ("quantize.mode=static", "set quantize.mode: dynamic"),
    ("distill.qat_epochs=-1", "distill.qat_epochs: -1.0 must be >= 0"),
])
def test_settings_the_int8_aware_phase_cannot_serve_are_refused(recipe, tmp_path, capsys,
                                                                 setting, message):
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--set",
                 "distill.qat_epochs=1", "--set", setting]) == 2
    assert message in capsys.readouterr().err
