"""The causal-LM path of the pipeline on a tiny random Llama, through the CLI."""

import json

import pytest

from edgedistill.cli import main
from tests.conftest import write_tsv
from tests.test_model_card import execute, python_blocks

RECIPE = """
version: 1
name: tiny-lm
task: causal-lm
data: {{source: {data}, max_length: 16}}
teacher: {{model: {teacher}, finetune: false}}
student: {{num_layers: 2}}
distill: {{distill_loss: {loss}, temperature: 1.0, epochs: 1, batch_size: 8,
          learning_rate: 1.0e-3, cache_teacher: {cache}, cache_top_k: 8}}
export: {{export_teacher: false, atol: 1.0e-3}}
quantize: {{int4: true, int4_block_size: 16, pytorch_int4: rtn}}
evaluate: {{generations: 2, generation_tokens: 4}}
bench: {{rounds: 1, warmup: 1, iterations: 2, sequence_length: 12, new_tokens: 4}}
report:
  targets:
    - {{name: student int4 perplexity / student fp32 perplexity,
       value: student-int4.metrics.perplexity, per: student.metrics.perplexity, at_most: 1.05}}
    - {{name: student int4 decode tokens/s / teacher PyTorch fp32 decode tokens/s,
       value: student-int4.decode_tokens_per_s, per: teacher.decode_tokens_per_s,
       at_least: 4.0}}
"""


def write_recipe(tmp_path, teacher, loss="forward_kl", cache="true"):
    data = write_tsv(tmp_path / "data", 120, 30)
    path = tmp_path / "lm.yaml"
    path.write_text(RECIPE.format(data=data, teacher=teacher, loss=loss, cache=cache))
    return path


def test_causal_lm_run_end_to_end(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path, tiny_llama_dir)), "--output", str(out)]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm"
    names = [m["name"] for m in report["models"]]
    assert names == ["teacher", "student", "student-onnx", "student-int8", "student-int4",
                     "student-int4-pytorch"]
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    for m in report["models"]:
        # a random model over a vocabulary of V tokens sits near perplexity V, never far above
        assert 1 < m["metrics"]["perplexity"] < 3 * vocab
        assert 0 <= m["metrics"]["next_token_agreement"] <= 1
        assert m["ttft_ms"]["p50_ms"] > 0 and m["tpot_ms"]["p50_ms"] > 0
        assert m["decode_tokens_per_s"] > 0 and m["peak_rss_mb"] > 0 and m["size_mb"] > 0
        assert len(m["generated_text"]) == 2
    by_name = {m["name"]: m for m in report["models"]}
    # the ONNX export computes what PyTorch computes
    assert by_name["student-onnx"]["metrics"]["perplexity"] == pytest.approx(
        by_name["student"]["metrics"]["perplexity"], rel=1e-3)
    assert by_name["student-int4"]["size_mb"] < by_name["student-onnx"]["size_mb"]
    # Intel Neural Compressor's 4-bit PyTorch model: packed, loaded back, evaluated, timed
    assert by_name["student-int4-pytorch"]["backend"] == "pytorch"
    assert by_name["student-int4-pytorch"]["metrics"]["perplexity"] == pytest.approx(
        by_name["student"]["metrics"]["perplexity"], rel=0.2)
    assert report["quantization"]["pytorch_int4"]["quantized_layers"] > 0
    assert {t["target"] for t in report["targets"]} == {
        "student int4 perplexity / student fp32 perplexity",
        "student int4 decode tokens/s / teacher PyTorch fp32 decode tokens/s"}
    assert report["training"]["distill"]["teacher_layers"] == [0, 3]
    assert (out / "teacher-cache" / "meta.json").is_file()
    html = (out / "report.html").read_text()
    assert "perplexity" in html and "Generations" in html


