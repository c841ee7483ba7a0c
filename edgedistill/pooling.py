"""How a sentence embedder turns token states into one vector per text, read from and written
as sentence-transformers' folder files.

A sentence-transformers model folder keeps its transformer at the top (``config.json``,
weights, tokenizer) and lists its modules in ``modules.json``: the Pooling module's settings
sit in ``1_Pooling/config.json``; a ``Dense`` module, when listed, maps the pooled vector to
another width (a linear layer, then identity or tanh; its weights in its own folder); a
``Normalize`` module scales each embedding to unit length. edgedistill reads those once, when
the task loads a teacher, and carries them in the model's own config as ``sentence_pooling``
(so a student made from the teacher, its checkpoints and its exported graph keep them), the
Dense layer's weights as the model's attribute ``DENSE``; a saved embedder gets the
sentence-transformers files again, so the library itself can load it.

The ground floor: the runtime, the export and the trainer all pool through :func:`pool`.
It uses tensor methods only (torch is imported inside the functions that build a layer), so
an ONNX benchmark process never loads torch by importing this module.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EdgeDistillError

# the model config's key that carries the pooling (config.json of every folder edgedistill saves)
CONFIG_KEY = "sentence_pooling"
# the poolings of the common sentence-transformers models (max and weighted-mean pooling are
# rare, and not built)
MODES = ("mean", "cls")
# sentence-transformers' Pooling config flag of each mode
_ST_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}
# the Dense activations exported (sentence-transformers names them by class path): identity, as
# edgedistill's width projection has, and tanh, sentence-transformers' default
_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity",
                "torch.nn.modules.activation.Tanh": "tanh"}
# the model attribute that holds a Dense layer (a torch Linear) beside the encoder
DENSE = "sentence_dense"


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"        # mean over the real tokens, or the first token ([CLS])
    normalize: bool = False   # unit length, so a dot product is the cosine similarity
    dense: int | None = None  # the width of a Dense layer after the pooling, if any
    activation: str = "identity"  # the Dense layer's: identity or tanh
    bias: bool = True         # whether the Dense layer adds a bias

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgeDistillError(f"{CONFIG_KEY}.mode: '{self.mode}' is not supported; "
                                   f"valid: {', '.join(MODES)}")
        if self.activation not in _ACTIVATIONS.values():
            raise EdgeDistillError(f"{CONFIG_KEY}.activation: '{self.activation}' is not "
                                   f"supported; valid: {', '.join(_ACTIVATIONS.values())}")


def read_pooling(folder: str | Path) -> Pooling | None:
    """The pooling of the embedder in ``folder``: from its config's ``sentence_pooling`` (a
    folder edgedistill saved), else from sentence-transformers' ``modules.json``; None when the
    folder has neither (not a sentence embedder)."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        carried = json.loads(config.read_text()).get(CONFIG_KEY)
        if carried:
            return Pooling(**carried)
    modules = _modules(folder)
    if modules is None:
        return None
    kinds = [_kind(m) for m in modules]
    if "Pooling" not in kinds:
        return None
    settings = _module_config(folder, modules[kinds.index("Pooling")])
    on = [mode for mode, flag in _ST_FLAGS.items() if settings.get(flag)]
    other = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v
             and k not in _ST_FLAGS.values()]
    if len(on) != 1 or other:
        raise EdgeDistillError(
            f"{folder}: its pooling ({', '.join(on + other) or 'none'}) is not one that "
            f"edgedistill exports; it pools by one of {', '.join(MODES)}")
    # what follows the pooling changes the embedding: a module not exported would be lost
    # silently, so each is read or refused
    dense = {}
    for m, kind in zip(modules, kinds):
        if kind == "Dense" and not dense:
            config = _module_config(folder, m)
            activation = _ACTIVATIONS.get(config.get("activation_function"))
            if activation is None:
                raise EdgeDistillError(
                    f"{folder}: its Dense module's activation "
                    f"{config.get('activation_function')} is not one edgedistill exports "
                    "(Identity or Tanh)")
            if not isinstance(config.get("out_features"), int):
                raise EdgeDistillError(f"{folder}: its Dense module's config.json gives no "
                                       "out_features (its width); repair it")
            dense = {"dense": config["out_features"], "activation": activation,
                     "bias": bool(config.get("bias", True))}
        elif kind not in ("Transformer", "Pooling", "Normalize"):
            raise EdgeDistillError(
                f"{folder}: its module {m.get('type')} (modules.json) is not one edgedistill "
                "exports; it exports Transformer, Pooling, one Dense and Normalize")
    return Pooling(on[0], "Normalize" in kinds, **dense)


