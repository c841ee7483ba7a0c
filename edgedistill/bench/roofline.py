"""A roofline model: the least time an inference can take on a device, and how far a measured
latency is from it.

A device runs an inference no faster than its arithmetic allows (operations / peak ops per
second) and no faster than its memory can deliver the bytes the inference reads (bytes / peak
bandwidth); the roofline bound is the larger of the two (Williams, Waterman and Patterson,
"Roofline", CACM 2009). Three parts:

* :func:`graph_cost` counts operations and bytes read from the exported ONNX graph;
* :func:`host_peaks` measures this host's peaks (an empirical roofline, as the Empirical
  Roofline Toolkit does: datasheet peaks are rarely reached, a large GEMM and a large copy
  are what onnxruntime can get), cached per CPU, thread count and onnxruntime version;
  a profile's ``roofline`` block holds the target device's peaks (theoretical, from its
  datasheet or microarchitecture: we cannot measure a phone from here);
* :func:`project` gives the bound, :func:`efficiency` the fraction of the host's bound a
  measured latency reaches, and :func:`estimate_target` a projected latency on the target:
  the target's bound divided by the host's efficiency. That is an estimate, not a
  measurement: it assumes the target's kernels reach the same fraction of its peaks as the
  host's did of the host's.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..artifacts import onnx_file, write_atomic
from ..errors import EdgeDistillError
from ..host import cpu_model
from ..sources import cache_dir

# Operators that multiply an activation by a weight, and the index of their weight input. The
# weight is an initializer (perhaps behind DequantizeLinear / Transpose); an operator whose
# weight input is an activation (attention's QK^T and AV, rotary's position product) is not
# counted here: those products are counted from config.json (see _attention_flops), the same
# way whether or not onnxruntime's optimizer fused attention into one node.
WEIGHT_INPUT = {
    "MatMul": 1, "Gemm": 1, "FusedMatMul": 1,  # fp32 (or QDQ: both inputs DequantizeLinear)
    "MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,  # int8 dynamic
    "QLinearMatMul": 3, "QGemm": 3,  # int8 static, QOperator format
    "MatMulNBits": 1,  # weight-only int4 / int8, blockwise (com.microsoft)
    "Attention": 1, "QAttention": 1,  # fused attention: input 1 is the packed QKV weight
}
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
               "QLinearMatMul", "QGemm", "QAttention"}
# Nodes a weight may pass through between its initializer and the matmul reading it.
WEIGHT_PATH = {"DequantizeLinear", "Transpose", "Cast", "Identity", "Reshape"}
# (operator, input index) reading only some rows of an initializer: embedding lookups read
# one row per token, not the whole vocabulary table.
GATHERED = {("Gather", 0), ("EmbedLayerNormalization", 2), ("EmbedLayerNormalization", 3),
            ("EmbedLayerNormalization", 4)}
# bytes per element of packed sub-byte types (numpy would say 1: ml_dtypes stores one a byte)
SUB_BYTE = {22: 0.5, 21: 0.5, 23: 0.5}  # INT4, UINT4, FLOAT4E2M1

PEAK_KEYS = {"int8": "int8_gops", "fp32": "fp32_gflops"}


# ------------------------------------------------------------------------------------ cost

def graph_cost(model: str | Path, batch_size: int = 1, sequence_length: int = 128) -> dict:
    """Operations and bytes of one inference of an exported encoder (a BERT-style classifier)
    or of a decoder's prefill (empty KV cache) at ``batch_size`` x ``sequence_length``.

    ``model``: an .onnx file or the folder holding one (and config.json). Works on fp32
    graphs, int8 dynamic (MatMulInteger, DynamicQuantizeMatMul, QAttention), int8 static QDQ,
    int4 MatMulNBits, and graphs fused by onnxruntime's transformer optimizer. The graph is
    read without its external data: only the initializers' shapes and types are needed.

    FLOPs count a multiply-add as 2. They are those of the matrix products, which are nearly
    all of a transformer's arithmetic: each weight matmul adds 2 x rows x K x N (rows: the
    tokens it runs on, from shape inference: batch x sequence, or batch for a classifier
    head on the [CLS] vector); attention's activation products QK^T and AV add
    4 x batch x sequence^2 x hidden per layer (from config.json; the graph has no weight for
    them). Softmax, normalizations and activations (O(tokens x hidden)) are left out.

    Bytes are those of the weights, each read once per inference (an embedding table only
    for the rows looked up). Activations are assumed to stay in cache, so bytes (and the
    memory-bound time made of them) are a lower bound: at long sequences or large batches the
    activations' traffic is not negligible.

    ``precision``: the format the weight matmuls carrying most FLOPs run in: "int8" (integer
    kernels), "int4" (MatMulNBits 4-bit weights), or "fp32". ``flops_by_compute`` splits the
    FLOPs by the arithmetic that does them, which is what :func:`project` divides by a peak:
    MatMulNBits computes in int8 when its accuracy_level is 4 (onnxruntime's fast CPU path:
    activations quantized to int8 per block) and in fp32 otherwise (weights dequantized).
    """
    import onnx

    path = _model_file(Path(model))
    onnx_model = onnx.load(str(path), load_external_data=False)
    graph = onnx_model.graph
    tokens = batch_size * sequence_length
    shapes = _infer_shapes(onnx_model, batch_size, sequence_length)
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:  # some exporters keep small weights in Constant nodes
        if node.op_type == "Constant":
            tensors.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    producers = {out: node for node in graph.node for out in node.output}

    def rows(name: str, op_type: str) -> int:
        """Rows of the activation ``name`` (all of its dims but the last)."""
        dims = shapes.get(name)
        if dims and all(isinstance(d, int) for d in dims):
            return math.prod(dims[:-1]) if len(dims) > 1 else 1
        # unknown after an operator onnx cannot infer (com.microsoft ones): a 2-D activation
        # in these exports is a classifier head's input, one row per sequence
        if (dims is not None and len(dims) == 2) or (dims is None and op_type == "Gemm"):
            return batch_size
        return tokens

    def from_dequantize(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    flops_by_format: dict[str, float] = {}
    flops_by_compute = {"int8": 0.0, "fp32": 0.0}
    weight_bytes = weight_flops = 0.0
    integer_activation_products = False
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUT or len(node.input) <= WEIGHT_INPUT[node.op_type]:
            continue
        weight = _weight_initializer(node.input[WEIGHT_INPUT[node.op_type]], tensors, producers)
        integer = node.op_type in INTEGER_OPS or (
            from_dequantize(node.input[0]) and from_dequantize(node.input[1]))  # QDQ: fused
        if weight is None:  # activation x activation: counted from config.json below
            integer_activation_products |= integer
            continue
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            k_times_n = attrs["K"] * attrs["N"]
            fmt = f"int{attrs.get('bits', 4)}"
            compute = "int8" if attrs.get("accuracy_level", 0) == 4 else "fp32"
        else:
            k_times_n = math.prod(weight.dims)  # [K, N], or [N, K] for Gemm transB: same product
            fmt = compute = "int8" if integer else "fp32"
        flops = 2.0 * rows(node.input[0], node.op_type) * k_times_n
        weight_flops += flops
        weight_bytes += _nbytes(weight)
        flops_by_format[fmt] = flops_by_format.get(fmt, 0.0) + flops
        flops_by_compute[compute] += flops

    config = _config(path.parent)
    attention = _attention_flops(config, batch_size, sequence_length)
    flops_by_compute["int8" if integer_activation_products else "fp32"] += attention or 0.0
    total_bytes = _bytes_read(graph, tensors, shapes, tokens)
    flops = weight_flops + (attention or 0.0)
    return {
        "model": str(path), "batch_size": batch_size, "sequence_length": sequence_length,
        "flops": flops, "weight_flops": weight_flops, "attention_flops": attention,
        "bytes": total_bytes, "matmul_weight_bytes": weight_bytes,
        "arithmetic_intensity": flops / total_bytes if total_bytes else None,
        "precision": max(flops_by_format, key=flops_by_format.get) if flops_by_format else "fp32",
        "flops_by_compute": flops_by_compute,
        "notes": ("bytes: weights read once, activations assumed cached (a lower bound)"
                  + ("" if attention is not None else
                     "; attention products not counted: no config.json with the layer "
                     "count and hidden size next to the model")),
    }


def _model_file(model: Path) -> Path:
    if model.is_dir():
        found = onnx_file(model)
        if found is None:
            raise EdgeDistillError(f"{model}: no .onnx file; export the model first")
        return found
    if not model.is_file():
        raise EdgeDistillError(f"{model}: no such ONNX file")
    return model


def _infer_shapes(onnx_model, batch_size: int, sequence_length: int) -> dict:
    """Tensor name -> dims (int, or None where unknown), by onnx's shape inference with the
    inputs fixed to this shape and an empty KV cache. Operators onnx does not know (the
    com.microsoft ones) leave their outputs unknown; graph_cost falls back on rules."""
    from onnx import shape_inference

    model = type(onnx_model)()
    model.CopyFrom(onnx_model)  # the caller's graph stays as loaded
    for value in model.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if "past" in dim.dim_param or (value.name.startswith("past") and i == 2):
                dim.dim_value = 0  # prefill: nothing cached yet
            else:
                dim.dim_value = batch_size if i == 0 else sequence_length
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # a graph onnx cannot check: every rows() falls back on its rules
        return {}
    shapes = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _weight_initializer(name: str, tensors: dict, producers: dict):
    """The initializer feeding a matmul's weight input, through DequantizeLinear, Transpose
    (a tied lm_head reads the embedding transposed), Cast; None for an activation."""
    for _ in range(4):
        if name in tensors:
            return tensors[name]
        node = producers.get(name)
        if node is None or node.op_type not in WEIGHT_PATH:
            return None
        name = node.input[0]
    return None


def _nbytes(tensor) -> float:
    from onnx import helper

    count = math.prod(tensor.dims)
    if tensor.data_type in SUB_BYTE:
        return count * SUB_BYTE[tensor.data_type]
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _bytes_read(graph, tensors: dict, shapes: dict, tokens: int) -> float:
    """Each initializer's bytes, read once; an embedding table only for the rows looked up
    (the most read wherever one table has several readers: a tied lm_head reads it all)."""
    read: dict[str, float] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name not in tensors:
                continue
            size = _nbytes(tensors[name])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = list(tensors[name].dims)
            if (node.op_type, index) in GATHERED and axis == 0 and dims and dims[0]:
                looked_up = shapes.get(node.input[1]) if node.op_type == "Gather" else None
                n = (math.prod(looked_up) if looked_up and None not in looked_up else tokens)
                size = min(size, n * size / dims[0])
            read[name] = max(read.get(name, 0.0), size)
    return sum(read.values())


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _attention_flops(config: dict, batch_size: int, sequence_length: int) -> float | None:
    """QK^T and AV of every layer: 2 x 2 x batch x seq^2 x (heads x head_dim) FLOPs.

    The full seq x seq products: the exported graphs mask the causal half, they do not skip
    it. Grouped-query attention shares K/V heads but still multiplies every query head."""
    def first(*keys):
        return next((config[k] for k in keys if isinstance(config.get(k), int)), None)

    layers = first("num_hidden_layers", "n_layer", "n_layers", "num_layers")
    hidden = first("hidden_size", "n_embd", "dim", "d_model")
    if not layers or not hidden:
        return None
    heads, head_dim = first("num_attention_heads", "n_head", "n_heads"), first("head_dim")
    width = heads * head_dim if heads and head_dim else hidden
    return 4.0 * layers * batch_size * sequence_length**2 * width


# ---------------------------------------------------------------------------- host peaks

MATRIX = 1024  # the GEMMs' size: 2 GFLOP, large enough for onnxruntime's kernels to reach peak
COPY_MB = 256  # at least; more where the last-level cache is bigger (see _copy_bytes)
SECONDS = 0.5  # per measurement: the best of as many runs as fit, at least MIN_RUNS; a run
MIN_RUNS = 3    # that another process slowed down is not the best, so it does not count
BUSY = 0.75     # 1-minute load average per core above which a cached measurement is redone


def host_peaks(threads: int, refresh: bool = False) -> dict:
    """This host's peaks on ``threads`` intra-op threads, measured (2-3 seconds) on first
    use and cached in ``~/.cache/edgedistill/host_peaks.json`` (``$EDGEDISTILL_CACHE``),
    keyed by CPU model, thread count and onnxruntime version. ``refresh`` measures again and
    keeps, figure by figure, the higher of the old and new (a measurement taken while other
    work loaded the host is low; the entry's ``load_per_core`` says how loaded it was, and an
    entry measured above :data:`BUSY` is measured again on the next call).

    int8: onnxruntime's MatMulInteger, uint8 activations x int8 weights (what dynamic
    quantization runs); fp32: onnxruntime's MatMul; both 1024^3, best of a few runs.
    Bandwidth: a numpy copy of 256 MB (or of the last-level cache's size, if larger) split
    over ``threads`` threads, counting the bytes read and those written.
    Measured peaks are below the datasheet's, and that is the point: they are what
    onnxruntime reaches on this host, so the fraction of them a model reaches says how much
    of its latency is overhead rather than arithmetic or memory.
    """
    import onnxruntime

    key = f"{cpu_model()} | {threads} threads | onnxruntime {onnxruntime.__version__}"
    path = cache_dir() / "host_peaks.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    # an entry measured while other work loaded the host is measured again (keeping the
    # higher figures), so a low first measurement does not stay in the cache for good
    if key in cached and not refresh and cached[key].get("load_per_core", 0) <= BUSY:
        return cached[key]
    measured = _measure(threads)
    # a peak is a maximum: a refresh keeps the higher of the old and new figures, so a
    # measurement slowed by other work on the host never replaces a better one
    previous = cached.get(key, {})
    peaks = {**{k: max(v, previous.get(k, 0)) for k, v in measured.items()},
             "threads": threads, "host": key,
             "source": f"measured on this host: onnxruntime MatMulInteger / MatMul "
                       f"{MATRIX}^3, numpy copy of {_copy_bytes() // 2**20} MB",
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
             # the 1-minute load average per core when measured (this measurement's own
             # threads count in it): well above 1, other work shared the cores and the
             # figures are low (measure again with refresh=True when the host is quiet)
             "load_per_core": round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)}
    cached[key] = peaks
    write_atomic(path, json.dumps(cached, indent=2) + "\n")  # a concurrent run reads old or new
    return peaks


def _measure(threads: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    a_f32 = rng.standard_normal((MATRIX, MATRIX), dtype=np.float32)
    b_f32 = rng.standard_normal((MATRIX, MATRIX), dtype=np.float32)
    a_u8 = rng.integers(0, 256, (MATRIX, MATRIX), dtype=np.uint8)
    b_s8 = rng.integers(-128, 128, (MATRIX, MATRIX), dtype=np.int8)
    ops = 2.0 * MATRIX**3
    fp32 = _gemm_session("MatMul", b_f32, threads)
    int8 = _gemm_session("MatMulInteger", b_s8, threads)
    fp32_s = _best_time(lambda: fp32.run(None, {"a": a_f32}))
    int8_s = _best_time(lambda: int8.run(None, {"a": a_u8}))
    return {"int8_gops": round(ops / int8_s / 1e9, 1), "fp32_gflops": round(ops / fp32_s / 1e9, 1),
            "bandwidth_gbs": round(_copy_bandwidth(threads) / 1e9, 1)}


def _gemm_session(op: str, weight, threads: int):
    """A one-node onnxruntime session: activation input x weight initializer, as a model's
    weights are (onnxruntime prepacks constant weights, as it does in the real graphs)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    elem, out = ((TensorProto.FLOAT, TensorProto.FLOAT) if op == "MatMul"
                 else (TensorProto.UINT8, TensorProto.INT32))
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", elem, [MATRIX, MATRIX])],
        [helper.make_tensor_value_info("y", out, [MATRIX, MATRIX])],
        [numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _best_time(run) -> float:
    """The shortest of repeated calls of ``run``: noise only ever adds time."""
    run()  # warm-up: thread pool start, first touch of the buffers
    best, runs, until = math.inf, 0, time.perf_counter() + SECONDS
    while runs < MIN_RUNS or time.perf_counter() < until:
        start = time.perf_counter()
        run()
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return best


def _copy_bandwidth(threads: int) -> float:
    """Bytes per second of a large copy, counting the bytes read and those written."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = _copy_bytes()
    src, dst = np.ones(n, np.uint8), np.zeros(n, np.uint8)  # both touched: no page faults timed
    bounds = np.linspace(0, n, max(threads, 1) + 1).astype(int)
    parts = [(dst[lo:hi], src[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(len(parts)) as pool:  # numpy's copy releases the GIL
        best = _best_time(lambda: list(pool.map(lambda p: np.copyto(*p), parts)))
    return 2 * n / best


def _copy_bytes() -> int:
    """The copy's size: 256 MB, or the last-level cache's size if larger (a server's L3 can
    hold 300 MB), so that source and destination together are at least twice the cache and
    the copy runs at memory speed, not cache speed."""
    size = COPY_MB * 2**20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[:-1].isdigit() and text[-1] in units:
            size = max(size, int(text[:-1]) * units[text[-1]])
    return size


def profile_peaks(profile) -> dict:
    """The peaks of the device ``profile`` stands for: its ``roofline`` block where it gives
    numbers (theoretical peaks of a device we are not running on), else this host's measured
    peaks on the profile's threads (profile cpu: the target is the host)."""
    block = dict(getattr(profile, "roofline", None) or {})
    if any(key in block for key in (*PEAK_KEYS.values(), "bandwidth_gbs")):
        return block
    return host_peaks(profile.threads)


# ------------------------------------------------------------------------------ projection

def project(cost: dict, peaks: dict) -> dict:
    """The roofline bound of ``cost`` (from :func:`graph_cost`) on a device with ``peaks``.

    compute_ms: int8 FLOPs at ``int8_gops`` plus fp32 FLOPs at ``fp32_gflops`` (one after
    the other: a graph's matmuls do not overlap); memory_ms: bytes at ``bandwidth_gbs``.
    The bound is the larger (a kernel may overlap its arithmetic with its loads, so not their
    sum); ``limited_by`` names it. ``ridge_intensity`` is the FLOPs per byte above which the
    device is compute bound for the cost's main arithmetic.
    """
    compute_s = 0.0
    for compute, flops in cost["flops_by_compute"].items():
        if flops:
            compute_s += flops / (_peak(peaks, PEAK_KEYS[compute]) * 1e9)
    memory_s = cost["bytes"] / (_peak(peaks, "bandwidth_gbs") * 1e9)
    main = max(cost["flops_by_compute"], key=cost["flops_by_compute"].get)
    return {"bound_ms": max(compute_s, memory_s) * 1e3, "compute_ms": compute_s * 1e3,
            "memory_ms": memory_s * 1e3,
            "limited_by": "compute" if compute_s >= memory_s else "memory",
            "arithmetic_intensity": cost["flops"] / cost["bytes"] if cost["bytes"] else None,
            "ridge_intensity": _peak(peaks, PEAK_KEYS[main]) / _peak(peaks, "bandwidth_gbs"),
            "compute": main, "peaks_source": peaks.get("source", "")}


def _peak(peaks: dict, key: str) -> float:
    value = peaks.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise EdgeDistillError(f"roofline: no positive '{key}' in the peaks "
                               f"({peaks.get('source') or 'no source'})")
    return float(value)


def efficiency(measured_ms: float, host_bound_ms: float) -> float:
    """The fraction of the host's roofline a measured latency reaches: bound / measured (1:
    as fast as the host's peaks allow; 0.1: nine tenths of the time is neither peak
    arithmetic nor peak memory traffic: small kernels, threading, non-matmul operators)."""
    if measured_ms <= 0:
        raise EdgeDistillError(f"roofline: measured latency {measured_ms} ms is not positive")
    return host_bound_ms / measured_ms


def at_host_efficiency(target_bound_ms: float, host_efficiency: float) -> float:
    """An ESTIMATE of the latency on the target: its roofline bound divided by the fraction
    of its own roofline the host reached. It assumes the target's runtime is as efficient
    relative to its peaks as the host's is to the host's, which a phone's or a GPU's may not
    be; it is a projection to be labelled as one, never a measurement."""
    if host_efficiency <= 0:
        raise EdgeDistillError("roofline: host efficiency must be positive")
    return target_bound_ms / host_efficiency


def estimate_target(cost: dict, measured_ms: float, host: dict, target: dict) -> dict:
    """Everything a report needs, in one record: the host's bound and the measured latency's
    efficiency against it, the target's bound, and the projected latency on the target
    (labelled an estimate)."""
    on_host, on_target = project(cost, host), project(cost, target)
    eff = efficiency(measured_ms, on_host["bound_ms"])
    return {"host": on_host, "measured_ms": measured_ms, "host_efficiency": eff,
            "target": on_target,
            "estimated_target_ms": at_host_efficiency(on_target["bound_ms"], eff),
            "label": "estimate: target roofline bound / host efficiency, not a measurement"}


def roofline_estimate(model_dir: Path, measured_ms: float, profile, batch_size: int,
                      sequence_length: int) -> dict:
    """:func:`estimate_target` for the ONNX model in ``model_dir`` measured at
    ``measured_ms`` on this host under ``profile`` (whose target's peaks it projects onto)."""
    cost = graph_cost(model_dir, batch_size, sequence_length)
    record = estimate_target(cost, measured_ms, host_peaks(profile.threads),
                             profile_peaks(profile))
    return {**record, "flops": cost["flops"], "bytes": cost["bytes"],
            "precision": cost["precision"]}
