"""onnxruntime-genai packages built by its model builder from tiny random decoders: what the
builder writes computes what transformers computes, the int4 package keeps one matrix (8 or 4
bits) for the embedding and the tied head, GPTQ's weights reach it as Intel Neural Compressor
rounded them, an app-style generation runs, and what cannot be built is refused in one line
with nothing left behind."""

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
import transformers

from edgedistill.artifacts import onnx_file, size_on_disk_mb
from edgedistill.errors import EdgeDistillError
from edgedistill.quantization.genai import ARCHITECTURES, build_genai_package
from edgedistill.runtime.causal_lm import GenaiCausalLM, OnnxCausalLM, load_causal_lm
from tests.conftest import make_bpe_tokenizer, make_llama, make_llm_tokenizer


def tiny_decoder(folder, architecture: str):
    """A two-block decoder of ``architecture`` whose weights are scaled up, so greedy decoding
    wanders over the vocabulary instead of repeating one token."""
    tokenizer = make_bpe_tokenizer()
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_fp32_package_generates_what_transformers_generates(tmp_path, architecture):
    model, tokenizer = tiny_decoder(tmp_path / "model", architecture)
    record = build_genai_package(tmp_path / "model", tmp_path / "genai", precision="fp32")
    assert record["precision"] == "fp32" and (tmp_path / "genai" / "genai_config.json").is_file()
    prompt = np.array([tokenizer("the cat saw a dog")["input_ids"]])
    ids = torch.from_numpy(prompt)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=16, min_new_tokens=16)[0, prompt.shape[1]:].tolist()
    package = load_causal_lm(tmp_path / "genai")
    assert isinstance(package, GenaiCausalLM)
    assert package.greedy(prompt, 16) == expected
    # the same graph on a plain onnxruntime session, and its logits at every position
    assert OnnxCausalLM(tmp_path / "genai").greedy(prompt, 16) == expected
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    np.testing.assert_allclose(package.logits(prompt), reference, atol=1e-3)


@pytest.mark.parametrize("head_bits", [8, 4])
def test_the_int4_package_shares_one_matrix_and_generates_like_an_app(tmp_path, head_bits):
    tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    fp32 = build_genai_package(tmp_path / "model", tmp_path / "fp32", precision="fp32")
    record = build_genai_package(tmp_path / "model", tmp_path / "int4", block_size=16,
                                 head_bits=head_bits)
    assert record["embedding"] == f"{head_bits}-bit, shared with the output head"
    graph = onnx.load(str(onnx_file(tmp_path / "int4"))).graph
    producer = {out: n for n in graph.node for out in n.output}
    head = [n for n in graph.node if n.op_type == "MatMulNBits"][-1]
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    table = producer[gather.input[0]]  # the head's packed weight, reshaped into rows
    assert table.op_type == "Reshape" and table.input[0] == head.input[1]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in (head, gather)}
    assert set(bits.values()) == {head_bits}
    vocab = len(make_bpe_tokenizer())
    assert not [t.name for t in graph.initializer if list(t.dims) == [vocab, 64]]  # no float table
    assert record["size_mb"] == pytest.approx(size_on_disk_mb(tmp_path / "int4"), abs=1e-3)
    assert record["size_mb"] < 0.35 * fp32["size_mb"]

    # an app's loop: the package's own tokenizer, onnxruntime-genai's greedy search
    model = og.Model(str(tmp_path / "int4"))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24, do_sample=False)
    generator = og.Generator(model, params)
    prompt = tokenizer.encode("the cat saw a dog")
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    new = list(generator.get_sequence(0))[len(prompt):]
    assert len(new) == 24 - len(prompt)
    assert isinstance(tokenizer.decode(new), str)
    assert load_causal_lm(tmp_path / "int4").greedy(np.array([prompt]), len(new)) == new


def test_float_4bit_weights_keep_the_8bit_head_in_int8_and_generate(tmp_path):
    model, tokenizer = tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    record = build_genai_package(tmp_path / "model", tmp_path / "int4", block_size=16,
                                 accuracy_level=0)
    assert record["accuracy_level"] == 0 and record["head_accuracy_level"] == 4
    graph = onnx.load(str(onnx_file(tmp_path / "int4"))).graph
    levels = {(a["bits"], a.get("accuracy_level", 0)) for a in (
        {x.name: x.i for x in n.attribute} for n in graph.node if n.op_type == "MatMulNBits")}
    assert levels == {(4, 0), (8, 4)}
    prompt = np.array([tokenizer("the cat saw a dog")["input_ids"]])
    # the edited graph still reads the builder's weights file, and its Generator runs it
    assert len(load_causal_lm(tmp_path / "int4").greedy(prompt, 8)) == 8


