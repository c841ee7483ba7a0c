import pytest

from edgedistill.errors import EdgeDistillError
from edgedistill.sources import _plain_byte_level, resolve_model
from tests.conftest import make_bpe_tokenizer


def test_local_folder(tiny_teacher_dir):
    assert resolve_model(str(tiny_teacher_dir)) == tiny_teacher_dir.resolve()


def test_folder_without_config(tmp_path):
    with pytest.raises(EdgeDistillError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_path():
    with pytest.raises(EdgeDistillError, match="model path does not exist"):
        resolve_model("./no/such/model")


def test_hub_id_falls_back_to_the_packaged_copy(monkeypatch, caplog):
    caplog.set_level("INFO", logger="edgedistill")  # the line is INFO: alone, caplog sees WARNING+
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (path / "model.safetensors").is_file()
    assert "offline copy" in caplog.text


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgeDistillError, match="no offline copy is known"):
        resolve_model("someone/unknown-model")


def test_a_file_that_is_not_gguf_gets_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(EdgeDistillError, match="transformers cannot read this GGUF file"):
        resolve_model(str(fake))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted kept


@pytest.mark.slow
def test_packaged_gguf_teacher_is_converted_once(tmp_path, monkeypatch, caplog):
    import json

    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    from edgedistill.sources import PACKAGED_MODELS, package_dir

    entry = PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    gguf = package_dir(entry.package) / entry.path
    older = tmp_path / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{gguf.stat().st_mtime_ns}"
    (older / "config.json").parent.mkdir(parents=True)
    (older / "config.json").write_text("{}")  # an earlier version's conversion of the same file
    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert path != older and not older.exists()  # converted again, the old copy removed
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the GGUF tokenizer names '<|im_start|>' as its end token; the model's config says 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    # written as plain byte-level BPE, which onnxruntime-genai reads (tested below on a tiny one)
    assert json.loads((path / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    text = "Café au lait, 3€ — 🙂"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # and no BOS: the file says none
    caplog.clear()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == path
    assert "converting" not in caplog.text


def test_a_gguf_byte_level_tokenizer_is_written_without_sentencepiece_parts():
    from tokenizers import decoders

    plain = make_bpe_tokenizer()
    converted = make_bpe_tokenizer()  # as transformers converts SmolLM2's GGUF tokenizer
    converted.backend_tokenizer.model.byte_fallback = True
    converted.backend_tokenizer.decoder = decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
        decoders.ByteLevel()])
    _plain_byte_level(converted)
    assert not converted.backend_tokenizer.model.byte_fallback
    assert type(converted.backend_tokenizer.decoder).__name__ == "ByteLevel"
    text = "alpha beta, Café 3€ 🙂"
    assert converted(text).input_ids == plain(text).input_ids
    assert converted.decode(converted(text).input_ids) == text
    word_level = make_bpe_tokenizer()
    word_level.backend_tokenizer.model.byte_fallback = True  # not byte-level: left alone
    word_level.backend_tokenizer.pre_tokenizer = None
    _plain_byte_level(word_level)
    assert word_level.backend_tokenizer.model.byte_fallback
