"""Read the features that matches compare out of one forward pass of a model.

Hidden states and attention maps come from transformers' own ``output_hidden_states`` /
``output_attentions``. Queries, keys and values are not returned by any transformers model, so
forward hooks on the attention projections of the needed blocks capture them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import EdgeDistillError
from .student import find_blocks

# Names of the query/key/value projections across architectures (BERT and most encoders;
# Llama / Qwen / Mistral and most decoders; DistilBERT).
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


def _qkv_modules(block: nn.Module) -> list[nn.Module]:
    modules = dict(block.named_modules())
    for names in QKV_NAMES:
        found = [next((m for n, m in modules.items() if n.split(".")[-1] == name), None)
                 for name in names]
        if all(found):
            return found
    raise EdgeDistillError(
        f"{type(block).__name__}: cannot find its query/key/value projections (looked for "
        f"{', '.join('/'.join(n) for n in QKV_NAMES)}); minilm_relation cannot be used with it")


@contextmanager
def _capture_qkv(model: nn.Module, layers: set[int]):
    """Yield ``{layer: [queries, keys, values]}``, filled during a forward pass."""
    captured: dict[int, list] = {layer: [None, None, None] for layer in layers}
    handles = []
    if layers:
        blocks = find_blocks(model)[2]
        for layer in layers:
            for slot, module in enumerate(_qkv_modules(blocks[layer - 1])):
                def hook(_module, _inputs, output, layer=layer, slot=slot):
                    captured[layer][slot] = output
                handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _pool(hidden: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def forward_with_features(model: nn.Module, inputs: dict, wanted: set[tuple[str, int]],
                          base_model: nn.Module | None = None):
    """Run ``model(**inputs)`` and return ``(outputs, {(feature, layer): tensor})``.

    ``base_model`` is the unwrapped model (under DDP the hooks go on its modules).
    """
    features = {f for f, _ in wanted}
    hidden = bool(features & {"hidden", "pooled", "cls"})
    qkv_layers = {layer for f, layer in wanted if f == "qkv"}
    with _capture_qkv(base_model or model, qkv_layers) as qkv:
        outputs = model(**inputs, output_hidden_states=hidden,
                        output_attentions="attention" in features)
    if "attention" in features and not outputs.attentions:
        raise EdgeDistillError(f"{type(base_model or model).__name__} returned no attention "
                               "maps; load it with attn_implementation='eager'")
    mask = inputs.get("attention_mask")
    found = {}
    for feature, layer in wanted:
        if feature == "qkv":
            found[feature, layer] = tuple(qkv[layer])
        elif feature == "attention":
            found[feature, layer] = outputs.attentions[layer - 1]
        elif feature == "cls":
            found[feature, layer] = outputs.hidden_states[layer][:, 0]
        elif feature == "pooled":
            found[feature, layer] = _pool(outputs.hidden_states[layer], mask)
        else:
            found[feature, layer] = outputs.hidden_states[layer]
    return outputs, found
