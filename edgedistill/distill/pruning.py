"""Width-pruned students: narrow a model's attention heads, MLP neurons and embedding channels
to a smaller shape, keeping those most active on real text, as Minitron does (Muralidharan et
al. 2024, "Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679).

Importance is measured, not read off the weights: a few hundred training texts run through the
model, and a head scores the L2 norm of its output, an MLP neuron and an embedding channel the
magnitude of their activation (the channel's over every LayerNorm output, where the residual
stream is normalised), summed over the real tokens. The lowest-scoring ones go.

The slicing is done by libraries: transformers' ``prune_heads`` removes heads (and keeps each
attention module's sizes consistent), torch-pruning's dependency graph finds every layer that
reads or writes a pruned neuron or channel (embeddings, every LayerNorm, every projection, the
pooler). The narrowed weights are then loaded into a model built from the smaller config, so the
student is a plain model of its architecture that ``from_pretrained``, the ONNX exporter and the
graph fusions read like any other.

Encoders whose module layout ``LAYOUTS`` knows (BERT and MPNet): the hooks name their modules.
MPNet's relative position bias is one table shared by every layer, one column per head, so an
MPNet student keeps the same heads in every layer (ranked by their summed importance) and the
table keeps their columns.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch_pruning as tp
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import EdgeDistillError


@dataclass(frozen=True)
class Layout:
    """Where a model type keeps what pruning scores, relative to one encoder layer: the
    attention's output projection (its input holds the heads side by side) and the LayerNorm
    after attention; the MLP (``intermediate``, output after the activation), the LayerNorm
    after it (``output.LayerNorm``) and the embeddings' LayerNorm have the same names in both."""

    attention_out: str
    attention_norm: str
    # a table with one column per head that every layer reads (MPNet's relative position
    # bias), under the base model: its heads must be the same in every layer
    head_table: str | None = None


LAYOUTS = {"bert": Layout("attention.output.dense", "attention.output.LayerNorm"),
           "mpnet": Layout("attention.attn.o", "attention.LayerNorm",
                           head_table="encoder.relative_attention_bias")}
PRUNABLE = tuple(LAYOUTS)  # model types whose module layout the hooks below know
# hidden-to-hidden projections outside the residual stream (BERT's and MPNet's pooler, MPNet's
# classification head): their outputs are kept by a ranking of their own, of the activation
# after the tanh that follows each of them
SIDE_PROJECTIONS = ("base_model.pooler.dense", "classifier.dense")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads")


