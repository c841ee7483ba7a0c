"""Model cards for a run's ONNX models, and pushing one to the Hugging Face Hub.

A card is the README.md of a model folder in the Hub's format: YAML metadata (base model,
pipeline tag, tags) over what the model is, its metrics beside the teacher's, its latency on
the profile, the recipe, how to load it and its limits. Everything comes from the run's
report.json and from the run's task (its pipeline, optimum class and loading code), so one
writer serves every task.
"""

from __future__ import annotations

import collections
import html
import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .artifacts import GENAI_BACKEND, GENAI_CONFIG, SIDECAR_FILES, onnx_file, write_atomic
from .distill.losses import embedding_losses
from .errors import EdgeDistillError
from .recipe_blocks import StudentConfig
from .report import fmt, value_at
from .sources import looks_like_hub_id
from .tasks import get_task

CARD_FILE = "README.md"  # a model folder's card, as the Hub reads it

# What a push uploads from a model folder: the graph (and its external weights), what loading
# needs beside it, the card. Not run records (manifest.json, quantize_config.json) nor the
# temporary files of an interrupted write.
UPLOAD_PATTERNS = ["*.onnx", "*.onnx_data", "*.onnx.data", "ort_config.json", GENAI_CONFIG,
                   CARD_FILE, *SIDECAR_FILES]
IGNORE_PATTERNS = ["*.part", "*.partial", "*.tmp"]

# the Hub's library tags name modelling libraries, not formats: transformers loads the config
# and tokenizer and runs pipeline(); the "onnx" tag says what format the weights are in
LIBRARY_NAME = "transformers"


