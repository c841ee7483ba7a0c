import math
import shutil

import pytest

from edgedistill.bench.generation import GenerationSettings, _run_once, benchmark_generation
from edgedistill.profiles import resolve_target
from edgedistill.errors import EdgeDistillError
from edgedistill.artifacts import size_on_disk_mb

from .conftest import make_llama, make_llm_tokenizer

SMALL = dict(prompt_tokens=12, new_tokens=5, warmup=1, iterations=2, rounds=2)


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    """A tiny Llama saved with its tokenizer, and its export with a KV cache."""
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("gen")
    make_llama().save_pretrained(root / "torch")
    make_llm_tokenizer().save_pretrained(root / "torch")
    main_export(str(root / "torch"), root / "onnx", task="text-generation-with-past",
                do_validation=False)
    return root / "torch", root / "onnx"


def test_generation_benchmark_torch_and_onnx(llm_dirs):
    results = benchmark_generation(list(llm_dirs), "cpu", settings=GenerationSettings(**SMALL),
                                   progress=False)
    assert [r["path"] for r in results] == [str(d) for d in llm_dirs]
    assert [r["backend"] for r in results] == ["pytorch", "onnxruntime"]
    for r in results:
        assert (r["prompt_tokens"], r["new_tokens"], r["rounds"], r["generations"]) == (12, 5, 2, 4)
        assert r["ttft_ms"]["count"] == 4 and r["tpot_ms"]["count"] == 4 * 4  # 4 steps each
        assert len(r["round_tpot_p50_ms"]) == 2
        figures = [r["ttft_ms"]["p50_ms"], r["ttft_ms"]["p90_ms"], r["tpot_ms"]["p50_ms"],
                   r["tpot_ms"]["p90_ms"], r["decode_tokens_per_s"], r["tokens_per_s"],
                   r["first_ttft_ms"], r["load_s"], r["size_mb"], *r["round_tpot_p50_ms"]]
        assert all(math.isfinite(x) and x > 0 for x in figures), figures
        assert r["decode_tokens_per_s"] == pytest.approx(1000 / r["tpot_ms"]["p50_ms"])
        assert r["peak_rss_mb"] >= r["rss_after_load_mb"] > r["rss_runtime_mb"] > 0


def test_onnx_worker_loads_no_torch(llm_dirs):
    settings = GenerationSettings(**{**SMALL, "iterations": 1})
    raw = _run_once(llm_dirs[1], resolve_target("cpu"), settings, [2, 5, 9, 7])
    assert raw["backend"] == "onnxruntime" and raw["imported"] == []
    assert len(raw["step_seconds"]) == 1 and len(raw["step_seconds"][0]) == 4


def test_generation_mistakes(llm_dirs, tmp_path):
    torch_dir = llm_dirs[0]
    with pytest.raises(EdgeDistillError, match=r"prompt_tokens \+ new_tokens: 60 \+ 8 exceeds "
                                                "the 64 positions"):
        benchmark_generation([torch_dir], settings=GenerationSettings(prompt_tokens=60,
                                                                      new_tokens=8))
    with pytest.raises(EdgeDistillError, match="exceeds the 64 positions"):
        benchmark_generation([torch_dir], prompt_ids=[5] * 60,
                             settings=GenerationSettings(new_tokens=8))
    with pytest.raises(EdgeDistillError, match="outside the 24-token vocabulary"):
        benchmark_generation([torch_dir], prompt_ids=[5, 99])
    with pytest.raises(EdgeDistillError, match="new_tokens >= 2"):
        benchmark_generation([torch_dir], settings=GenerationSettings(new_tokens=1))
    with pytest.raises(EdgeDistillError, match="model folder does not exist"):
        benchmark_generation([tmp_path / "missing"])


def test_size_counts_int4_file_and_its_external_data(llm_dirs, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(llm_dirs[1], folder)
    (folder / "model.onnx").rename(folder / "model_int4.onnx")
    (folder / "model_int4.onnx_data").write_bytes(b"\0" * 1_000_000)
    assert size_on_disk_mb(folder) == pytest.approx(size_on_disk_mb(llm_dirs[1]) + 1.0)
