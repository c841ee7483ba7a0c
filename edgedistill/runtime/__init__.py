"""Loading a saved model for inference, on PyTorch or onnxruntime, behind one small interface
per model kind: :mod:`.classifier` (logits of a batch) and :mod:`.causal_lm` (logits, prefill,
decode steps with a KV cache). Evaluation, export validation and the benchmark workers all run
models through these, so a model is fed the same inputs whichever backend it is on."""
