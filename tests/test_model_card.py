"""Model cards of a run's ONNX models, the loading code they show (run here), and `push` with
the Hub's upload calls replaced: all offline, on one tiny run shared by the module."""

import contextlib
import copy
import dataclasses
import io
import json
import re

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from edgedistill import model_card as cards
from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.export import export_onnx
from edgedistill.model_card import model_card, push, write_model_cards
from edgedistill.recipe import Recipe
from edgedistill.tasks import Task, get_task
from tests.conftest import (
    LABELS,
    WORDS,
    make_bert,
    make_llama,
    make_llm_tokenizer,
    make_texts,
    make_tokenizer,
    write_tsv,
)

RECIPE = """
version: 1
name: tiny-card
data: {{source: {data}, labels: [negative, neutral, positive], max_length: 32}}
teacher: {{model: {teacher}, epochs: 1, batch_size: 16, learning_rate: 1.0e-3}}
student: {{num_layers: 2}}
distill: {{epochs: 1, batch_size: 16, learning_rate: 1.0e-3}}
bench: {{iterations: 5, min_seconds: 0.05, warmup: 1, real_length_samples: 2,
         sequence_length: 32, rounds: 1}}
"""
ONNX_FOLDERS = {"teacher-onnx": "export/teacher", "student-onnx": "export/student",
                "student-int8": "quantize/student-int8"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A whole tiny classification run (about 25 s): its folder and its report."""
    root = tmp_path_factory.mktemp("card")
    make_bert().save_pretrained(root / "teacher")
    make_tokenizer(root / "teacher").save_pretrained(root / "teacher")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.format(data=write_tsv(root / "data", 80, 30),
                                    teacher=root / "teacher"))
    out = root / "out"
    assert main(["run", str(recipe), "--output", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def rows(report):
    return {m["name"]: m for m in report["models"]}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def execute(code: str) -> str:
    """Run a card's code block here (as a reader would paste it) and return what it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<model card>", "exec"), {"__name__": "__card__"})  # noqa: S102
    return out.getvalue()


def test_a_card_is_written_into_each_onnx_model_folder(run):
    out, report = run
    written = write_model_cards(report, out)
    assert sorted(written) == sorted(out / f / "README.md" for f in ONNX_FOLDERS.values())

    card = ModelCard.load(out / "quantize" / "student-int8" / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.library_name == "transformers"
    assert {"onnx", "int8", "knowledge-distillation", "edgedistill"} <= set(card.data.tags)
    # the teacher is a local folder, not a Hub id: no base_model that would name a path
    assert card.data.base_model is None
    int8, teacher = rows(report)["student-int8"], rows(report)["teacher"]
    for m in (int8, teacher):  # both rows of the table, formatted as the report's view says
        assert f"| {m['metrics']['macro_f1']:.3f} |" in card.text
        assert f"| {m['metrics']['accuracy']:.3f} |" in card.text
    assert f"p50 **{int8['latency']['p50_ms']:.2f} ms**" in card.text
    assert f"p99 {int8['latency']['p99_ms']:.2f} ms" in card.text
    assert f"the teacher's p50 is {teacher['latency']['p50_ms']:.2f} ms" in card.text
    assert "profile `cpu`" in card.text and "batch size 1, sequence length 32" in card.text
    assert "Test split: 30 rows." in card.text
    assert "- Quantization: int8 by onnxruntime (mode dynamic" in card.text
    for section in ("## Results", "## How it was made", "## How to use", "## Limitations"):
        assert section in card.text

    # the teacher's own ONNX export is described as the teacher, not as a distilled student
    teacher_card = ModelCard.load(out / "export" / "teacher" / "README.md")
    assert "The teacher" in teacher_card.text and "Distillation:" not in teacher_card.text

    # a Hub teacher becomes the card's base_model
    hub = copy.deepcopy(report)
    hub["recipe"]["teacher"]["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    text = model_card(hub, rows(hub)["student-int8"], str(out / "quantize" / "student-int8"))
    assert ModelCard(text).data.base_model == "sentence-transformers/all-MiniLM-L6-v2"


def test_cards_find_the_models_under_the_run_folder(run):
    """report.json may hold paths relative to another working directory; a row whose folder
    is gone is skipped."""
    out, report = run
    moved = copy.deepcopy(report)
    for m in moved["models"]:
        m["path"] = "elsewhere/" + "/".join(m["path"].split("/")[-2:])
    moved["models"].append({**rows(moved)["student-int8"], "name": "student-fp16",
                            "precision": "fp16", "path": "elsewhere/quantize/student-fp16"})
    written = write_model_cards(moved, out)
    assert sorted(written) == sorted(out / f / "README.md" for f in ONNX_FOLDERS.values())
    text = (out / "quantize" / "student-int8" / "README.md").read_text()
    assert f'folder = "{out / "quantize" / "student-int8"}"' in text


def test_the_cards_loading_code_runs(run):
    out, report = run
    write_model_cards(report, out)
    for folder in ("quantize/student-int8", "export/student"):
        ort_code, pipeline_code = python_blocks((out / folder / "README.md").read_text())
        assert "import onnxruntime" in ort_code and "ORTModelForSequenceClassification" in \
            pipeline_code
        assert execute(ort_code).strip() in LABELS
        printed = execute(pipeline_code)
        assert re.search(r"'label': '(\w+)'", printed).group(1) in LABELS

    # a task that says nothing of its card still gets loading code that runs
    plain = Task()
    assert plain.pipeline_snippet("x", "model.onnx") == ""
    printed = execute(plain.onnxruntime_snippet(str(out / "export" / "student"), "model.onnx"))
    assert printed.startswith("input_ids tensor(int64)")


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo and upload_folder replaced: the calls and the files they would
    upload are recorded, nothing reaches the network."""
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"] = {"repo_id": repo_id, "token": self.token, **kw}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kw):
        calls["upload_folder"] = kw
        folder = kw["folder_path"]
        names = [p.name for p in folder.iterdir()] + ["manifest.json", "README.md.7.part"]
        calls["files"] = set(filter_repo_objects(names, allow_patterns=kw["allow_patterns"],
                                                 ignore_patterns=kw["ignore_patterns"]))
        calls["card"] = (folder / "README.md").read_text()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_model_folder_with_its_card(run, hub, monkeypatch):
    out, _ = run
    url = push(out, "someone/tiny-int8", token="hf_test", private=True)
    assert url == "https://huggingface.co/someone/tiny-int8"
    assert hub["create_repo"] == {"repo_id": "someone/tiny-int8", "token": "hf_test",
                                  "exist_ok": True, "private": True, "repo_type": "model"}
    upload = hub["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-int8"
    folder = upload["folder_path"]
    assert folder == out / "quantize" / "student-int8"
    onnx = next(p.name for p in folder.glob("*.onnx"))
    assert {"README.md", onnx, "config.json", "tokenizer.json", "ort_config.json"} <= hub["files"]
    assert "manifest.json" not in hub["files"] and "README.md.7.part" not in hub["files"]
    # the uploaded card loads the model from the repo, not from this machine's folder
    assert 'model_id = "someone/tiny-int8"' in hub["card"]
    assert 'folder = snapshot_download("someone/tiny-int8")' in hub["card"]
    assert str(out) not in "".join(python_blocks(hub["card"]))
    # its onnxruntime code runs on what the repo holds (the download stands in for the Hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(folder))
    assert execute(python_blocks(hub["card"])[0]).strip() in LABELS


def test_the_push_command(run, hub, monkeypatch, capsys):
    """`edgedistill push` takes the token huggingface_hub finds (HF_TOKEN here); without
    one it exits 2 with the one line, and nothing is sent."""
    out, _ = run
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert main(["push", str(out), "--repo-id", "someone/tiny", "--model", "student-onnx"]) == 0
    assert hub["create_repo"]["token"] == "hf_from_env" and not hub["create_repo"]["private"]
    assert hub["upload_folder"]["folder_path"] == out / "export" / "student"
    assert "uploaded student-onnx" in capsys.readouterr().out
    hub.clear()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(cards, "get_token", lambda: None)
    assert main(["push", str(out), "--repo-id", "someone/tiny"]) == 2
    assert "huggingface-cli login" in capsys.readouterr().err and not hub


def test_push_refuses_in_one_line(run, hub, tmp_path, monkeypatch):
    out, _ = run
    with pytest.raises(EdgeDistillError, match="no report.json; run the recipe first"):
        push(tmp_path, "someone/x", token="hf_test")
    with pytest.raises(EdgeDistillError, match="one of: teacher-onnx, student-onnx, "
                                               "student-int8"):
        push(out, "someone/x", model="student-int4", token="hf_test")

    card = out / "quantize" / "student-int8" / "README.md"
    before = card.read_text() if card.exists() else None
    monkeypatch.setattr(cards, "get_token", lambda: None)
    with pytest.raises(EdgeDistillError, match="huggingface-cli login.*HF_TOKEN"):
        push(out, "someone/x")
    with pytest.raises(EdgeDistillError, match="not a valid repo id"):
        push(out, "not/a/repo", token="hf_test")
    assert "create_repo" not in hub  # refused before anything was sent
    assert (card.read_text() if card.exists() else None) == before  # nor written

    def forbidden(self, **kw):
        raise HfHubHTTPError("403 Forbidden: you cannot write to someone/x\nrequest id: 1")

    monkeypatch.setattr(HfApi, "upload_folder", forbidden)
    with pytest.raises(EdgeDistillError) as e:
        push(out, "someone/x", token="hf_test")
    assert "\n" not in str(e.value) and "403 Forbidden" in str(e.value)


def test_a_causal_lm_card_and_its_loading_code(tmp_path):
    """A tiny exported Llama with a report row of the causal-LM task's shape: the card takes
    the task's pipeline, columns and loading code (an empty KV cache for the first pass)."""
    make_llama().save_pretrained(tmp_path / "llama")
    make_llm_tokenizer().save_pretrained(tmp_path / "llama")
    export_onnx(tmp_path / "llama", tmp_path / "run" / "export" / "student",
                texts=make_texts(2)[0])
    recipe = Recipe(task="causal-lm").to_dict()
    recipe["teacher"]["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def row(name, role, backend, path, perplexity, tpot):
        return {"name": name, "role": role, "backend": backend, "precision": "fp32",
                "path": str(path), "size_mb": 0.1, "profile": "cpu", "threads": 2,
                "prompt_tokens": 12, "new_tokens": 4,
                "metrics": {"perplexity": perplexity, "next_token_agreement": 0.625},
                "ttft_ms": {"p50_ms": 3.0, "p99_ms": 4.0},
                "tpot_ms": {"p50_ms": tpot, "p99_ms": 2 * tpot},
                "decode_tokens_per_s": 1000 / tpot}

    report = {"name": "tiny-lm", "task": "causal-lm", "recipe": recipe, "test_tokens": 480,
              "view": dataclasses.asdict(get_task("causal-lm").report),
              "models": [row("teacher", "teacher", "pytorch", tmp_path / "llama", 24.5, 2.5),
                         row("student-onnx", "student", "onnxruntime", "x/export/student",
                             31.25, 1.25)]}
    [path] = write_model_cards(report, tmp_path / "run")
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| 31.25 | 0.625 |" in card.text and "p50 **1.25 ms**" in card.text
    assert "prompt tokens 12, new tokens 4" in card.text and "480 test tokens" in card.text

    ort_code, pipeline_code = python_blocks(card.text)
    assert "past_key_values." in ort_code and "ORTModelForCausalLM" in pipeline_code
    vocabulary = {*WORDS, "<pad>", "<unk>", "<s>", "</s>"}
    assert execute(ort_code).strip() in vocabulary
    printed = execute(pipeline_code)
    assert "'generated_text': 'The best way to sleep better is" in printed
