"""An onnxruntime-genai package of a causal LM: the folder a phone or desktop app loads with
``onnxruntime_genai.Model(folder)`` and runs with its ``Generator`` (a graph, its weights,
``genai_config.json`` and the tokenizer).

It is built by onnxruntime-genai's own model builder from the student's transformers folder,
not from our optimum export: the builder writes the decoder with onnxruntime's fused operators
(GroupQueryAttention, SkipSimplifiedLayerNormalization), 4-bit MatMul weights (MatMulNBits,
one scale per ``block_size`` weights) and, for a model whose output head is tied to its token
embedding, one matrix for both (GatherBlockQuantized reads the embedding rows out of the
head's MatMulNBits weight), in 8 bits by default: the embedding, a fifth of a small LM's
parameters, no longer stays float, and the head, whose 4-bit rounding alone cost the SmolLM2
student a tenth more perplexity, keeps 8 bits. An untied model gets a 4-bit embedding of its
own. With GPTQ the builder is handed a GPTQ checkpoint (Intel Neural Compressor's rounding)
instead of the float student.

The builder of onnxruntime-genai 0.18 is written against transformers 5, and the pinned stack
has 4.57 (optimum-onnx needs < 4.58). Two differences matter for the decoders built here, and
the builder's process (``python -m edgedistill.quantization.genai``) bridges them before it
runs the builder's own command line: the builder imports two Qwen3.5 classes that 4.57 lacks
(placeholders stand in; those architectures are refused before), and it reads the rotary
settings from ``config.rope_parameters`` (transformers 5), built here from 4.57's
``rope_theta`` and ``rope_scaling``. Running the builder in its own process keeps both changes
out of the pipeline's transformers. The architectures below were checked end to end (built,
loaded, greedy tokens equal to transformers' in fp32: tests/test_genai.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import onnx

from ..artifacts import copy_sidecars, onnx_file, size_on_disk_mb, write_atomic
from ..errors import EdgeDistillError
from .int4 import EIGHT_BIT_ACCURACY_LEVEL, set_accuracy_level

log = logging.getLogger(__name__)

# the decoders whose packages were checked with the bridge above (see the module docstring)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM")
PRECISIONS = ("int4", "fp32")
ALGORITHMS = ("rtn", "gptq")
HEAD_BITS = (8, 4)
# how the builder's process names the failure it reports, and each step it starts (a native
# crash, seen with a tokenizer onnxruntime-genai cannot parse, reports nothing itself)
_ERROR = "edgedistill-genai-error: "
_STEP = "edgedistill-genai-step: "
_TOKENIZER = "reading the tokenizer"
_TOKENIZERS_READ = ("it reads Hugging Face tokenizer.json files of the BPE, SentencePiece and "
                    "WordPiece kinds")


def check_architecture(config: dict, where: str) -> None:
    """Refuse, in one line, a model the package cannot be built for (``config``: its
    config.json)."""
    names = config.get("architectures") or ["a model without architectures"]
    if names[0] not in ARCHITECTURES:
        raise EdgeDistillError(
            f"{where}: onnxruntime-genai packages are built here for {', '.join(ARCHITECTURES)}"
            f", not {names[0]}; set quantize.genai: false (the int4 ONNX model still ships)")
    # the builder's attention is onnxruntime's GroupQueryAttention, whose CPU kernel refuses
    # other head sizes when it runs (the builder itself does not check)
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head % 16:
        raise EdgeDistillError(f"{where}: attention heads of {head} dimensions; onnxruntime-"
                               "genai's attention runs heads of a multiple of 16 dimensions; "
                               "set quantize.genai: false")


def build_genai_package(model_dir: str | Path, output_dir: str | Path, block_size: int = 32,
                        accuracy_level: int | None = 4, precision: str = "int4",
                        algorithm: str = "rtn", head_bits: int = 8,
                        calibration_texts: Sequence[str] = (), calibration_samples: int = 32,
                        max_length: int = 128) -> dict:
    """Build the onnxruntime-genai package of the transformers causal LM in ``model_dir``
    into ``output_dir`` (``precision`` int4, or fp32 to check the builder against the source
    model). The package is loaded, tokenizer included, before this returns: one that
    onnxruntime-genai cannot run is an error, not an artifact.

    int4: the decoder blocks' weights are rounded by ``algorithm``, ``rtn`` (the builder's
    round to nearest, symmetric) or ``gptq`` (Intel Neural Compressor's GPTQ on the first
    ``calibration_samples`` of ``calibration_texts``, asymmetric, read in by the builder);
    the output head gets ``head_bits`` (8 or 4) and, when tied, is also the embedding table.
    On the SmolLM2 student (fp32 perplexity 117.0, benchmarks/results/genai_package.md) the
    builder's round to nearest with a 4-bit head gave 142.8, GPTQ alone 134.0, an 8-bit head
    alone 129.4, both 117.9.
    ``accuracy_level`` is the 4-bit weights' compute type: 4, int8 activations (the fastest
    on CPU), or 0 / None, float, which rounds alike on every CPU; the 8-bit head computes with
    int8 activations either way (see int4.EIGHT_BIT_ACCURACY_LEVEL)."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if output_dir.exists():
        raise EdgeDistillError(f"{output_dir}: already exists; the package is built into a new "
                               "folder (remove it or choose another)")
    if precision not in PRECISIONS:
        raise EdgeDistillError(f"precision: '{precision}' is not built; valid: "
                               f"{', '.join(PRECISIONS)}")
    if algorithm not in ALGORITHMS:
        raise EdgeDistillError(f"genai algorithm: '{algorithm}' is unknown; valid: "
                               f"{', '.join(ALGORITHMS)}")
    if head_bits not in HEAD_BITS or isinstance(head_bits, bool):
        raise EdgeDistillError(f"genai head_bits: {head_bits!r} is not built; valid: 8, 4")
    config = json.loads((model_dir / "config.json").read_text())
    check_architecture(config, str(model_dir))
    tied = config.get("tie_word_embeddings", True)  # transformers' default for these models
    options = ["shared_embeddings=true" if tied else "op_types_to_quantize=MatMul/Gather"]
    if precision == "int4":
        # the builder gives every MatMulNBits one level: the 8-bit head's, set to the 4-bit
        # weights' ``accuracy_level`` once built
        options += [f"block_size={block_size}", f"accuracy_level={EIGHT_BIT_ACCURACY_LEVEL}",
                    # rtn: with the builder's "default" method an 8-bit tied head is written
                    # under another name than the embedding's GatherBlockQuantized reads
                    # (onnxruntime-genai 0.18: the package does not load)
                    "algo_config=rtn"]
        if head_bits == 8:
            options.append("matmul_mixed_precision=last_matmul:int8")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # the builder's cache, GPTQ's checkpoint
        source, record = model_dir, {}
        if precision == "int4" and algorithm == "gptq":
            source = Path(scratch) / "gptq"
            record = _gptq_checkpoint(model_dir, source, block_size, calibration_texts,
                                      calibration_samples, max_length)
        command = [sys.executable, "-m", __name__, "-i", str(source), "-o", str(output_dir),
                   "-p", precision, "-e", "cpu", "-c", str(Path(scratch) / "cache"),
                   "--extra_options", *options]
        done = subprocess.run(command, capture_output=True, text=True)
    for stream in (done.stdout, done.stderr):  # the builder's own lines, for the stage's log
        if stream.strip():
            log.info("onnxruntime-genai builder:\n%s", stream.strip()[-20000:])
    if done.returncode != 0:
        shutil.rmtree(output_dir, ignore_errors=True)  # no half-built package stays behind
        raise EdgeDistillError(f"{model_dir}: {_failure(done.stderr, done.returncode)}")
    copy_sidecars(model_dir, output_dir)  # config.json: the runtimes read its sizes
    int4 = precision == "int4"
    if int4 and (accuracy_level or 0) != EIGHT_BIT_ACCURACY_LEVEL:
        graph_file = onnx_file(output_dir)  # the weights stay in its .data file
        model = onnx.load(str(graph_file), load_external_data=False)
        set_accuracy_level(model.graph, accuracy_level, bits=4)
        write_atomic(graph_file, model.SerializeToString())  # a killed write leaves it whole
    record = {"builder": "onnxruntime-genai model builder", "precision": precision,
              "algorithm": algorithm if int4 else None, **record,
              "block_size": block_size, "accuracy_level": accuracy_level or 0,
              "head_bits": head_bits if int4 else 32,
              "head_accuracy_level": EIGHT_BIT_ACCURACY_LEVEL if int4 and head_bits == 8 else None,
              "embedding": (f"{head_bits}-bit, shared with the output head" if tied else "4-bit")
              if int4 else "float",
              "size_mb": round(size_on_disk_mb(output_dir), 3),
              "build_seconds": round(time.perf_counter() - start, 1)}
    (output_dir / "quantize_config.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("onnxruntime-genai %s package: %.1f MB", precision, record["size_mb"])
    return record


def _gptq_checkpoint(model_dir: Path, out: Path, block_size: int, texts: Sequence[str],
                     samples: int, max_length: int) -> dict:
    """GPTQ weights of ``model_dir`` written where the builder reads a GPTQ checkpoint from.

    Intel Neural Compressor rounds them (``weight_only.quantize_weight_only``) and saves
    AutoGPTQ's packing (int32 ``qweight`` / ``qzeros``, ``scales``); the builder's GPTQ loader
    reads that packing but not three differences of INC's file, which no library converts, so
    they are rewritten here: INC adds a ``scale_bf16_to_fp8`` tensor per layer (dropped), a
    zero bias for Linear layers that have none (dropped: the same function), and leaves out
    ``g_idx``, AutoGPTQ's group of each input channel (added: channel // group size, the
    order without act-order, which INC's GPTQ does not use)."""
    import torch
    from safetensors.torch import load_file, save_file

    from .weight_only import quantize_weight_only

    done = quantize_weight_only(model_dir, out, "gptq", bits=4, group_size=block_size,
                                calibration_texts=texts, calibration_samples=samples,
                                max_length=max_length)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        kept = {}
        for name, tensor in tensors.items():
            layer, _, kind = name.rpartition(".")
            if kind == "scale_bf16_to_fp8":
                continue
            if kind == "bias" and f"{layer}.qweight" in tensors and not tensor.any():
                continue
            kept[name] = tensor
            if kind == "qweight":  # eight 4-bit input channels per int32 row
                channels = tensor.shape[0] * 8
                kept[f"{layer}.g_idx"] = torch.arange(channels, dtype=torch.int32) // block_size
        save_file(kept, shard, metadata={"format": "pt"})
    return {"calibration_texts": done["calibration_texts"], "rounded_by": done["backend"]}


# ----------------------------------------------------------------- the builder's process

def _bridge_transformers() -> None:
    """What onnxruntime-genai 0.18's builder expects of transformers 5, on 4.57 (see the
    module docstring)."""
    import transformers

    class _Absent:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("this architecture needs transformers 5")

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (_Absent,), {}))
    read = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = read(*args, **kwargs)
        if not hasattr(config, "rope_parameters") and hasattr(config, "rope_theta"):
            scaling = dict(getattr(config, "rope_scaling", None) or {})
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            config.rope_parameters = {**scaling, "rope_theta": config.rope_theta}
        if getattr(config, "rope_scaling", 0) is None:
            del config.rope_scaling  # transformers 5 has no such attribute when unset
        return config

    transformers.AutoConfig.from_pretrained = from_pretrained


