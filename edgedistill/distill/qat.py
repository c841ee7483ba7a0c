"""Quantization-aware distillation: train the student through the int8 arithmetic it will ship in.

onnxruntime's dynamic int8 (what :func:`edgedistill.quantization.quantize` builds by default)
rounds every Linear's weights to int8 once (per output channel, symmetric) and every Linear's
input to uint8 at run time (per tensor, asymmetric, range taken from the tensor itself); the
embedding tables are stored as uint8 too. :func:`attach_fake_quant` makes a PyTorch student
compute exactly that rounding in its forward pass, with torch's fake-quantize operators (their
gradient is the straight-through estimator), so a last phase of distillation can move the
weights to where the rounding hurts least (Jacob et al. 2018; Q8BERT, Zafrir et al. 2019,
and TernaryBERT / BinaryBERT combine it with a teacher). The scheme is read from the same
optimum configuration that quantizes the ONNX model (:func:`int8_scheme`), so the two cannot
drift apart; :func:`fake_quant_matches_onnxruntime` checks the simulation against the real
int8 model.

PyTorch's own QAT flow (``torch.ao.quantization.prepare_qat``) was not used: its observers
estimate activation ranges from training statistics (static quantization), while the int8
model computes each input's range as it runs; and the fake quantization must come off again
before export, so a float model with trained weights is what is saved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..artifacts import onnx_file
from ..errors import EdgeDistillError
from ..runtime.session import open_onnx_session

# Modules the ONNX export leaves out (feature-loss projections, edgedistill.distill.matching)
SKIP_PREFIX = "distill_projections"


@dataclass(frozen=True)
class Int8Scheme:
    """How onnxruntime's dynamic int8 rounds a model; integer ranges as onnxruntime's
    ``get_qmin_qmax_for_qType`` gives them."""

    per_channel: bool = True
    weight_min: int = -127   # int8, symmetric
    weight_max: int = 127
    weight_symmetric: bool = True
    table_min: int = 0       # embedding tables: the activation type (uint8), asymmetric
    table_max: int = 255


def int8_scheme(qconfig) -> Int8Scheme:
    """The scheme of an optimum ``QuantizationConfig`` for dynamic quantization."""
    from onnxruntime.quantization import QuantType

    if qconfig.is_static:
        raise EdgeDistillError("distill.qat_epochs: the fake quantization follows dynamic int8 "
                               "(activation ranges taken at run time); set quantize.mode: dynamic")
    if qconfig.activations_dtype != QuantType.QUInt8:
        raise EdgeDistillError("distill.qat_epochs: dynamic int8 quantizes activations to uint8; "
                               "the profile's 'activations: int8' has no dynamic form to simulate")
    if qconfig.weights_dtype == QuantType.QInt8:
        low, high = (-64, 64) if qconfig.reduce_range else (
            (-127, 127) if qconfig.weights_symmetric else (-128, 127))
    else:
        low, high = (0, 127) if qconfig.reduce_range else (0, 255)
    return Int8Scheme(per_channel=qconfig.per_channel, weight_min=low, weight_max=high,
                      weight_symmetric=qconfig.weights_symmetric)


def _qparams(low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """Scale and zero point as onnxruntime's ``compute_scale_zp``: the range always holds 0;
    a symmetric range is [-absmax, absmax]; a zero range gets scale 1."""
    low, high = low.clamp(max=0), high.clamp(min=0)
    if symmetric:
        absmax = torch.maximum(-low, high)
        low, high = -absmax, absmax
    scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    if symmetric:
        zero = torch.full_like(scale, round((qmin + qmax) / 2))
    else:
        zero = torch.round(qmin - low / scale).clamp(qmin, qmax)
    return scale.float(), zero.to(torch.int32)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """What ``DynamicQuantizeLinear`` does to a Linear's input: uint8 over the tensor's own
    range (the range itself gets no gradient, as in the integer model). The range is taken per
    row of the batch: the int8 model is served one text at a time, so each text's range is
    its own, never that of the other texts a training batch puts beside it."""
    rows = x.detach().reshape(x.shape[0], -1)
    scale, zero = _qparams(rows.amin(1), rows.amax(1), 0, 255, False)
    return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, 0, 255)


class _FakeQuantWeight(nn.Module):
    """A Linear weight (out x in) rounded as onnxruntime rounds the MatMul weight (in x out).

    ``shared`` lists the Linears whose weights onnxruntime fuses into one matrix with this one
    (query, key and value in a fused Attention): per tensor, they share one range."""

    def __init__(self, scheme: Int8Scheme, shared: tuple[nn.Linear, ...] = ()):
        super().__init__()
        self.scheme = scheme
        self._shared = shared  # a tuple, so that the modules are not registered as children

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        d = w.detach()
        if s.per_channel:  # one scale per output feature, the MatMul weight's columns
            scale, zero = _qparams(d.amin(1), d.amax(1), s.weight_min, s.weight_max,
                                   s.weight_symmetric)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, s.weight_min,
                                                          s.weight_max)
        group = [d] + [_float_weight(m).detach() for m in self._shared]
        low = torch.stack([g.min() for g in group]).min()
        high = torch.stack([g.max() for g in group]).max()
        scale, zero = _qparams(low, high, s.weight_min, s.weight_max, s.weight_symmetric)
        return torch.fake_quantize_per_tensor_affine(w, scale, zero, s.weight_min, s.weight_max)


def _float_weight(linear: nn.Linear) -> torch.Tensor:
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


# Names of the query, key and value projections that onnxruntime's transformer optimizer
# fuses into one Attention (BERT / RoBERTa / MiniLM, DistilBERT, most others)
_FUSED_QKV = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
              ("q_proj", "k_proj", "v_proj"))


def _fused_siblings(model: nn.Module) -> dict[int, tuple[nn.Linear, ...]]:
    """For each fused projection (by id), the other two of its attention."""
    out = {}
    for parent in model.modules():
        for names in _FUSED_QKV:
            group = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, nn.Linear) for m in group):
                for m in group:
                    out[id(m)] = tuple(x for x in group if x is not m)
    return out


class _FakeQuantTable(nn.Module):
    """An embedding table as onnxruntime's quantized Gather stores it: uint8, one range."""

    def __init__(self, scheme: Int8Scheme):
        super().__init__()
        self.scheme = scheme

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        scale, zero = _qparams(table.detach().min(), table.detach().max(), s.table_min,
                               s.table_max, False)
        return torch.fake_quantize_per_tensor_affine(table, scale, zero, s.table_min,
                                                     s.table_max)


