import pytest

from edgedistill.errors import EdgeDistillError
from edgedistill.sources import resolve_model


def test_local_folder(tiny_teacher_dir):
    assert resolve_model(str(tiny_teacher_dir)) == tiny_teacher_dir.resolve()


def test_folder_without_config(tmp_path):
    with pytest.raises(EdgeDistillError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_path():
    with pytest.raises(EdgeDistillError, match="model path does not exist"):
        resolve_model("./no/such/model")


def test_hub_id_falls_back_to_the_packaged_copy(monkeypatch, caplog):
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
    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the GGUF tokenizer names '<|im_start|>' as its end token; the model's config says 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    caplog.clear()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == path
    assert "converting" not in caplog.text
