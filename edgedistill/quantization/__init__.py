"""Quantization of an exported student: int8 for a hardware profile (:mod:`.int8`, with
accuracy-aware tuning in :mod:`.tuning`), 4-bit weights for decoders (:mod:`.int4`, rounded
to nearest or by GPTQ in :mod:`.gptq`, and Intel Neural Compressor's PyTorch weight-only path
in :mod:`.weight_only`), fp16 for GPUs (:mod:`.graph`), and int8 for OpenVINO by NNCF
(:mod:`.openvino`). Each step takes the recipe's quantize block and the run's resolved
target."""

from .graph import fp32_graph, fuse_graph, to_fp16
from .int4 import quantize_int4
from .int8 import int8_config, quantize
from .openvino import quantize_openvino

__all__ = ["fp32_graph", "fuse_graph", "int8_config", "quantize", "quantize_int4", "quantize_openvino",
           "to_fp16"]