def _modules(folder: Path) -> list[dict] | None:
    """sentence-transformers' module list of ``folder`` (``modules.json``), or None."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text())
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError("not a list of modules")
        return modules
    except (OSError, ValueError) as e:
        raise EdgeDistillError(f"{path}: cannot be read ({e}); repair it") from None


def _kind(module: dict) -> str:
    # by class name: sentence-transformers 5 writes other module paths than 2 to 4 did
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _module_config(folder: Path, module: dict) -> dict:
    """The settings of one of ``folder``'s sentence-transformers modules."""
    path = folder / module.get("path", "") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeDistillError(f"{path}: the {module.get('type', 'module')} settings cannot be "
                               f"read ({e}); repair it") from None


def require_pooling(folder: str | Path, where: str) -> Pooling:
    pooling = read_pooling(folder)
    if pooling is None:
        raise EdgeDistillError(
            f"{where}: {folder} has no pooling information (no modules.json with a Pooling "
            "module, no sentence_pooling in config.json); use a sentence-transformers model "
            "folder, or add 1_Pooling/config.json and modules.json to it")
    return pooling


def carry(config, pooling: Pooling) -> None:
    """Keep ``pooling`` in a transformers config (saved with it in config.json): the settings
    that differ from the defaults, so an embedder without a Dense layer keeps the config (and
    the teacher-output fingerprint) it had before Dense layers were read."""
    default = Pooling()
    setattr(config, CONFIG_KEY, {k: v for k, v in asdict(pooling).items()
                                 if k in ("mode", "normalize") or v != getattr(default, k)})


def carried(config) -> Pooling | None:
    value = getattr(config, CONFIG_KEY, None)
    return Pooling(**value) if value else None


def pool(hidden, mask, pooling: Pooling, dense=None):
    """Sentence embeddings (batch, width) from token states (batch, length, width) and the
    attention mask (batch, length), as sentence-transformers' Pooling (+ Dense + Normalize)
    computes them: padding never counts. ``dense`` is the model's Dense layer (its attribute
    ``DENSE``), needed when the pooling names one."""
    if pooling.mode == "cls":
        out = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if pooling.dense:
        if dense is None:
            raise EdgeDistillError(f"{CONFIG_KEY} names a Dense layer of width {pooling.dense} "
                                   "and the model has none; load it with its folder's Dense "
                                   "module (pooling.attach_dense)")
        out = dense(out)
        if pooling.activation == "tanh":
            out = out.tanh()
    if pooling.normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return out


