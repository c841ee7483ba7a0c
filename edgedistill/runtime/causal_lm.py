"""Run a saved causal language model with a KV cache, on PyTorch or raw onnxruntime.

Evaluation, export validation and the generation benchmark all go through this one small
interface, so a prompt is fed the same way (same masks, same position ids) on either backend
and their logits can be compared token for token.

An onnxruntime-genai package (a graph with ``genai_config.json``) runs on that library's
``Generator``, the runtime a phone or desktop app links against.

The ONNX side drives an ``onnxruntime.InferenceSession`` itself instead of optimum's
``ORTModelForCausalLM``: that class pulls in torch and transformers (~400 MB resident), which
a deployment of the ONNX model does not load, and the benchmark worker's memory figure must
be the deployment's. Likewise the ONNX path reads ``config.json`` with json, not transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifacts import GENAI_BACKEND, WEIGHT_ONLY_SETTINGS, backend_of, onnx_file
from ..errors import EdgeDistillError
from .session import check_cpu_only, open_onnx_session
from .weight_only import load_weight_only

_ONNX_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}


@dataclass
class DecodeState:
    """What the next decode step continues from: the backend's KV cache and the number of
    tokens it holds. On PyTorch the cache is updated in place, so continue a state once."""

    past: Any
    length: int


def position_ids(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last ``new_tokens`` columns counted over real tokens only, so a left
    padded row starts at 0 like an unpadded one (padding gets 1, as optimum does)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -new_tokens:].astype(np.int64)


def _as_batch(input_ids) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    return ids[None, :] if ids.ndim == 1 else ids


def _single_row(input_ids) -> np.ndarray:
    ids = _as_batch(input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"prefill takes one non-empty prompt of shape (1, L), got {ids.shape}")
    return ids


class CausalLM:
    """A causal LM behind ``logits``, ``prefill``, ``step`` and ``greedy``; ``config`` is the
    model's config.json as a dict."""

    backend: str
    config: dict

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits (B, L, V) at every position, in one pass without a cache."""
        raise NotImplementedError

    def prefill(self, input_ids) -> tuple[np.ndarray, DecodeState]:
        """Run a (1, L) prompt; the last position's logits (V,) and the cache to continue."""
        raise NotImplementedError

    def step(self, token_id: int, state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        """Feed one token after ``state``; its logits (V,) and the extended cache."""
        raise NotImplementedError

    def greedy(self, input_ids, max_new_tokens: int,
               eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """The new tokens (not the prompt) of a greedy generation; stops after an EOS token,
        which is kept, as ``generate`` does."""
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        tokens: list[int] = []
        if max_new_tokens <= 0:
            return tokens
        logits, state = self.prefill(input_ids)
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            if token in stops or len(tokens) == max_new_tokens:
                return tokens
            logits, state = self.step(token, state)


class TorchCausalLM(CausalLM):
    backend = "pytorch"

    def __init__(self, folder: Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if (Path(folder) / WEIGHT_ONLY_SETTINGS).is_file():
            # Intel Neural Compressor's packed weights: transformers alone cannot read them
            self.model = load_weight_only(folder)
            self.config = self.model.config.to_dict()
            return
        try:
            self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        except ValueError as e:  # transformers' "Unrecognized configuration class ..."
            raise EdgeDistillError(
                f"{folder}: not a causal language model ({str(e).splitlines()[0][:160]}); "
                "pass a folder saved from an AutoModelForCausalLM")
        self.config = self.model.config.to_dict()

    def _run(self, ids: np.ndarray, mask: np.ndarray, past=None, use_cache: bool = True):
        t = self.torch.from_numpy
        with self.torch.inference_mode():
            out = self.model(input_ids=t(ids), attention_mask=t(mask),
                             position_ids=t(position_ids(mask, ids.shape[1])),
                             past_key_values=past, use_cache=use_cache)
        return out.logits.float().numpy(), out.past_key_values

    def logits(self, input_ids, attention_mask=None):
        ids = _as_batch(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else _as_batch(attention_mask)
        return self._run(ids, mask, use_cache=False)[0]

    def prefill(self, input_ids):
        ids = _single_row(input_ids)
        logits, past = self._run(ids, np.ones_like(ids))
        return logits[0, -1], DecodeState(past, ids.shape[1])

    def step(self, token_id, state):
        ids = np.array([[token_id]], dtype=np.int64)
        logits, past = self._run(ids, np.ones((1, state.length + 1), dtype=np.int64), state.past)
        return logits[0, -1], DecodeState(past, state.length + 1)


class OnnxCausalLM(CausalLM):
    """A graph from optimum's ``text-generation-with-past`` export: inputs ``input_ids``,
    ``attention_mask`` (past + new length), ``position_ids`` (when the architecture takes
    them), ``past_key_values.{i}.key/value``; outputs ``logits`` and ``present.{i}.key/value``."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None,
                 providers: list[str] | None = None):
        self.path = path = onnx_file(folder)
        config_path = folder / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.session = open_onnx_session(path, threads, providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.takes_positions = "position_ids" in inputs  # Llama-likes yes, some others not
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "logits" not in self.output_names:
            raise EdgeDistillError(f"{path}: the graph has no 'logits' output; export a causal "
                                   "LM with task text-generation-with-past")
        self.past = {name: self._past_template(path, inputs[name])
                     for name in inputs if name.startswith("past_key_values.")}
        self.present_to_past = {name: "past_key_values" + name[len("present"):]
                                for name in self.output_names if name.startswith("present")}

    def _past_template(self, path: Path, arg) -> tuple[list, type]:
        """Shape of an empty cache tensor (batch left as None) and its dtype, read from the
        session where the graph fixes them and from the config where they are symbolic."""
        if arg.type not in _ONNX_FLOATS:
            raise EdgeDistillError(f"{path}: input {arg.name} has type {arg.type}, which this "
                                   "runtime cannot feed from numpy; export in float32 or float16")
        c = self.config
        heads = c.get("num_attention_heads") or c.get("n_head")
        hidden = c.get("hidden_size") or c.get("n_embd")
        head_dim = c.get("head_dim") or (hidden // heads if heads and hidden else None)
        # optimum lays the cache out as (batch, kv heads, past length, head dim)
        sizes = {1: c.get("num_key_value_heads") or heads, 3: head_dim}
        shape: list = []
        for i, dim in enumerate(arg.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif "batch" in str(dim) or i == 0:
                shape.append(None)
            elif "sequence" in str(dim) or "past" in str(dim):
                shape.append(0)
            elif sizes.get(i):
                shape.append(sizes[i])
            else:
                raise EdgeDistillError(
                    f"{path}: cannot size the empty cache input {arg.name} {arg.shape}: "
                    "config.json lacks num_key_value_heads / head_dim; add them to it")
        return shape, _ONNX_FLOATS[arg.type]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros([batch if d is None else d for d in shape], dtype)
                for name, (shape, dtype) in self.past.items()}

    def _feed(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> dict:
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        if self.takes_positions:
            feed["position_ids"] = position_ids(mask, ids.shape[1])
        return feed

    def logits(self, input_ids, attention_mask=None):
        ids = _as_batch(input_ids)
        mask = (np.ones_like(ids) if attention_mask is None
                else _as_batch(attention_mask).astype(np.int64))
        feed = self._feed(ids, mask, self._empty_past(ids.shape[0]))
        return self.session.run(["logits"], feed)[0].astype(np.float32, copy=False)

    def _run(self, ids: np.ndarray, past: dict, length: int):
        if not self.past:
            raise EdgeDistillError(
                f"{self.path}: the graph has no KV cache inputs; export it with task "
                "text-generation-with-past to decode token by token")
        mask = np.ones((1, length + ids.shape[1]), dtype=np.int64)
        outputs = dict(zip(self.output_names,
                           self.session.run(self.output_names, self._feed(ids, mask, past))))
        present = {self.present_to_past[n]: outputs[n] for n in self.present_to_past}
        logits = outputs["logits"][0, -1].astype(np.float32, copy=False)
        return logits, DecodeState(present, length + ids.shape[1])

    def prefill(self, input_ids):
        return self._run(_single_row(input_ids), self._empty_past(1), 0)

    def step(self, token_id, state):
        return self._run(np.array([[token_id]], dtype=np.int64), state.past, state.length)


class GenaiCausalLM(CausalLM):
    """An onnxruntime-genai package run by its ``Generator``. The prompt and each chosen token
    go in with ``append_tokens`` and the last position's logits come back, so the greedy choice
    is made here as on the other backends and the timed work is the same. ``logits`` (every
    position, for perplexity) runs the same graph on a plain onnxruntime session, opened the
    first time it is asked for, so a benchmark process holds only the Generator's model.

    ``max_length`` (prompt and new tokens) sizes the Generator's KV cache, which it allocates
    whole when a generation starts; None takes the package's ``search.max_length``."""

    backend = GENAI_BACKEND

    def __init__(self, folder: Path, threads: int | None = None, max_length: int | None = None):
        import onnxruntime_genai as og

        self.folder, self.threads, self.max_length = folder, threads, max_length
        self.config = json.loads((folder / "config.json").read_text())
        config = og.Config(str(folder))
        if threads:  # the package's session options, as onnxruntime sessions get them here
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        try:
            self.model = og.Model(config)
        except Exception as e:  # onnxruntime-genai raises RuntimeError with its own text
            raise EdgeDistillError(f"{folder}: onnxruntime-genai cannot load this package "
                                   f"({str(e).splitlines()[0][:200]}); build it again with "
                                   "quantize.genai") from None
        self._og, self._onnx = og, None

    def logits(self, input_ids, attention_mask=None):
        if self._onnx is None:
            self._onnx = OnnxCausalLM(self.folder, self.threads)
        return self._onnx.logits(input_ids, attention_mask)

    def prefill(self, input_ids):
        ids = _single_row(input_ids)
        params = self._og.GeneratorParams(self.model)
        if self.max_length:
            params.set_search_options(max_length=self.max_length)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        return self._last(generator), DecodeState(generator, ids.shape[1])

    def step(self, token_id, state):
        state.past.append_tokens(np.array([[token_id]], dtype=np.int32))
        return self._last(state.past), DecodeState(state.past, state.length + 1)

    @staticmethod
    def _last(generator) -> np.ndarray:
        return generator.get_logits()[0, -1].astype(np.float32, copy=False)


def load_causal_lm(folder: str | Path, threads: int | None = None,
                   providers: list[str] | None = None,
                   max_length: int | None = None) -> CausalLM:
    """The model in ``folder`` on the backend its content calls for: an onnxruntime-genai
    package on onnxruntime-genai (``max_length``: see :class:`GenaiCausalLM`), another
    ``.onnx`` file on onnxruntime (neither imports torch), a saved ``AutoModelForCausalLM`` on
    PyTorch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeDistillError(f"{folder}: model folder does not exist")
    backend = backend_of(folder)
    if backend == GENAI_BACKEND:
        check_cpu_only(folder, providers, "an onnxruntime-genai package")
        return GenaiCausalLM(folder, threads, max_length)
    if backend == "onnxruntime":
        return OnnxCausalLM(folder, threads, providers)
    if backend == "openvino":
        raise EdgeDistillError(f"{folder}: an OpenVINO model; edgedistill runs OpenVINO "
                               "classifiers only, a language model runs on onnxruntime or PyTorch")
    if not (folder / "config.json").is_file():
        raise EdgeDistillError(f"{folder}: neither an ONNX model nor a saved PyTorch model")
    check_cpu_only(folder, providers)
    return TorchCausalLM(folder, threads)


__all__ = ["CausalLM", "DecodeState", "GenaiCausalLM", "OnnxCausalLM", "TorchCausalLM",
           "load_causal_lm", "position_ids"]
