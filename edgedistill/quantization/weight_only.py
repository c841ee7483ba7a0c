"""Weight-only quantization of a PyTorch causal LM with Intel Neural Compressor (INC 3.x).

For targets that run PyTorch rather than onnxruntime, e.g. a laptop application that already
ships torch and transformers and would rather not add an ONNX export and a second runtime.
The rounding is INC's own implementation (``neural_compressor.torch.quantization``) of:

- ``rtn``: round to nearest, one scale (and zero point) per ``group_size`` input weights; no
  data needed.
- ``gptq`` (Frantar et al. 2022, arXiv:2210.17323): rounds a layer's weights one input column
  at a time and moves the error of each rounded column onto the columns not yet rounded,
  weighted by the inverse Hessian of the layer's real inputs (from calibration texts).
- ``awq`` (Lin et al. 2023, arXiv:2306.00978): before rounding, scales up the input channels
  that see large activations (and scales the layer before them down by as much, so the float
  function is unchanged), searching the exponent of that scale and a clipping range per layer
  on the calibration texts.

What it writes (``out_dir``): INC's Hugging Face layout (``config.json`` with a GPTQ-style
``quantization_config``, ``model.safetensors`` whose Linear layers are packed ``qweight`` /
``scales`` / ``qzeros`` int32 tensors), the tokenizer, and ``weight_only.json`` with the exact
settings, INC's version and what was quantized. ``load_weight_only`` reads it back through INC
(``transformers``' own ``from_pretrained`` cannot: it takes the config for an AutoGPTQ model).

Compared with the onnxruntime MatMulNBits path (``int4.py``), on the SmolLM2 student
(perplexity on 99 test blocks of 128 tokens; fp32 105.5, 226.5 MB): the same kind of rounding
(4-bit asymmetric groups of 32) gives the same accuracy, RTN 114.6 here against 114.9 there;
GPTQ 106.6 here against 106.7 there, AWQ 108.8 (benchmarks/results/int4_gptq.md). The file is
smaller, 129.8 MB against 164.5 MB, because the lm_head stays float and tied to the input
embedding (which both paths keep in float), where ``int4.py`` stores an extra 8-bit copy of it
for its kernels. INC can quantize the head (``quant_lm_head``), but its Hugging Face format
refuses a quantized head, and on a CPU it would not be faster (next point). Speed is where they
differ: MatMulNBits multiplies the packed weights directly, which is why int4 decodes faster on
onnxruntime. INC's CPU module (``INCWeightOnlyLinear``) has no such kernel: its first call
unpacks each layer back to a float weight (4 s for the student) and keeps it, so it then runs
at fp32 speed (34-39 ms per token against 34 for fp32) with fp32 memory plus the packed copy.
On a PyTorch target the gain is the size of the download and of the file, not speed or RAM.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Sequence

from ..artifacts import WEIGHT_ONLY_SETTINGS as SETTINGS_FILE
from ..artifacts import publish_folder, size_on_disk_mb
from ..errors import EdgeDistillError
from ..runtime.weight_only import load_weight_only
from ..runtime.weight_only import quiet_inc as _quiet_inc

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "gptq", "awq")
BITS = (4, 8)
# Symmetric or not, per bit width. INC's default is symmetric (the grid is +-max|w|, zero point
# fixed). 4 bits: asymmetric instead, a zero point per group lets the grid follow the group's
# actual range, and INC's Hugging Face format stores zero points either way (same bytes).
# SmolLM2 student, 4-bit RTN, groups of 32, 99 test blocks: fp32 perplexity 105.5, symmetric
# 121.6, asymmetric 114.6 (int4.py measured the same direction). 8 bits: symmetric, because
# INC's CPU module unpacks ``(q - zero)`` through int8, which wraps for asymmetric 8-bit codes
# (0..255 minus a zero point): logits came out 50% off (INCWeightOnlyLinear.recover, INC 3.10).
SYMMETRIC = {4: False, 8: True}
# Names INC leaves in float unless asked (``quant_lm_head``): the output projection.
_LM_HEAD = re.compile(r".*(lm_head|output_layer|embed_out)$")
# Columns GPTQ rounds before it applies their errors to the rest of the layer in one matrix
# product (the paper's "lazy batch" of 128; onnxruntime's GPTQ uses 128 too). INC's default,
# 2048, updates all remaining columns after every column: the same result (student
# perplexity 106.30 vs 106.32) in 36 s instead of 26 s on one thread.
GPTQ_BLOCK = 128
# AWQ's clipping search (INC's use_auto_clip), per bit width. INC 3.10 simulates its searches
# at 4 bits whatever ``bits`` is (awq.py passes ``num_bits=`` to quant_tensor, which takes
# ``bits=``), so at 8 bits the clipping it picks is a 4-bit one: on the tiny test model 8-bit
# AWQ came out 5x further from fp32 than 8-bit RTN with it, closer than RTN without it. At 4
# bits it helps a little: SmolLM2 student perplexity 108.6 with, 109.6 without.
AWQ_CLIP = {4: True, 8: False}
# Architectures whose decoder layers AWQ can fold its input scales into (see _awq_absorb).
_AWQ_FOLDABLE = ("llama", "mistral", "qwen2", "qwen3")


def quantize_weight_only(model_dir: str | Path, out_dir: str | Path, algorithm: str = "rtn", *,
                         bits: int = 4, group_size: int = 32,
                         calibration_texts: Sequence[str] = (), max_length: int = 128,
                         calibration_samples: int = 32) -> dict:
    """Quantize the Linear weights of the causal LM in ``model_dir`` and save it to ``out_dir``.

    ``bits`` 4 or 8; ``group_size`` input weights share one scale (a power of two >= 16, or -1
    for one scale per output channel). ``gptq`` and ``awq`` calibrate on the first
    ``calibration_samples`` of ``calibration_texts``, each text one sequence of at most
    ``max_length`` tokens; give them training texts, never test text. Every Linear layer is
    quantized except the lm_head (kept float: see the module docstring).

    GPTQ and AWQ run many small tensor operations (a column, a grid point at a time), which
    torch spreads over its threads: on a machine whose cores are busy those threads wait for
    each other. On 2 cores next to another job, GPTQ on the student took 513 s with 2 threads
    and 36 s after ``torch.set_num_threads(1)`` (26 s with ``GPTQ_BLOCK``); AWQ 160 s on one.

    The folder is written as ``<out_dir>.partial`` and renamed when complete, so an
    interrupted run leaves no ``out_dir`` (a previous one stays until the new one is whole).
    Returns backend, algorithm, bits, group_size, quantized_layers, size_mb, seconds (the
    quantization itself, calibration included) and calibration_texts (how many were used).
    """
    import neural_compressor
    import torch

    _check_settings(algorithm, bits, group_size, max_length, calibration_samples)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    texts = [t for t in islice(calibration_texts or (), calibration_samples)
             if isinstance(t, str) and t.strip()]
    if algorithm != "rtn" and not texts:
        raise EdgeDistillError(
            f"weight-only {algorithm}: no calibration texts for {model_dir}; pass "
            "calibration_texts=[...] (training texts; the pipeline passes its own) or use rtn")
    source, target = model_dir.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        raise EdgeDistillError(f"{out_dir}: write the quantized model to a folder outside "
                               f"{model_dir}, which it would overwrite")
    model, tokenizer = _load_fp32(model_dir, needs_tokenizer=algorithm != "rtn")
    # RTN needs no data: texts given to it are ignored (and not counted)
    batches = _tokenize(tokenizer, texts, max_length) if algorithm != "rtn" else []
    if algorithm != "rtn" and not batches:
        raise EdgeDistillError(f"weight-only {algorithm}: the calibration texts tokenize to "
                               f"nothing with {model_dir}'s tokenizer; pass non-empty texts")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in linears if not _LM_HEAD.match(n)]
    absorb = _awq_absorb(model, bits) if algorithm == "awq" else {}

    start = time.perf_counter()
    with _quiet_inc():
        config = _inc_config(algorithm, bits, group_size, absorb)
        model = _run_inc(model, config, batches)
    seconds = time.perf_counter() - start
    quantized = _quantized_layers(model)
    if len(quantized) != len(targets):  # INC skipped some (seen: AWQ, see _inc_config)
        missed = sorted(set(targets) - {n.removesuffix(".linear") for n in quantized})
        raise RuntimeError(f"neural-compressor {algorithm} quantized {len(quantized)} of the "
                           f"{len(targets)} Linear layers it was given; left: {missed[:4]}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        from neural_compressor.torch.quantization import save

        with _quiet_inc():
            save(model, str(partial), format="huggingface")
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        settings = {
            "backend": "neural-compressor", "format": "neural-compressor huggingface",
            "algorithm": algorithm, "bits": bits, "group_size": group_size,
            "symmetric": SYMMETRIC[bits], "quantized_layers": len(quantized),
            "linear_layers": len(linears), "kept_float": sorted(set(linears) - set(targets)),
            "lm_head": "float, tied to the input embedding" if model.config.tie_word_embeddings
                       else "float",
            "inc_settings": _inc_settings(config, absorb),
            "calibration_texts": len(batches),
            "calibration_tokens": int(sum(b.shape[1] for b in batches)),
            "max_length": max_length, "seconds": round(seconds, 3),
            "size_mb": round(size_on_disk_mb(partial), 3),
            "size_mb_before": round(size_on_disk_mb(model_dir), 3),
            "source": str(model_dir), "neural_compressor": neural_compressor.__version__,
            "torch": torch.__version__, "transformers": _version("transformers")}
        _write_settings(partial, settings)
        publish_folder(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("weight-only %s: %d of %d Linear layers to %d bits (group %d), %.1f -> %.1f MB, "
             "%.1f s", algorithm, len(quantized), len(linears), bits, group_size,
             settings["size_mb_before"], settings["size_mb"], seconds)
    return {"backend": "neural-compressor", "algorithm": algorithm, "bits": bits,
            "group_size": group_size, "quantized_layers": len(quantized),
            "size_mb": settings["size_mb"], "seconds": settings["seconds"],
            "calibration_texts": len(batches)}


def _check_settings(algorithm, bits, group_size, max_length, calibration_samples) -> None:
    if algorithm not in ALGORITHMS:
        close = difflib.get_close_matches(str(algorithm), ALGORITHMS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EdgeDistillError(f"weight-only algorithm: '{algorithm}' is unknown{hint}; "
                               f"valid: {', '.join(ALGORITHMS)}")
    if bits not in BITS or not isinstance(bits, int) or isinstance(bits, bool):
        raise EdgeDistillError(f"weight-only bits: {bits!r} is not supported; valid: 4, 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
            group_size == -1 or (group_size >= 16 and group_size & (group_size - 1) == 0)):
        raise EdgeDistillError(f"weight-only group_size: {group_size!r} is not a power of two "
                               ">= 16 or -1 (one scale per output channel); try 32, 64 or 128")
    for name, value in (("max_length", max_length), ("calibration_samples", calibration_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise EdgeDistillError(f"weight-only {name}: {value!r} must be a whole number > 0")


def _load_fp32(model_dir: Path, needs_tokenizer: bool):
    """The fp32 model and its tokenizer (None when absent and not needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise EdgeDistillError(f"{model_dir}: no config.json, not a saved transformers model; "
                               "pass the folder of a causal LM saved with save_pretrained")
    # AutoModelForCausalLM also loads an encoder (BERT has an LM-head class) with a random
    # head, so a folder is a causal LM by what it was saved as
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                 for a in architectures):
        raise EdgeDistillError(f"{model_dir}: a {', '.join(architectures)}, not a causal "
                               "language model; weight-only quantization takes a decoder LM "
                               "(quantize an encoder through the ONNX int8 path)")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:  # no weights / "Unrecognized configuration class"
        raise EdgeDistillError(f"{model_dir}: cannot load it as a causal LM "
                               f"({str(e).splitlines()[0][:160]}); pass a folder saved from an "
                               "AutoModelForCausalLM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        if needs_tokenizer:
            raise EdgeDistillError(f"{model_dir}: no tokenizer to read the calibration texts "
                                   f"({str(e).splitlines()[0][:120]}); save it next to the "
                                   "model")
        log.warning("%s: no tokenizer; the quantized folder will not have one either", model_dir)
        tokenizer = None
    return model, tokenizer


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list:
    """One (1, L) batch per text: no padding, which would enter GPTQ's Hessian and AWQ's
    activation statistics; no special tokens, as the ONNX path's calibration feeds them."""
    import torch

    rows = tokenizer(texts, add_special_tokens=False, truncation=True,
                     max_length=max_length)["input_ids"]
    return [torch.tensor([row], dtype=torch.long) for row in rows if row]


def _inc_config(algorithm: str, bits: int, group_size: int, absorb: dict):
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = {"bits": bits, "group_size": group_size, "use_sym": SYMMETRIC[bits]}
    if algorithm == "rtn":
        # layer-wise mode reloads each layer from a checkpoint path; the model is in memory
        return RTNConfig(**common, use_layer_wise=False)
    if algorithm == "gptq":
        return GPTQConfig(**common, block_size=GPTQ_BLOCK)
    # without a map of its own INC gives every layer an input multiply (MulLinear), and without
    # the clip search it leaves those layers unquantized: keep the search there
    return AWQConfig(**common, absorb_layer_dict=absorb,
                     use_auto_clip=AWQ_CLIP[bits] or not absorb)


def _run_inc(model, config, batches: list):
    """INC's prepare -> (calibrate) -> convert; the model comes back with INCWeightOnlyLinear
    layers (inside MulLinear wrappers where AWQ kept an input scale of its own)."""
    import torch
    from neural_compressor.torch.quantization import AWQConfig, RTNConfig, convert, prepare

    if isinstance(config, RTNConfig):
        return convert(prepare(model, config))
    # AWQ wants an example input (INC traces the model with it when it has no absorb map)
    example = {"example_inputs": batches[0]} if isinstance(config, AWQConfig) else {}
    prepared = prepare(model, config, **example)
    with torch.no_grad():
        for ids in batches:
            # INC records the first decoder layer's inputs and stops the pass there. No KV
            # cache: AWQ keeps the layer's keyword arguments and replays them many times, and
            # a cache in them would grow with every replay.
            prepared(input_ids=ids, use_cache=False)
    return convert(prepared)


def _awq_absorb(model, bits: int) -> dict:
    """Where AWQ folds each input scale, for Llama-style decoder layers: q/k/v into the
    attention RMSNorm, gate/up into the MLP's, down into up_proj (the MLP is
    ``down(act(gate(x)) * up(x))``), o into v_proj when their sizes match. INC finds this by
    tracing the model with torch.jit, which fails on transformers 4.57's Llama (its tuple
    outputs), and then gives every layer an input multiply of its own (MulLinear). o_proj under
    grouped-query attention (v smaller than o's input) gets such a multiply where the clip
    search runs, and is rounded to nearest where it does not (INC then skips multiplied
    layers). Empty (INC's own detection) for other architectures."""
    if getattr(model.config, "model_type", None) not in _AWQ_FOLDABLE:
        return {}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return {}
    block = layers[0]
    names = {n for n, _ in block.named_modules()}
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp = ("mlp.gate_proj", "mlp.up_proj")
    needed = {"input_layernorm", "post_attention_layernorm", *attention, *mlp,
              "self_attn.o_proj", "mlp.down_proj"}
    if not needed <= names or block.input_layernorm.weight.dim() != 1:
        return {}
    absorb = {"input_layernorm": attention, "post_attention_layernorm": mlp,
              "mlp.up_proj": ("mlp.down_proj",)}
    if block.self_attn.v_proj.out_features == block.self_attn.o_proj.in_features:
        absorb["self_attn.v_proj"] = ("self_attn.o_proj",)
    elif AWQ_CLIP[bits]:  # without the clip search INC leaves such a layer unquantized
        absorb["self_attn.o_proj"] = ("self_attn.o_proj",)
    return absorb


def _quantized_layers(model) -> list[str]:
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    return [n for n, m in model.named_modules() if isinstance(m, INCWeightOnlyLinear)]


def _inc_settings(config, absorb: dict) -> dict:
    """The algorithm's own options as INC ran them, so a reader knows what ran."""
    names = {"gptq": ("percdamp", "block_size", "act_order", "static_groups", "true_sequential"),
             "awq": ("use_auto_scale", "use_auto_clip", "folding")}.get(config.name, ())
    settings = {name: getattr(config, name) for name in names}
    if config.name == "awq":
        settings["absorb_layer_dict"] = {k: list(v) for k, v in absorb.items()} or "inc-detected"
    return settings


def _write_settings(folder: Path, settings: dict) -> None:
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


__all__ = ["ALGORITHMS", "load_weight_only", "quantize_weight_only"]