def _targets(model: nn.Module):
    for name, module in model.named_modules():
        if not name.startswith(SKIP_PREFIX) and isinstance(module, (nn.Linear, nn.Embedding)):
            yield name, module


def attach_fake_quant(model: nn.Module, scheme: Int8Scheme) -> int:
    """Round every Linear's weights and inputs and every embedding table of ``model`` as the
    int8 model will; returns how many modules were changed. Undo with
    :func:`remove_fake_quant` (the float weights are kept throughout)."""
    if is_fake_quantized(model):
        raise EdgeDistillError("the model is already fake-quantized")
    count, siblings = 0, _fused_siblings(model)
    for _, module in _targets(model):
        if isinstance(module, nn.Linear):
            parametrize.register_parametrization(
                module, "weight", _FakeQuantWeight(scheme, siblings.get(id(module), ())))
            module._edgedistill_qat_hook = module.register_forward_pre_hook(
                lambda _, args: (fake_quant_activation(args[0]), *args[1:]))
        else:
            parametrize.register_parametrization(module, "weight", _FakeQuantTable(scheme))
        count += 1
    model.config.edgedistill_qat = asdict(scheme)
    return count


def is_fake_quantized(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for _, m in _targets(model))


def remove_fake_quant(model: nn.Module) -> None:
    """Back to a plain float model (its trained float weights), ready to save and export."""
    for _, module in _targets(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        hook = getattr(module, "_edgedistill_qat_hook", None)
        if hook is not None:
            hook.remove()
            del module._edgedistill_qat_hook


def fake_quant_matches_onnxruntime(model_dir, int8_dir, texts: list[str], scheme: Int8Scheme,
                                   max_length: int = 128) -> dict:
    """How closely the fake-quantized PyTorch model computes what the onnxruntime int8 model
    computes, next to the float model: largest |logit difference| and the share of texts with
    the same predicted class, over ``texts`` one at a time (as the int8 model is served)."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    session = open_onnx_session(onnx_file(int8_dir))
    names = {i.name for i in session.get_inputs()}
    encoded = [tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt")
               for t in texts]
    fp32, fake, ort = [], [], []
    with torch.no_grad():
        for enc in encoded:
            ort.append(session.run(None, {k: v.numpy() for k, v in enc.items() if k in names})[0][0])
            fp32.append(model(**enc).logits[0].numpy())
        attach_fake_quant(model, scheme)
        for enc in encoded:
            fake.append(model(**enc).logits[0].numpy())
    fp32, fake, ort = (np.stack(a) for a in (fp32, fake, ort))
    same = lambda a: float(np.mean(a.argmax(-1) == ort.argmax(-1)))  # noqa: E731
    return {"texts": len(texts),
            "fake_quant_max_abs_diff": float(np.abs(fake - ort).max()),
            "fp32_max_abs_diff": float(np.abs(fp32 - ort).max()),
            "fake_quant_agreement": same(fake), "fp32_agreement": same(fp32)}
