"""What edgedistill refuses to do: run unreviewed code, unpickle, reach the network offline."""

import ast
import socket
from pathlib import Path

import pytest

import edgedistill
from edgedistill.profiles import load_profile
from edgedistill.errors import EdgeDistillError
from edgedistill.sources import PACKAGED_MODELS, package_dir, resolve_model

PACKAGE = Path(edgedistill.__file__).parent


def calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (
                    isinstance(f, ast.Name) and f.id == name):
                yield node


@pytest.mark.parametrize("source", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_pickle_no_unsafe_yaml_no_full_torch_load(source):
    tree = ast.parse(source.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "dill", "cloudpickle", "marshal"}
    for call in calls(tree, "load"):
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "yaml":
            pytest.fail(f"{source.name}:{call.lineno}: yaml.load; use yaml.safe_load")
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch":
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            assert weights_only and getattr(weights_only[0].value, "value", None) is True, \
                f"{source.name}:{call.lineno}: torch.load without weights_only=True"
    for name in ("eval", "exec"):  # the builtins, not model.eval()
        assert not [c for c in calls(tree, name) if isinstance(c.func, ast.Name)], \
            f"{source.name}: {name}()"
    assert "trust_remote_code=True" not in source.read_text()


def test_profile_names_are_names_not_paths():
    with pytest.raises(EdgeDistillError, match="profile '../recipes/drug-reviews-minilm' is unknown"):
        load_profile("../recipes/drug-reviews-minilm")


def test_offline_mode_never_opens_a_socket(monkeypatch):
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    if package_dir(PACKAGED_MODELS[hub_id][0]) is None:
        pytest.skip("the packaged offline copy is not installed")

    def no_network(*args, **kwargs):
        raise AssertionError("network access with HF_HUB_OFFLINE=1")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    path = resolve_model(hub_id)
    assert (path / "config.json").is_file() and "site-packages" in str(path)
