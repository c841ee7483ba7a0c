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
