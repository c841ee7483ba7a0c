"""Causal language modelling: a decoder teacher, a decoder student with fewer blocks, scored by
perplexity and next-token agreement on held-out text and timed as whole generations (first
token, then decode steps with a KV cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..artifacts import GENAI_BACKEND
from ..bench.generation import GenerationSettings, benchmark_generation
from ..data import lm_blocks
from ..distill.trainer import check_causal_lm_settings
from ..distill.training import lm_sets
from ..evaluation import evaluate_lm
from ..quantization import quantize_int4
from ..quantization.genai import build_genai_package, check_architecture
from ..quantization.weight_only import quantize_weight_only
from ..recipe import Recipe
from ..recipe_blocks import QuantizeConfig
from ..runtime.causal_lm import OnnxCausalLM
from ..sources import resolve_model
from .base import (
    NAME_WIDTH,
    Column,
    ReportView,
    Task,
    literal,
    model_row,
    print_over_budget,
    refuse,
    snippet_opening,
)


def int4_names(q: QuantizeConfig) -> tuple[str, str]:
    """The names of (the MatMulNBits ONNX model, the onnxruntime-genai package). The int4 model a
    run ships is ``student-int4``: the package when quantize.genai is on (GPTQ weights, an 8-bit
    head shared with the embedding, fused attention: a smaller file and faster decode at the same
    perplexity, benchmarks/results/genai_package.md), the MatMulNBits model otherwise. With both
    on, the MatMulNBits model stays beside the package as ``student-int4-ort``, to compare and
    for targets that run plain onnxruntime (ort)."""
    return ("student-int4-ort" if q.genai else "student-int4"), "student-int4"


class CausalLMTask(Task):
    name = "causal-lm"
    labelled = False
    auto_model = AutoModelForCausalLM
    report = ReportView(
        columns=(Column("perplexity", "metrics.perplexity", 2),
                 Column("next-token agreement", "metrics.next_token_agreement"),
                 Column("first token p50 ms", "ttft_ms.p50_ms", 2),
                 Column("ms / token p50", "tpot_ms.p50_ms", 2),
                 Column("decode tokens/s", "decode_tokens_per_s", 1)),
        summary=("perplexity", "next-token agreement", "decode tokens/s"),
        setting=("Perplexity on {test_tokens} held-out test tokens. Generation: prompt of "
                 "{prompt_tokens} tokens, then {new_tokens} greedy tokens with a KV cache, batch "
                 "1, {threads} threads, profile `{profile}`; each model in its own process."),
        quality="metrics.perplexity", quality_label="perplexity on held-out text",
        higher_is_better=False, timing="tpot_ms", speed_label="time per generated token, ms",
        roofline_measure="first token (prefill)",
        validation="validation perplexity {perplexity:.2f}")
    hub_pipeline = "text-generation"
    ort_model_class = "ORTModelForCausalLM"
    example_text = "The best way to sleep better is"
    pipeline_options = "max_new_tokens=16, do_sample=False"

    def selection(self, cfg, data):
        # the best epoch by validation loss (the log of its perplexity); evaluation returns the
        # loss alone, since batch x length x vocabulary logits would not fit in memory
        return dict(metric_for_best_model="loss", greater_is_better=False,
                    prediction_loss_only=True, per_device_eval_batch_size=cfg.batch_size)

    def training_sets(self, tokenizer, args, data, data_cfg, **kw):
        return lm_sets(tokenizer, args, data, data_cfg, **kw)

    def onnxruntime_snippet(self, location: str, file_name: str) -> str:
        # one forward pass over the prompt; the graph takes a KV cache, so the first step
        # feeds an empty one (past length 0, heads and head size from the graph's inputs)
        return "\n".join([
            *snippet_opening(location, file_name),
            f'ids = tokenizer([{literal(self.example_text)}], return_tensors="np")["input_ids"]',
            "ids = ids.astype(np.int64)",
            'feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),',
            '        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}',
            "for i in session.get_inputs():",
            '    if i.name.startswith("past_key_values."):',
            "        _, heads, _, size = i.shape",
            '        dtype = np.float16 if i.type == "tensor(float16)" else np.float32',
            "        feed[i.name] = np.zeros((1, heads, 0, size), dtype)",
            "names = {i.name for i in session.get_inputs()}",
            "logits = session.run(None, {k: v for k, v in feed.items() if k in names})[0]",
            "print(tokenizer.decode([int(logits[0, -1].argmax())]))"])

    def genai_snippet(self, location: str) -> str:
        # a local folder or a downloaded repo: onnxruntime-genai reads folders only
        return "\n".join([
            "import onnxruntime_genai as og", "",
            f"model = og.Model({literal(location)})",
            "tokenizer = og.Tokenizer(model)",
            "params = og.GeneratorParams(model)",
            "params.set_search_options(max_length=64, do_sample=False)",
            "generator = og.Generator(model, params)",
            f"generator.append_tokens(tokenizer.encode({literal(self.example_text)}))",
            "while not generator.is_done():",
            "    generator.generate_next_token()",
            "print(tokenizer.decode(generator.get_sequence(0)))"])

    # ------------------------------------------------------------------ preflight

    def check(self, r: Recipe) -> None:
        check_causal_lm_settings(r.distill, "distill.")
        q, aug = r.quantize, r.transfer.augment
        refuse(r.teacher.class_weights != "none", "teacher.class_weights: a causal LM has no "
               "classes; leave it unset")
        refuse(q.mode == "static", "quantize.mode: static calibration of a decoder with a KV "
               "cache is not supported yet; use dynamic (or int4: true)")
        refuse(q.tolerable_loss is not None, "quantize.tolerable_loss: accuracy-aware tuning "
               "is for classifiers (it judges on validation labels); remove it")
        refuse(bool(r.distill.qat_epochs), "distill.qat_epochs: quantization-aware "
               "distillation is for classifiers; a language model's int4 path calibrates with "
               "GPTQ (quantize.int4_algorithm: gptq)")
        refuse(bool(aug.factor or aug.paraphrases), "transfer.augment.factor: augmentation is "
               "for classifiers; a language model learns from teacher generations "
               "(transfer.generate.prompts)")
        if q.genai and not r.student.model:  # cut from the teacher: the teacher's architecture
            config = AutoConfig.from_pretrained(resolve_model(r.teacher.model),
                                                trust_remote_code=r.teacher.trust_remote_code)
            check_architecture(config.to_dict(), "quantize.genai")

    def check_student(self, r: Recipe, config, teacher_tokenizer, student_tokenizer, labels):
        super().check_student(r, config, teacher_tokenizer, student_tokenizer, labels)
        if r.quantize.genai:  # here, not in check: a search's pretrained candidates come too
            check_architecture(config.to_dict(), "quantize.genai")

    def needs_calibration(self, q: QuantizeConfig, runtimes) -> bool:
        return ((q.int4 or q.genai) and q.int4_algorithm == "gptq") or q.pytorch_int4 in (
            "gptq", "awq")

    # ------------------------------------------------------------------ stages

    def quantize(self, run, onnx_dir: Path, out: Path, student_dir: Path) -> dict:
        record = super().quantize(run, onnx_dir, out, student_dir)
        q, length, texts = run.recipe.quantize, run.recipe.data.max_length, run.calibration
        matmulnbits, package = int4_names(q)
        if q.int4:
            record["int4"] = quantize_int4(
                onnx_dir, out / matmulnbits, q.int4_block_size, q.int4_accuracy_level,
                algorithm=q.int4_algorithm, calibration_texts=texts,
                calibration_samples=q.calibration_samples, max_length=length)
        if q.genai:
            record["genai"] = build_genai_package(
                student_dir, out / package, q.int4_block_size, q.int4_accuracy_level,
                algorithm=q.int4_algorithm, calibration_texts=texts or (),
                calibration_samples=q.calibration_samples, max_length=length)
        if q.pytorch_int4:
            record["pytorch_int4"] = quantize_weight_only(
                student_dir, out / "student-int4-pytorch", q.pytorch_int4,
                group_size=q.int4_block_size, calibration_texts=texts or (),
                calibration_samples=q.calibration_samples, max_length=length)
        return record

    def models(self, run, teacher, student, exported, quantized) -> list[dict]:
        models = super().models(run, teacher, student, exported, quantized)
        q = run.recipe.quantize
        matmulnbits, package = int4_names(q)
        if q.int4:
            models.append(model_row(matmulnbits, "student", "onnxruntime", "int4",
                                    quantized / matmulnbits))
        if q.genai:
            models.append(model_row(package, "student", GENAI_BACKEND, "int4",
                                    quantized / package))
        if q.pytorch_int4:
            models.append(model_row("student-int4-pytorch", "student", "pytorch", "int4",
                                    quantized / "student-int4-pytorch"))
        return models

    def _test_blocks(self, run, model_dir: Path):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return tokenizer, lm_blocks(run.data.test, tokenizer, run.recipe.data.max_length)

    def evaluate(self, run, models: list[dict]) -> dict:
        cfg = run.recipe.evaluate
        tokenizer, blocks = self._test_blocks(run, models[0]["path"])
        ids = np.asarray(blocks["input_ids"])
        # prompts: the first words of test texts the blocks start with
        prompts = [row[:16] for row in tokenizer(list(run.data.test["text"][:cfg.generations]),
                                                 add_special_tokens=False)["input_ids"]]
        results, reference = {}, None
        for m in models:
            metrics = evaluate_lm(m["path"], ids, cfg.batch_size, reference, prompts,
                                  cfg.generation_tokens, tokenizer.eos_token_id,
                                  desc=f"perplexity {m['name']}")
            if reference is None:
                reference = metrics["predictions"]
                metrics["next_token_agreement"] = 1.0
            if m["backend"] == GENAI_BACKEND:  # its Generator vs onnxruntime, same graph
                plain = OnnxCausalLM(m["path"])
                metrics["same_tokens_as_onnxruntime"] = float(np.mean([
                    plain.greedy([p], cfg.generation_tokens, tokenizer.eos_token_id) == g
                    for p, g in zip(prompts, metrics["generations"])])) if prompts else None
            metrics["generations"] = [
                {"prompt": tokenizer.decode(p), "continuation": tokenizer.decode(g)}
                for p, g in zip(prompts, metrics["generations"])]
            results[m["name"]] = metrics
            run.console.print(f"  {m['name']:<{NAME_WIDTH}} perplexity {metrics['perplexity']:.2f}  "
                              f"next-token agreement {metrics['next_token_agreement']:.3f}")
        return {"test_blocks": len(ids), "test_tokens": int(ids.size), "models": results}

    def bench(self, run, models: list[dict]) -> dict:
        b = run.recipe.bench
        _, blocks = self._test_blocks(run, models[0]["path"])
        # a timed run is one whole generation: prompt, first token, new_tokens decode steps
        settings = GenerationSettings(prompt_tokens=b.sequence_length, new_tokens=b.new_tokens,
                                      warmup=b.warmup, iterations=b.iterations, rounds=b.rounds)
        prompt = [t for row in blocks["input_ids"] for t in row][:b.sequence_length]
        results = benchmark_generation([m["path"] for m in models], run.target, prompt,
                                       settings)
        for m, result in zip(models, results):
            if not print_over_budget(run.console, m["name"], result):
                run.console.print(
                    f"  {m['name']:<{NAME_WIDTH}} first token {result['ttft_ms']['p50_ms']:.1f} ms  "
                    f"{result['decode_tokens_per_s']:.1f} tokens/s  "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB")
        return {"models": {m["name"]: r for m, r in zip(models, results)}}