@pytest.mark.parametrize("sets, message", [
    (["distill.distill_loss=soft_cross_entropy"], "task causal-lm takes one of"),
    (["quantize.mode=static"], "static calibration of a decoder"),
    (["distill.loss_options={beta: 2}", "distill.distill_loss=generalized_jsd"], "beta"),
])
def test_causal_lm_recipe_mistakes_fail_before_training(tmp_path, tiny_llama_dir, capsys, sets,
                                                          message):
    args = ["run", str(write_recipe(tmp_path, tiny_llama_dir)), "--output", str(tmp_path / "o")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "teacher").exists()


def test_token_loss_for_a_classifier_is_refused(tmp_path, tiny_teacher_dir, capsys):
    data = write_tsv(tmp_path / "data", 40, 10)
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"data: {{source: {data}}}\nteacher: {{model: {tiny_teacher_dir}}}\n"
                      "distill: {distill_loss: reverse_kl}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "o")]) == 2
    assert "is a token-level loss for task: causal-lm" in capsys.readouterr().err


def test_distill_cache_teacher_flag(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_llama_dir, cache="false")
    assert main(["distill", str(recipe), "--output", str(out)]) == 0
    assert not (out / "teacher-cache").exists()
    assert main(["distill", str(recipe), "--output", str(out), "--cache-teacher"]) == 0
    meta = json.loads((out / "teacher-cache" / "meta.json").read_text())
    assert meta["top_k"] == 8 and (out / "distill" / "model").is_dir()


def test_teacher_generations_join_the_training_rows(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    extra = tmp_path / "extra.txt"
    extra.write_text("good dose\nbad week then good\n")
    out = tmp_path / "out"
    sets = ["--set", "transfer.generate={prompts: 6, prompt_tokens: 4, new_tokens: 8}",
            "--set", f"transfer.unlabelled=[{{source: {extra}}}]"]
    assert main(["distill", str(recipe), "--output", str(out), *sets]) == 0
    t = json.loads((out / "distill" / "manifest.json").read_text())["record"]["transfer"]
    assert t["sources"]["teacher generations"] == 6 and t["generations"]["cached"] is False
    assert t["unlabelled_texts"] == {str(extra): 2}
    assert len(list((out / "transfer-cache").glob("generations-*.safetensors"))) == 1
    # the teacher cache covers the ordinary blocks and the generated rows alike
    meta = json.loads((out / "teacher-cache" / "meta.json").read_text())
    assert meta["rows"] == t["training_rows"] + t["size"]

    # on-policy: the student continues the prompts in some batches, the live teacher scores them
    assert main(["distill", str(recipe), "--output", str(tmp_path / "gkd"), *sets,
                 "--set", "transfer.generate.lmbda=1.0",
                 "--set", "distill.cache_teacher=false"]) == 0
    log = json.loads((tmp_path / "gkd" / "distill" / "manifest.json").read_text())["record"]
    assert max(h.get("on_policy_batches", 0) for h in log["log_history"]) > 0


def test_on_policy_needs_the_live_teacher(tmp_path, tiny_llama_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--set",
                 "transfer.generate={prompts: 6, prompt_tokens: 4, new_tokens: 8, lmbda: 0.5}"]) == 2
    assert "set distill.cache_teacher: false" in capsys.readouterr().err


def test_a_language_model_teacher_is_fine_tuned_on_the_text_first(tmp_path, tiny_llama_dir):
    """teacher.finetune on a causal LM: next-token training on the training text, its best
    epoch kept by validation loss (the teacher has no teacher: no soft-target loss to check)."""
    out = tmp_path / "out"
    assert main(["distill", str(write_recipe(tmp_path, tiny_llama_dir)), "--output", str(out),
                 "--set", "teacher.finetune=true", "--set", "teacher.epochs=1",
                 "--set", "distill.cache_teacher=false"]) == 0
    record = json.loads((out / "teacher" / "manifest.json").read_text())["record"]
    assert record["finetuned"] and record["selection"]["metric"] == "loss"
    assert record["selection"]["greater_is_better"] is False
    assert (out / "distill" / "model" / "config.json").is_file()