def dense_weights(folder: str | Path):
    """The weight (out, in) and bias (or None) of the Dense module of the embedder in
    ``folder``, as numpy arrays."""
    folder = Path(folder)
    module = next((m for m in _modules(folder) or [] if _kind(m) == "Dense"), None)
    if module is None:
        raise EdgeDistillError(f"{folder}: its config names a Dense layer ({CONFIG_KEY}) and "
                               "modules.json lists no Dense module; save the model again")
    base = folder / module.get("path", "")
    if (base / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        state = load_file(base / "model.safetensors")
    elif (base / "pytorch_model.bin").is_file():  # sentence-transformers before 2.3
        import torch

        state = {k: v.numpy() for k, v in torch.load(base / "pytorch_model.bin",
                                                     weights_only=True).items()}
    else:
        raise EdgeDistillError(f"{base}: the Dense module's weights (model.safetensors) are "
                               "missing; copy the model folder again")
    if "linear.weight" not in state:
        raise EdgeDistillError(f"{base}: the Dense module's weights have no linear.weight "
                               f"(keys: {', '.join(state)}); copy the model folder again")
    return state["linear.weight"], state.get("linear.bias")


def attach_dense(model, pooling: Pooling, folder: str | Path | None = None) -> None:
    """Put the Dense layer that ``pooling`` names, if any, on ``model`` (attribute ``DENSE``, a
    torch Linear from the encoder's width): with the weights of ``folder``'s Dense module, or
    freshly initialised (a new projection) when ``folder`` is None."""
    if not pooling.dense:
        return
    import torch

    layer = torch.nn.Linear(model.config.hidden_size, pooling.dense, bias=pooling.bias)
    if folder is not None:
        weight, bias = dense_weights(folder)
        if tuple(weight.shape) != tuple(layer.weight.shape) or (bias is None) == pooling.bias:
            raise EdgeDistillError(
                f"{folder}: its Dense weights ({tuple(weight.shape)}, bias "
                f"{bias is not None}) do not fit an encoder of width "
                f"{model.config.hidden_size} into {pooling.dense}; copy the model folder again")
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                layer.bias.copy_(torch.from_numpy(bias))
    model.add_module(DENSE, layer.to(model.device, model.dtype))


@contextlib.contextmanager
def dense_apart(model):
    """``model`` without its Dense layer (yielded, or None) while its transformers weights are
    saved: the layer goes into sentence-transformers' own module folder instead
    (:func:`write_sentence_files`), where sentence-transformers and :func:`attach_dense` read
    it, and transformers does not warn of weights it does not know."""
    dense = getattr(model, DENSE, None)
    if dense is not None:
        delattr(model, DENSE)
    try:
        yield dense
    finally:
        if dense is not None:
            model.add_module(DENSE, dense)


def write_sentence_files(folder: str | Path, model, tokenizer, dense=None) -> None:
    """Make ``folder``, where ``model`` (an encoder carrying its pooling) was saved, a
    sentence-transformers model folder, with ``dense`` (from :func:`dense_apart`) as its Dense
    module."""
    config = model.config
    length = min(getattr(tokenizer, "model_max_length", 512), config.max_position_embeddings)
    write_sentence_transformers_files(folder, carried(config), config.hidden_size, length, dense)


def write_sentence_transformers_files(folder: str | Path, pooling: Pooling, width: int,
                                      max_length: int, dense=None) -> None:
    """Write the files that make ``folder`` (a saved transformers encoder of ``width``) a
    sentence-transformers model with this pooling (``SentenceTransformer(folder)`` loads it);
    ``dense`` is the model's Dense layer, needed when the pooling names one."""
    folder = Path(folder)
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    (folder / "1_Pooling").mkdir(exist_ok=True)
    settings = {"word_embedding_dimension": width,
                **{flag: mode == pooling.mode for mode, flag in _ST_FLAGS.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(settings, indent=2))
    if pooling.dense:
        from safetensors.torch import save_file

        modules.append(("Dense", "2_Dense"))
        (folder / "2_Dense").mkdir(exist_ok=True)
        name = {v: k for k, v in _ACTIVATIONS.items()}[pooling.activation]
        (folder / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": width, "out_features": pooling.dense, "bias": pooling.bias,
             "activation_function": name}, indent=2))
        state = {f"linear.{k}": v.detach().float().cpu().contiguous()
                 for k, v in dense.state_dict().items()}
        save_file(state, folder / "2_Dense" / "model.safetensors")
    if pooling.normalize:
        modules.append(("Normalize", f"{len(modules)}_Normalize"))
        (folder / modules[-1][1]).mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
         for i, (kind, path) in enumerate(modules)], indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
