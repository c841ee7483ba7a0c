"""Loading a PyTorch model whose Linear weights Intel Neural Compressor packed to 4 or 8 bits
(written by :mod:`edgedistill.quantization.weight_only`)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from ..artifacts import WEIGHT_ONLY_SETTINGS as SETTINGS_FILE
from ..errors import EdgeDistillError


def load_weight_only(out_dir: str | Path):
    """The model ``quantize_weight_only`` wrote to ``out_dir``, in eval mode on the CPU: a
    transformers causal LM (``model(input_ids).logits``, ``model.generate``) whose Linear
    layers are INC's packed weight-only modules. The first forward call unpacks them (seconds
    on a 100M-parameter model): warm up before timing."""
    folder = Path(out_dir)
    if not (folder / SETTINGS_FILE).is_file():
        raise EdgeDistillError(f"{folder}: no {SETTINGS_FILE}, so not a weight-only model "
                               "from edgedistill; make one with quantize_weight_only")
    from neural_compressor.torch.quantization import load

    # INC prints progress to stdout as well as logging it
    with quiet_inc(), contextlib.redirect_stdout(io.StringIO()):
        model = load(str(folder), format="huggingface", device="cpu")
    return model.eval()


@contextlib.contextmanager
def quiet_inc():
    """INC logs every layer at INFO, and WARNINGs about its own defaults (the lm_head config
    it sets twice); what matters is summarised in our log line and weight_only.json."""
    from neural_compressor.common.utils.logger import Logger

    # INC configures its logger (level from $LOGLEVEL) when first used: make that happen now
    inc_log = Logger().get_logger()
    level = inc_log.level
    inc_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        inc_log.setLevel(level)