def _count(n: float) -> str:
    """A parameter count as people write it: 22.7M, 38.3K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _hub_id(ref: str | None) -> str | None:
    """``ref`` where it names a Hub repository (``owner/name``), else None: a local folder or a
    packaged name is no valid ``base_model`` / ``datasets`` metadata."""
    if not ref or not looks_like_hub_id(ref) or Path(ref).exists():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def _teacher_row(report: dict) -> dict:
    # the report lists the teacher first: the reference its agreement is measured against
    return next((m for m in report["models"] if m["role"] == "teacher"), report["models"][0])


def _file_name(model: dict, location: str) -> str:
    for folder in (model["path"], location):
        found = onnx_file(folder) if Path(folder).is_dir() else None
        if found:
            return found.name
    raise EdgeDistillError(f"model card: no .onnx file in {model['path']} or {location}; pass "
                           "file_name")


# ------------------------------------------------------------------------------ the card

def model_card(report: dict, model: dict, location: str, file_name: str | None = None) -> str:
    """The README.md of one ONNX model row of ``report`` (a run's report.json). ``location``
    is what its loading code passes to ``from_pretrained``: a folder, or a Hub repo id;
    ``file_name`` is the ONNX file's name, found in the model's folder when not given."""
    task, recipe = get_task(report["task"]), report["recipe"]
    file_name = file_name or _file_name(model, location)
    data = ModelCardData(
        base_model=_hub_id(recipe["teacher"]["model"]), datasets=_hub_id(recipe["data"]["source"]),
        library_name=LIBRARY_NAME, pipeline_tag=task.hub_pipeline or None,
        tags=["onnx", "optimum", model["precision"], "knowledge-distillation", "edgedistill"])
    sections = [
        f"# {html.escape(report['name'])}: {model['name']}", "", _what(report, model, file_name),
        "", "## Results", "", *_results(report, model),
        "", "## How it was made", "", *_recipe_lines(report, model),
        "", "## How to use", "", *_usage(task, location, file_name, model),
        "", "## Limitations", "", *[f"- {line}" for line in _limitations(report, model)], ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)).content


def _what(report: dict, model: dict, file_name: str) -> str:
    recipe, task = report["recipe"], get_task(report["task"])
    distill = report.get("training", {}).get("distill", {})
    what = task.hub_pipeline or f"the `{report['task']}` task"
    teacher = f"`{recipe['teacher']['model']}`"
    ours, theirs = distill.get("parameters"), distill.get("teacher_parameters")
    if model["role"] == "teacher":
        line = (f"The teacher {teacher} for {what}, exported to ONNX ({model['precision']}): "
                "the reference the distilled students of this run are measured against.")
        line += f" {_count(theirs)} parameters." if theirs else ""
    else:
        kind = "onnxruntime-genai package" if model["backend"] == GENAI_BACKEND else "ONNX model"
        line = (f"An {model['precision']} {kind} for {what}, distilled from {teacher} with "
                "[edgedistill](https://pypi.org/project/edgedistill/).")
        if ours:
            share = f" ({ours / theirs:.0%} of the teacher's)" if theirs else ""
            line += f" {_count(ours)} parameters{share}."
    if model.get("size_mb"):
        line += f" `{file_name}` is {model['size_mb']:.2f} MB."
    runtime = ("onnxruntime-genai's Generator" if model["backend"] == GENAI_BACKEND
               else "onnxruntime")
    return line + f" It runs on {runtime} without PyTorch."


def _results(report: dict, model: dict) -> list[str]:
    """The setting sentence, the task's columns for the teacher and this model, then the
    latency on the profile."""
    view, teacher = report["view"], _teacher_row(report)
    fields = collections.defaultdict(lambda: None, {**model, **report})
    lines = [view["setting"].format_map(fields), ""]
    headers = ["model", "precision", *[c["header"] for c in view["columns"]], "size MB"]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    rows = [teacher] if teacher is model else [teacher, model]
    for m in rows:
        name = f"**{m['name']}** (this model)" if m is model else m["name"]
        cells = [name, m["precision"], *(fmt(value_at(m, c["path"]), c["digits"])
                                         for c in view["columns"]), fmt(m.get("size_mb"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    timing = model.get(view["timing"]) or {}
    if timing.get("p50_ms"):
        env = report.get("environment", {})
        stands_for = (model.get("constraints") or {}).get("target")
        line = (f"Latency on profile `{model.get('profile')}`"
                + (f" ({stands_for})" if stands_for else "")
                + f", {model.get('threads')} threads, measured on {env.get('cpu', 'the host')}: "
                f"p50 **{timing['p50_ms']:.2f} ms**, p99 {fmt(timing.get('p99_ms'), 2)} ms "
                f"({view['speed_label']})")
        shape = [f"{key.replace('_', ' ')} {model[key]}" for key in
                 ("batch_size", "sequence_length", "prompt_tokens", "new_tokens") if key in model]
        line += f", {', '.join(shape)}" if shape else ""
        reference = value_at(teacher, f"{view['timing']}.p50_ms")
        if reference and teacher is not model:
            line += (f"; the teacher's p50 is {reference:.2f} ms, "
                     f"{reference / timing['p50_ms']:.1f}x this model's")
        lines += ["", line + "."]
    return lines


def _recipe_lines(report: dict, model: dict) -> list[str]:
    recipe = report["recipe"]
    t, s, d, data = recipe["teacher"], recipe["student"], recipe["distill"], recipe["data"]
    training = report.get("training", {})
    tuned = "fine-tuned on the task first" if training.get("teacher", {}).get("finetuned") \
        else "used as it is"
    lines = [f"- Teacher: `{t['model']}`, {tuned}."]
    if model["role"] != "teacher":
        student = StudentConfig(**{k: v for k, v in s.items()
                                   if k in StudentConfig.__dataclass_fields__})
        blocks = student.layer_ids or student.layers
        n = len(student.layer_ids) if student.layer_ids else student.depth()
        if student.model:
            shape = f"the pretrained `{student.model}`" + (
                f", {n} of its blocks ({blocks})" if student.cuts_model() else "")
        elif student.init == "random":
            shape = f"{student.depth()} randomly initialised blocks {student.config or ''}"
        else:
            layers = training.get("distill", {}).get("teacher_layers") or blocks
            shape = f"{n} blocks initialised from teacher layers {layers}" + (
                f", narrowed to {student.config}" if student.init == "pruned" else "")
        lines.append(f"- Student: {shape.strip()}.")
        matches = ", ".join(m["loss"] for m in d.get("matches", []))
        # an embedding loss has no temperature and no hard labels beside it
        target = (f"between the student's and the teacher's sentence embeddings (weight "
                  f"{d['alpha_distill']:g})" if d["distill_loss"] in embedding_losses() else
                  f"on the teacher's outputs at temperature {d['temperature']:g} (weight "
                  f"{d['alpha_distill']:g}; hard labels {d['alpha_ce']:g})")
        lines.append(
            f"- Distillation: `{d['distill_loss']}` {target}"
            + (f", layer losses {matches}" if matches else "")
            + f"; {d['epochs']:g} epochs, batch {d['batch_size']}, learning rate "
            f"{d['learning_rate']:g}.")
    lines.append(f"- Data: split `{data['train_split']}` of `{data['source']}`, texts cut to "
                 f"{data['max_length']} tokens.")
    quantization = _quantization(report, model)
    if quantization:
        lines.append(f"- Quantization: {quantization}.")
    return lines


# the settings a quantization record shows, where it has them
QUANT_KEYS = ("mode", "calibration", "calibration_samples", "preset", "per_channel", "algorithm",
              "bits", "block_size", "accuracy_level", "embedding")


def _quantization(report: dict, model: dict) -> str:
    """How this model's weights were made smaller: the int8 record is the quantize stage's
    own, the other precisions' records sit under their name (int4, fp16)."""
    if model["precision"] == "fp32":
        return ""
    q = report.get("quantization") or {}
    record = (q.get("genai") if model["backend"] == GENAI_BACKEND else
              q if model["precision"] == "int8" else q.get(model["precision"])) or {}
    settings = [f"{k.replace('_', ' ')} {_setting(record[k])}" for k in QUANT_KEYS
                if k in record]
    by = "onnxruntime-genai's model builder" if model["backend"] == GENAI_BACKEND else "onnxruntime"
    return f"{model['precision']} by {by}" + (f" ({', '.join(settings)})" if settings else "")


def _setting(value) -> str:
    return "on" if value is True else "off" if value is False else str(value)


def _usage(task, location: str, file_name: str, model: dict) -> list[str]:
    if model["backend"] == GENAI_BACKEND:
        return ["With onnxruntime-genai (`pip install onnxruntime-genai`), as an app runs it:",
                "", "```python", task.genai_snippet(location), "```"]
    lines = ["With onnxruntime alone (`pip install onnxruntime transformers`):", "",
             "```python", task.onnxruntime_snippet(location, file_name), "```"]
    pipeline = task.pipeline_snippet(location, file_name)
    if pipeline:
        lines += ["", ("With optimum and a transformers `pipeline()` "
                       "(`pip install optimum-onnx transformers`):"), "",
                  "```python", pipeline, "```"]
    return lines


def _limitations(report: dict, model: dict) -> list[str]:
    view, data, teacher = report["view"], report["recipe"]["data"], _teacher_row(report)
    test = (f"{report['test_rows']} test rows" if report.get("test_rows")
            else f"{report.get('test_tokens')} test tokens")
    lines = [
        (f"Trained on split `{data['train_split']}` of `{data['source']}` only: its quality "
         "on other text (another domain, language or length) was not measured; evaluate it "
         "on your own data first."),
        (f"The numbers above come from one run on {test}; a small test set gives wide error "
         f"bars. Inputs longer than {data['max_length']} tokens were never seen in training "
         "or testing.")]
    if model["role"] != "teacher":
        quality = value_at(model, view["quality"])
        reference = value_at(teacher, view["quality"])
        digits = next((c["digits"] for c in view["columns"] if c["path"] == view["quality"]), 3)
        agreement = [f"{c['header']} {fmt(value_at(model, c['path']), c['digits'])}"
                     for c in view["columns"] if "agreement" in c["header"]]
        lines.append(
            f"It imitates its teacher, mistakes and biases included: {view['quality_label']} "
            f"{fmt(quality, digits)} against the teacher's {fmt(reference, digits)}"
            + (f", {', '.join(agreement)} with it" if agreement else "") + ".")
    if model["precision"] != "fp32":
        lines.append(f"Its {model['precision']} weights round the fp32 model's: on inputs unlike "
                     "the test set the two may disagree more often than measured here.")
    tuning = (report.get("quantization") or {}).get("tuning")
    if model["precision"] == "int8" and tuning and not tuning.get("passed"):
        lines.append(f"Accuracy-aware tuning found no int8 setting within "
                     f"{tuning['tolerable_loss']:.1%} of fp32: this is the untuned default.")
    lines.append("Latency depends on the hardware, threads and input shape: the figures above "
                 "hold for the profile and host they name.")
    if model.get("over_budget"):
        lines.append(f"Profile budget: {model['over_budget']}")
    return lines + list(report.get("warnings", []))


# ------------------------------------------------------------------------------ writing

def _folder(run_dir: Path, path: str) -> Path | None:
    """Where a report row's model folder is now. report.json keeps paths as the run wrote them
    (maybe relative to that run's working directory), so the run folder's <stage>/<model>
    comes first."""
    path = Path(path)
    for folder in (run_dir / path.parent.name / path.name, path):
        if folder.is_dir() and onnx_file(folder):
            return folder
    return None


def _onnx_models(report: dict, run_dir: Path) -> dict[str, Path]:
    """The run's ONNX models whose folders still exist, by name."""
    folders = {m["name"]: _folder(run_dir, m["path"]) for m in report["models"]
               if m["backend"] in ("onnxruntime", GENAI_BACKEND)}
    return {name: folder for name, folder in folders.items() if folder}


def write_model_cards(report: dict, run_dir: str | Path) -> list[Path]:
    """Write README.md (the model card) into each ONNX model folder of the run; the loading
    code names that folder. Rows whose folder is gone are skipped."""
    rows = {m["name"]: m for m in report["models"]}
    written = []
    for name, folder in _onnx_models(report, Path(run_dir)).items():
        card = model_card(report, rows[name], str(folder), onnx_file(folder).name)
        write_atomic(folder / CARD_FILE, card)
        written.append(folder / CARD_FILE)
    return written


def push(run_dir: str | Path, repo_id: str, model: str = "student-int8",
         token: str | None = None, private: bool = False) -> str:
    """Upload the run's ``model`` folder with its card (its loading code naming ``repo_id``)
    to the Hub model repo ``repo_id``, created if missing; returns the repo's URL. Nothing but
    the card is written to the run folder, and only once the upload can start."""
    run_dir = Path(run_dir)
    if not (run_dir / "report.json").is_file():
        raise EdgeDistillError(f"push: {run_dir} has no report.json; run the recipe first "
                               f"(edgedistill run RECIPE --output {run_dir})")
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    models = _onnx_models(report, run_dir)
    if model not in models:
        raise EdgeDistillError(f"push: {run_dir} has no ONNX model '{model}'; choose one of: "
                               f"{', '.join(models) or 'none (export them first)'}")
    token = token or get_token()
    if not token:
        raise EdgeDistillError("push: no Hugging Face token; run `huggingface-cli login` or set "
                               "HF_TOKEN to a token with write access")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise EdgeDistillError(f"push: --repo-id '{repo_id}' is not a valid repo id "
                               f"({str(e).splitlines()[0]}); use owner/name") from None
    folder = models[model]
    row = next(m for m in report["models"] if m["name"] == model)
    write_atomic(folder / CARD_FILE, model_card(report, row, repo_id, onnx_file(folder).name))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message=f"edgedistill: {model} of run {report['name']}",
                          allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                          # a graph left from an earlier push (another file name) would
                          # leave two models in the repo
                          delete_patterns=["*.onnx", "*.onnx_data"])
    except (HfHubHTTPError, OSError) as e:  # requests' errors are OSErrors too
        raise EdgeDistillError(f"push: uploading {folder} to {repo_id} failed: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                               "check the token's write access and the network") from None
    return str(url)