def test_an_onnxruntime_genai_package_is_built_evaluated_and_timed(tmp_path, capsys,
                                                                    tiny_llama_bpe_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_llama_bpe_dir)
    assert main(["run", str(recipe), "--output", str(out),
                 "--set", "quantize.pytorch_int4=null", "--set", "quantize.genai=true",
                 "--set", "quantize.int4_algorithm=gptq", "--set", "report.targets=[]"]) == 0
    report = json.loads((out / "report.json").read_text())
    by_name = {m["name"]: m for m in report["models"]}
    # the package is the int4 model to ship; the MatMulNBits model stays beside it, renamed
    assert list(by_name) == ["teacher", "student", "student-onnx", "student-int8",
                             "student-int4-ort", "student-int4"]
    assert by_name["student-int4-ort"]["backend"] == "onnxruntime"
    # the printed summary (80 columns here) keeps both names whole, never "student-int…" twice
    summary = capsys.readouterr().err
    assert "│ student-int4-ort │" in summary and "│ student-int4     │" in summary
    genai = by_name["student-int4"]
    assert genai["backend"] == "onnxruntime-genai" and genai["precision"] == "int4"
    assert (out / "quantize" / "student-int4" / "genai_config.json").is_file()
    # its Generator picks the tokens onnxruntime picks on the same graph, on every prompt
    assert genai["metrics"]["same_tokens_as_onnxruntime"] == 1.0
    assert genai["metrics"]["perplexity"] == pytest.approx(
        by_name["student-onnx"]["metrics"]["perplexity"], rel=0.2)
    assert genai["decode_tokens_per_s"] > 0 and genai["peak_rss_mb"] > 0
    assert genai["size_mb"] < by_name["student-onnx"]["size_mb"]
    built = report["quantization"]["genai"]
    assert built["embedding"] == "8-bit, shared with the output head"
    assert built["algorithm"] == "gptq" and built["calibration_texts"] > 0  # training texts
    # its model card loads it as an app would, and the code runs as pasted
    card = (out / "quantize" / "student-int4" / "README.md").read_text()
    assert "int4 onnxruntime-genai package" in card and "model builder" in card
    assert "algorithm gptq" in card and "embedding 8-bit, shared with the output head" in card
    (code,) = python_blocks(card)
    assert execute(code).startswith("The best way to sleep better is")


def test_a_genai_package_for_an_architecture_not_checked_is_refused_first(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import make_llm_tokenizer

    teacher = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        teacher)
    make_llm_tokenizer().save_pretrained(teacher)
    recipe = write_recipe(tmp_path, teacher)
    assert main(["run", str(recipe), "--output", str(tmp_path / "o"),
                 "--set", "quantize.genai=true"]) == 2
    err = capsys.readouterr().err
    assert "quantize.genai: onnxruntime-genai packages are built here for" in err
    assert "not GPT2LMHeadModel" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "teacher").exists()


def test_a_genai_package_for_a_pretrained_student_is_checked_on_its_own_architecture(
        tmp_path, tiny_llama_dir):
    """The student's config is checked, not the teacher's: a search's pretrained candidate
    (search.student_models) goes through the same check_student as student.model."""
    from dataclasses import replace

    from transformers import AutoTokenizer, GPT2Config, LlamaConfig

    from edgedistill.errors import EdgeDistillError
    from edgedistill.recipe import load_recipe
    from edgedistill.tasks import get_task

    r = load_recipe(str(write_recipe(tmp_path, tiny_llama_dir)), ["quantize.genai=true",
                                                                   "student.model=gpt2-folder"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    task = get_task(r.task)
    gpt2 = GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2,
                      architectures=["GPT2LMHeadModel"])
    with pytest.raises(EdgeDistillError, match="quantize.genai: .*not GPT2LMHeadModel"):
        task.check_student(r, gpt2, tokenizer, tokenizer, None)
    llama = LlamaConfig(vocab_size=40, hidden_size=32, num_attention_heads=2,
                        architectures=["LlamaForCausalLM"])
    task.check_student(r, llama, tokenizer, tokenizer, None)  # an architecture it builds
    task.check_student(replace(r, quantize=replace(r.quantize, genai=False)), gpt2, tokenizer,
                       tokenizer, None)
