import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.causal_lm import load_causal_lm

from .conftest import make_llama, make_llm_tokenizer

PROMPT = [2, 5, 9, 7, 12, 4, 8]


def export_llm(model_dir, out, task="text-generation-with-past"):
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), out, task=task, do_validation=False)
    return out


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    """A tiny Llama whose weights are scaled up so greedy decoding does not repeat one token
    (a freshly initialised one does), saved and exported with a KV cache."""
    root = tmp_path_factory.mktemp("lm")
    model = make_llama(seed=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    model.save_pretrained(root / "torch")
    make_llm_tokenizer().save_pretrained(root / "torch")
    export_llm(root / "torch", root / "onnx")
    return root / "torch", root / "onnx"


def test_torch_and_onnx_agree(llm_dirs):
    torch_lm, onnx_lm = (load_causal_lm(d, threads=1) for d in llm_dirs)
    assert (torch_lm.backend, onnx_lm.backend) == ("pytorch", "onnxruntime")

    tokens = torch_lm.greedy(PROMPT, 12)
    reference = torch_lm.model.generate(torch.tensor([PROMPT]), max_new_tokens=12,
                                        do_sample=False, eos_token_id=None)
    assert tokens == reference[0, len(PROMPT):].tolist()
    assert len(set(tokens)) > 2  # the comparison means something only if tokens vary
    assert onnx_lm.greedy(PROMPT, 12) == tokens

    full = [PROMPT + tokens]
    np.testing.assert_allclose(onnx_lm.logits(full), torch_lm.logits(full), atol=1e-4)


@pytest.mark.parametrize("backend", [0, 1], ids=["pytorch", "onnxruntime"])
def test_one_pass_equals_prefill_and_steps(llm_dirs, backend):
    lm = load_causal_lm(llm_dirs[backend], threads=1)
    tokens = lm.greedy(PROMPT, 8)
    full = lm.logits([PROMPT + tokens])[0]

    logits, state = lm.prefill([PROMPT])
    stepped = [logits]
    for token in tokens[:-1]:
        logits, state = lm.step(token, state)
        stepped.append(logits)
    assert state.length == len(PROMPT) + len(tokens) - 1
    np.testing.assert_allclose(np.stack(stepped), full[len(PROMPT) - 1:-1], atol=1e-4)


@pytest.mark.parametrize("backend", [0, 1], ids=["pytorch", "onnxruntime"])
def test_left_padding_does_not_shift_positions(llm_dirs, backend):
    lm = load_causal_lm(llm_dirs[backend], threads=1)
    ids = np.array([[0, 0] + PROMPT[:5], PROMPT[:7]])
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    logits = lm.logits(ids, mask)
    np.testing.assert_allclose(logits[0, 2:], lm.logits([PROMPT[:5]])[0], atol=1e-4)
    assert logits.shape == (2, 7, lm.config["vocab_size"])


def test_greedy_stops_at_eos_and_quantized_file_names(llm_dirs, tmp_path):
    renamed = tmp_path / "int4"
    shutil.copytree(llm_dirs[1], renamed)
    (renamed / "model.onnx").rename(renamed / "model_int4.onnx")
    lm = load_causal_lm(renamed)
    first = lm.greedy(PROMPT, 5)
    assert lm.greedy(PROMPT, 5, eos_token_id=first[1]) == first[:2]
    assert lm.greedy(PROMPT, 5, eos_token_id=[99, first[0]]) == first[:1]
    assert lm.greedy(PROMPT, 0) == []


def test_onnx_path_imports_neither_torch_nor_transformers(llm_dirs):
    code = ("import sys; from edgedistill.runtime.causal_lm import load_causal_lm; "
            f"load_causal_lm({str(llm_dirs[1])!r}).greedy({PROMPT}, 3); "
            "print(sorted({'torch', 'transformers', 'optimum'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mistakes(llm_dirs, tmp_path):
    with pytest.raises(EdgeDistillError, match="model folder does not exist"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeDistillError, match="neither an ONNX model nor a saved PyTorch"):
        load_causal_lm(tmp_path / "empty")
    no_cache = export_llm(llm_dirs[0], tmp_path / "no-cache", task="text-generation")
    lm = load_causal_lm(no_cache)
    assert lm.logits([PROMPT]).shape == (1, len(PROMPT), lm.config["vocab_size"])
    with pytest.raises(EdgeDistillError, match="text-generation-with-past"):
        lm.prefill([PROMPT])