def test_gptq_weights_reach_the_package_as_neural_compressor_rounded_them(tmp_path):
    """The builder reads INC's GPTQ checkpoint once it is rewritten into AutoGPTQ's form: the
    package computes what INC's own model computes, up to the package's 8-bit head (a zero
    point or group index read wrongly would move every weight by a rounding step)."""
    from edgedistill.quantization.weight_only import quantize_weight_only
    from edgedistill.runtime.weight_only import load_weight_only

    model, tokenizer = tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    texts = ["the cat saw a dog and the dog saw a bird", "a bird sat on the big red house"] * 4
    record = build_genai_package(tmp_path / "model", tmp_path / "gptq", block_size=16,
                                 algorithm="gptq", calibration_texts=texts,
                                 calibration_samples=8)
    assert record["algorithm"] == "gptq" and record["calibration_texts"] == 8
    graph = onnx.load(str(onnx_file(tmp_path / "gptq"))).graph
    blocks = [n for n in graph.node if n.op_type == "MatMulNBits"][:-1]
    assert blocks and all(len(n.input) == 4 for n in blocks)  # INC's zero points, asymmetric
    quantize_weight_only(tmp_path / "model", tmp_path / "inc", "gptq", group_size=16,
                         calibration_texts=texts, calibration_samples=8)
    prompt = np.array([tokenizer("the cat saw a big dog")["input_ids"]])
    with torch.no_grad():
        inc = load_weight_only(tmp_path / "inc")(torch.from_numpy(prompt)).logits.numpy()
        fp32 = model(torch.from_numpy(prompt)).logits.numpy()
    package = load_causal_lm(tmp_path / "gptq").logits(prompt)
    off_inc, off_fp32 = np.abs(package - inc).mean(), np.abs(package - fp32).mean()
    assert off_inc < 0.5 * off_fp32, (off_inc, off_fp32)


def test_an_unknown_rounding_is_one_line_and_nothing_is_built(tmp_path):
    tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    with pytest.raises(EdgeDistillError, match="genai algorithm: 'awq' is unknown; valid: rtn, "
                                               "gptq"):
        build_genai_package(tmp_path / "model", tmp_path / "genai", algorithm="awq")
    with pytest.raises(EdgeDistillError, match="no calibration texts"):
        build_genai_package(tmp_path / "model", tmp_path / "genai", block_size=16,
                            algorithm="gptq")
    assert not (tmp_path / "genai").exists()


def test_an_architecture_not_checked_is_refused_before_building(tmp_path):
    config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(EdgeDistillError, match="built here for LlamaForCausalLM, .*not "
                                               "GPT2LMHeadModel; set quantize.genai: false"):
        build_genai_package(tmp_path / "gpt2", tmp_path / "genai")
    assert not (tmp_path / "genai").exists()


def test_a_tokenizer_onnxruntime_genai_cannot_read_is_one_line_and_nothing_stays(tmp_path):
    # a word-level tokenizer: onnxruntime-genai reads no such tokenizer.json
    make_llama(hidden=64).save_pretrained(tmp_path / "llama")
    make_llm_tokenizer().save_pretrained(tmp_path / "llama")
    with pytest.raises(EdgeDistillError) as e:
        build_genai_package(tmp_path / "llama", tmp_path / "genai")
    # onnxruntime-genai misparses it: an error, other ids or a crash, by the run; each refused
    assert "onnxruntime-genai" in str(e.value) and "this tokenizer" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "genai").exists()


def test_an_existing_folder_is_not_overwritten(tmp_path, tiny_llama_bpe_dir):
    (tmp_path / "genai").mkdir()
    (tmp_path / "genai" / "keep.txt").write_text("mine")
    with pytest.raises(EdgeDistillError, match="already exists"):
        build_genai_package(tiny_llama_bpe_dir, tmp_path / "genai")
    assert (tmp_path / "genai" / "keep.txt").read_text() == "mine"


def test_heads_the_attention_kernel_cannot_run_are_refused(tmp_path, tiny_llama_dir):
    # tiny_llama_dir: 32 hidden units over 4 heads, 8 dimensions each
    with pytest.raises(EdgeDistillError, match="attention heads of 8 dimensions"):
        build_genai_package(tiny_llama_dir, tmp_path / "genai")


def test_the_cli_packages_a_transformers_folder_with_the_recipes_settings(tmp_path, capsys):
    from edgedistill.cli import main

    tiny_decoder(tmp_path / "model", "LlamaForCausalLM")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat saw a dog and the dog saw a bird\n\na bird sat on the red house\n")
    out, model = tmp_path / "genai", str(tmp_path / "model")
    # GPTQ without texts to calibrate on: one line naming the flag, nothing written
    assert main(["quantize", model, str(out), "--genai", "--algorithm", "gptq"]) == 2
    assert "--algorithm gptq: it calibrates on training texts; give --calibration-texts" in (
        capsys.readouterr().err)
    assert main(["quantize", model, str(out), "--genai", "--accuracy-level", "7"]) == 2
    assert "quantize.int4_accuracy_level: 7 must be in [0, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a package or a MatMulNBits model, not both
        main(["quantize", model, str(out), "--genai", "--int4"])
    assert not out.exists()
    assert main(["quantize", model, str(out), "--genai", "--block-size", "16", "--algorithm",
                 "gptq", "--calibration-texts", str(texts), "--accuracy-level", "0"]) == 0
    printed = capsys.readouterr().out
    assert "'algorithm': 'gptq'" in printed and "'calibration_texts': 2" in printed
    graph = onnx.load(str(onnx_file(out))).graph
    levels = {(a["bits"], a.get("accuracy_level", 0)) for a in (
        {x.name: x.i for x in n.attribute} for n in graph.node if n.op_type == "MatMulNBits")}
    assert levels == {(4, 0), (8, 4)}  # the 8-bit head computes in int8 whatever is asked
    # GPTQ's zero points (asymmetric), calibrated on the file's two non-empty lines
    assert all(len(n.input) == 4 for n in graph.node if n.op_type == "MatMulNBits"
               and ({x.name: x.i for x in n.attribute}["bits"] == 4))