def pruned_shape(config: PretrainedConfig, overrides: dict, where: str = "student.config") -> dict:
    """The shape a pruned student of ``config`` gets from ``overrides`` (hidden_size,
    intermediate_size; num_attention_heads follows from hidden_size, since whole heads of the
    teacher's width are kept). Refuses what pruning cannot make."""
    if config.model_type not in PRUNABLE:
        raise EdgeDistillError(f"student.init: pruned supports {', '.join(PRUNABLE)} models; the "
                               f"teacher is {config.model_type}: use student.init: teacher or "
                               "random")
    if getattr(config, "pruned_heads", None):  # head positions no longer match their numbers
        raise EdgeDistillError("student.init: pruned needs a teacher without pruned heads; its "
                               "config lists pruned_heads: use student.init: teacher or random")
    unknown = [k for k in overrides if k not in SHAPE_KEYS]
    if unknown:
        raise EdgeDistillError(f"{where}.{unknown[0]}: pruning sets only {', '.join(SHAPE_KEYS)}")
    head_dim = config.hidden_size // config.num_attention_heads
    hidden = overrides.get("hidden_size", config.hidden_size)
    shape = {"hidden_size": hidden,
             "intermediate_size": overrides.get("intermediate_size", config.intermediate_size),
             "num_attention_heads": hidden // head_dim}
    for key, value in shape.items():
        teacher = getattr(config, key)
        if not isinstance(value, int) or not 1 <= value <= teacher:
            raise EdgeDistillError(f"{where}.{key}: {value} must be a whole number from 1 to the "
                                   f"teacher's {teacher}")
    if hidden % head_dim:
        raise EdgeDistillError(f"{where}.hidden_size: {hidden} is not a whole number of the "
                               f"teacher's {head_dim}-wide heads; use a multiple of {head_dim}")
    asked = overrides.get("num_attention_heads")
    if asked is not None and asked != shape["num_attention_heads"]:
        raise EdgeDistillError(f"{where}.num_attention_heads: {asked} heads of the teacher's "
                               f"{head_dim} dims make {asked * head_dim}, not hidden_size "
                               f"{hidden}; leave it out (it follows from hidden_size)")
    return shape


@dataclass
class Importance:
    """Activation scores: per layer per head, per layer per MLP neuron, per embedding channel,
    per output of each side projection (by its name in the model)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    channels: torch.Tensor
    side: dict[str, torch.Tensor]


def _side_projections(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    found = {}
    for name in SIDE_PROJECTIONS:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # this model has no such module
            continue
        if isinstance(module, torch.nn.Linear) and module.out_features == model.config.hidden_size:
            found[name] = module
    return found


@torch.no_grad()
def activation_importance(model: PreTrainedModel, batches: list[dict]) -> Importance:
    """Score heads, neurons and channels of ``model`` (a model type of ``LAYOUTS``) on
    tokenized ``batches`` (input_ids and attention_mask)."""
    layout = LAYOUTS[model.config.model_type]
    base = model.base_model
    layers = base.encoder.layer
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    attention_out = [layer.get_submodule(layout.attention_out) for layer in layers]
    side = _side_projections(model)
    scores = Importance(
        heads=[torch.zeros(out.in_features // head_dim) for out in attention_out],
        neurons=[torch.zeros(layer.intermediate.dense.out_features) for layer in layers],
        channels=torch.zeros(model.config.hidden_size),
        side={name: torch.zeros(module.out_features) for name, module in side.items()})
    mask: list[torch.Tensor] = []  # the running batch's real tokens, [batch, tokens, 1]

    def heads_of(i):  # the output projection's input: the heads' outputs side by side
        def hook(module, args):
            per_head = args[0].unflatten(-1, (-1, head_dim)).norm(dim=-1)
            scores.heads[i] += (per_head * mask[0]).sum(dim=(0, 1))
        return hook

    def add_to(target: torch.Tensor):
        def hook(module, args, output):
            target.add_((output.abs() * mask[0]).sum(dim=(0, 1)))
        return hook

    def add_per_text(target: torch.Tensor):  # one vector per text: its "mask" is the batch
        def hook(module, args, output):
            target.add_(output.tanh().abs().flatten(0, -2).sum(dim=0))
        return hook

    hooks = [base.embeddings.LayerNorm.register_forward_hook(add_to(scores.channels))]
    for i, layer in enumerate(layers):
        hooks += [attention_out[i].register_forward_pre_hook(heads_of(i)),
                  layer.intermediate.register_forward_hook(add_to(scores.neurons[i])),
                  layer.get_submodule(layout.attention_norm).register_forward_hook(
                      add_to(scores.channels)),
                  layer.output.LayerNorm.register_forward_hook(add_to(scores.channels))]
    hooks += [module.register_forward_hook(add_per_text(scores.side[name]))
              for name, module in side.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].unsqueeze(-1).to(torch.float32)]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return scores


def _lowest(score: torch.Tensor, keep: int) -> list[int]:
    """Indices of all but the ``keep`` highest scores (ties: the later index goes)."""
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    return sorted(order[keep:])


def _heads_to_drop(score: Importance, keep: int, shared: bool) -> dict[int, list[int]]:
    """Per layer, the heads pruning removes. Shared heads (one position bias for every layer)
    are ranked by their importance summed over the layers, each layer's scores first divided by
    their total so that every layer has an equal say, whatever its activations' scale."""
    if not shared:
        return {i: _lowest(h, keep) for i, h in enumerate(score.heads)}
    total = sum(h / h.sum().clamp_min(1e-12) for h in score.heads)
    drop = _lowest(total, keep)
    return {i: drop for i in range(len(score.heads))}


def prune_width(model: PreTrainedModel, batches: list[dict], **overrides) -> PreTrainedModel:
    """A copy of ``model`` narrowed to the shape ``overrides`` asks for (see
    :func:`pruned_shape`), keeping the heads, neurons and channels most active on ``batches``;
    ``model`` is left untouched."""
    shape = pruned_shape(model.config, overrides)
    hidden_size, intermediate_size = shape["hidden_size"], shape["intermediate_size"]
    if not batches:
        raise EdgeDistillError("student.init: pruned needs training texts to rank what it keeps; "
                               "pass make_student(..., inputs=[tokenized batches])")
    layout = LAYOUTS[model.config.model_type]
    score = activation_importance(model, batches)
    narrow = copy.deepcopy(model).eval()
    base = narrow.base_model
    # transformers' own head pruning keeps num_attention_heads and all_head_size consistent
    drop = _heads_to_drop(score, shape["num_attention_heads"], bool(layout.head_table))
    base.prune_heads(drop)
    if layout.head_table and drop[0]:  # the table every layer reads keeps the kept heads' columns
        tp.prune_embedding_out_channels(base.get_submodule(layout.head_table), drop[0])
    example = {k: batches[0][k][:2] for k in ("input_ids", "attention_mask")}
    with torch.enable_grad():  # the graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(narrow, example_inputs=example)
    cuts = [(layer.intermediate.dense, tp.prune_linear_out_channels,
             _lowest(score.neurons[i], intermediate_size))
            for i, layer in enumerate(base.encoder.layer)]
    cuts.append((base.embeddings.word_embeddings, tp.prune_embedding_out_channels,
                 _lowest(score.channels, hidden_size)))
    cuts += [(narrow.get_submodule(name), tp.prune_linear_out_channels, _lowest(s, hidden_size))
             for name, s in score.side.items()]
    for module, how, idxs in cuts:
        if idxs:
            graph.get_pruning_group(module, how, idxs=idxs).prune()
    config = copy.deepcopy(model.config)
    for key, value in shape.items():
        setattr(config, key, value)
    config.pruned_heads = {}
    config.edgedistill_pruned_from = {k: getattr(model.config, k) for k in SHAPE_KEYS}
    student = type(model)(config)
    student.load_state_dict(narrow.state_dict())  # strict: every narrowed tensor has its place
    return student.train(model.training)