def _failure(stderr: str, returncode: int) -> str:
    """What the builder's process failed at, in one line: the error it reported, or, when it
    died without one (a native crash), the step it had started."""
    lines = stderr.splitlines()
    reported = [line[len(_ERROR):] for line in lines if line.startswith(_ERROR)]
    if reported:
        return reported[-1]
    steps = [line[len(_STEP):] for line in lines if line.startswith(_STEP)]
    step = steps[-1] if steps else "starting"
    how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    if step == _TOKENIZER:
        return (f"onnxruntime-genai cannot read this tokenizer (it crashed, {how}); "
                f"{_TOKENIZERS_READ}")
    return f"onnxruntime-genai's builder process died ({how}) while {step}; rerun with --debug"


def _step(what: str) -> None:
    print(f"{_STEP}{what}", file=sys.stderr, flush=True)


def _check_package(folder: str) -> None:
    """Load the package and its tokenizer as an app would, and encode a sentence."""
    import onnxruntime_genai as og

    _step("loading the package")
    model = og.Model(folder)
    _step(_TOKENIZER)
    text = "The best way to sleep better is"
    try:
        ids = [int(i) for i in og.Tokenizer(model).encode(text)]
    except Exception as e:  # onnxruntime-genai raises RuntimeError with its own text
        reason = str(e).strip()[:160] or "no reason given"
        raise RuntimeError(f"onnxruntime-genai cannot read this tokenizer ({reason}); "
                           f"{_TOKENIZERS_READ}") from None
    # a tokenizer it misparses may still load (seen with a word-level one: sometimes an error,
    # sometimes other ids), so its ids must be transformers' ids
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    expected = [reference(text)["input_ids"],
                reference(text, add_special_tokens=False)["input_ids"]]
    if ids not in expected:
        raise RuntimeError(f"onnxruntime-genai reads this tokenizer differently from transformers "
                           f"({ids[:6]} against {expected[0][:6]} for a sample sentence); "
                           f"{_TOKENIZERS_READ}")


def _main(argv: list[str]) -> int:
    import runpy

    _bridge_transformers()
    output = argv[argv.index("-o") + 1]
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    try:
        _step("building the graph")
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
        _check_package(output)
    except Exception as e:
        print(f"{_ERROR}{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
