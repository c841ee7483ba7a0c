from pathlib import Path

import pytest
import yaml

from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import (Recipe, apply_override, default_recipe_path, field_help,
                               load_recipe, recipe_from_dict)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.version == 1


def test_default_recipe_is_packaged_and_matches_the_repo_copy():
    assert default_recipe_path().is_file()
    assert load_recipe() == load_recipe(Path(__file__).parent.parent / "recipes" / "drug-reviews-minilm.yaml")
    r = load_recipe()
    assert (r.student.num_layers, r.data.source, r.bench.profile) == (2, "drug-reviews", "cpu")


def test_round_trip(tmp_path):
    r = load_recipe()
    r.dump(tmp_path / "out.yaml")
    assert load_recipe(tmp_path / "out.yaml") == r


def test_overrides_are_typed():
    r = load_recipe(overrides=["distill.temperature=4", "student.num_layers=3", "name=x y"])
    assert r.distill.temperature == 4.0 and isinstance(r.distill.temperature, float)
    assert r.student.num_layers == 3 and r.name == "x y"
    # YAML 1.1 reads 5e-5 (no dot) as text; a float setting takes it as the number it is
    r = load_recipe(overrides=["distill.learning_rate=5e-5", "teacher.learning_rate=1E-4"])
    assert (r.distill.learning_rate, r.teacher.learning_rate) == (5e-5, 1e-4)
    with pytest.raises(EdgeDistillError, match="expected float, got str 'nan'"):
        load_recipe(overrides=["distill.learning_rate=nan"])


@pytest.mark.parametrize("text,message", [
    ("data: [unclosed", "malformed YAML"),
    ("distill:\n  temprature: 3\n", "distill.temprature: unknown key; did you mean 'temperature'"),
    ("distill:\n  temperature: hot\n", "distill.temperature: expected float, got str"),
    ("student:\n  num_layers: 2.5\n", "student.num_layers: expected int"),
    ("teacher:\n  finetune: 1\n", "teacher.finetune: expected bool"),
    ("teacher:\n  class_weights: balance\n", "did you mean 'balanced'"),
    ("version: 9\n", "version 9 is not supported"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("data: 3\n", "data: expected a block"),
    ("data:\n  labels: positive\n", "data.labels: expected a list"),
])
def test_bad_recipes_fail_with_one_clear_line(tmp_path, text, message):
    with pytest.raises(EdgeDistillError, match=message.replace("(", r"\(")) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert "r.yaml" in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(EdgeDistillError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(EdgeDistillError, match="expected key=value"):
        load_recipe(overrides=["distill.temperature"])


def test_no_python_tags(tmp_path):
    with pytest.raises(EdgeDistillError, match="malformed YAML"):
        load_recipe(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n"))


def test_every_setting_has_help():
    rows = field_help()
    assert len(rows) > 40
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_packaged_recipes_load_by_name():
    assert load_recipe("smollm2-distill").task == "causal-lm"
    assert load_recipe("mpnet-embeddings").task == "sentence-embedding"
    assert load_recipe("reviews-ner").task == "token-classification"
    assert load_recipe("tweets-mpnet").transfer.unlabelled[0].source == "tweets"
    with pytest.raises(EdgeDistillError, match="drug-reviews-minilm, mpnet-embeddings, reviews-ner, smollm2"):
        load_recipe("smollm3-distill")


def yaml_text(*sets: str) -> str:
    """A recipe file's text that makes the ``key=value`` settings, in nested blocks."""
    raw = {}
    for item in sets:
        apply_override(raw, item)
    return yaml.safe_dump(raw)


# one setting per kind of limit: > and >= (ints, floats, an Optional, a list entry), and the
# intervals (0, 1), (0, 1], [0, 1], [0, 4]
LIMITS = [
    ("distill.epochs", -1, "distill.epochs: -1.0 must be > 0"),
    ("teacher.batch_size", 0, "teacher.batch_size: 0 must be > 0"),
    ("bench.sequence_length", 0, "bench.sequence_length: 0 must be > 0"),
    ("distill.qat_epochs", -0.5, "distill.qat_epochs: -0.5 must be >= 0"),
    ("bench.new_tokens", 1, "bench.new_tokens: 1 must be >= 2"),
    ("distill.matches", "[{loss: hidden_mse, weight: -1}]",
     "distill.matches[0].weight: -1.0 must be >= 0"),
    ("data.validation_fraction", 1, "data.validation_fraction: 1.0 must be in (0, 1)"),
    ("quantize.tolerable_loss", 0, "quantize.tolerable_loss: 0.0 must be in (0, 1)"),
    ("transfer.generate.top_p", 0, "transfer.generate.top_p: 0.0 must be in (0, 1]"),
    ("teacher.warmup_ratio", 1.5, "teacher.warmup_ratio: 1.5 must be in [0, 1]"),
    ("quantize.int4_accuracy_level", 5, "quantize.int4_accuracy_level: 5 must be in [0, 4]"),
]


def refusal(path=None, overrides=None) -> str:
    with pytest.raises(EdgeDistillError) as info:
        load_recipe(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("key, value, message", LIMITS, ids=[k for k, _, _ in LIMITS])
def test_a_setting_past_its_limit_fails_when_read(tmp_path, key, value, message):
    path = write(tmp_path, yaml_text(f"{key}={value}"))
    assert refusal(path) == f"{path}: {message}"
    assert refusal(overrides=[f"{key}={value}"]) == f"{default_recipe_path()}: {message}"


@pytest.mark.parametrize("setting", [
    "distill.qat_epochs=0", "transfer.generate.top_p=1", "teacher.warmup_ratio=0",
    "bench.new_tokens=2", "quantize.int4_accuracy_level=0", "quantize.tolerable_loss=null",
    "bench.batch_size=null", "quantize.int4_block_size=16"])
def test_limits_take_their_bounds_and_none(setting):
    load_recipe(overrides=[setting])


# rules across the fields of one block, and across blocks
RULES = [
    (["quantize.int4_block_size=48"], "quantize.int4_block_size: 48 is not a power of two"),
    (["quantize.tolerable_loss=0.01", "quantize.nodes_to_exclude=[/a/MatMul]"],
     "quantize.tolerable_loss: tuning chooses the settings and the fp32 nodes itself"),
    (["distill.qat_epochs=1", "quantize.tolerable_loss=0.01"],
     "distill.qat_epochs: accuracy-aware tuning may ship another int8 scheme"),
    (["distill.qat_epochs=1", "quantize.operators=[MatMul]"],
     "distill.qat_epochs: the simulation rounds every Linear"),
    (["transfer.generate={prompts: 4, lmbda: 0.5}", "distill.cache_teacher=true"],
     "transfer.generate.lmbda: on-policy sequences are scored by the live teacher"),
]


@pytest.mark.parametrize("sets, message", RULES, ids=[m.split(":")[0] for _, m in RULES])
def test_rules_across_settings_fail_when_read(tmp_path, sets, message):
    path = write(tmp_path, yaml_text(*sets))
    assert refusal(path).startswith(f"{path}: {message}")
    assert refusal(overrides=sets).startswith(f"{default_recipe_path()}: {message}")


def test_the_default_recipe_passes_every_check():
    assert recipe_from_dict(Recipe().to_dict()) == Recipe()
    # the default recipe file, targets included, as the pipeline re-reads it
    recipe = load_recipe()
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_packaged_recipes_state_their_report_targets():
    assert len(load_recipe().report.targets) == 4
    assert len(load_recipe("smollm2-distill").report.targets) == 4
    assert Recipe().report.targets == []


def test_help_rows_show_the_limits():
    rows = {key: text for key, _, text in field_help()}
    assert rows["distill.epochs"].endswith("Must be > 0.")
    assert rows["data.validation_fraction"].endswith("Must be in (0, 1).")
    assert rows["distill.qat_learning_rate"].endswith("Must be > 0.")
    assert rows["report.targets[].at_least"]


def test_old_distil_spellings_are_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("distill: {distil_loss: kl_divergence, alpha_distil: 0.7}\n")
    with caplog.at_level("WARNING"):
        recipe = load_recipe(path)
    assert recipe.distill.distill_loss == "kl_divergence" and recipe.distill.alpha_distill == 0.7
    assert "distill.distil_loss is the old name of distill.distill_loss" in caplog.text
    path.write_text("distill: {distil_loss: kl_divergence, distill_loss: logit_mse}\n")
    with pytest.raises(EdgeDistillError, match="are the same setting; keep distill_loss only"):
        load_recipe(path)


def test_training_arguments_take_the_old_spellings(tmp_path):
    from edgedistill.distill.trainer import DistillationTrainingArguments

    with pytest.warns(FutureWarning, match="alpha_distil is the old name of alpha_distill"):
        args = DistillationTrainingArguments(output_dir=str(tmp_path), alpha_distil=0.3,
                                             distil_loss="logit_mse", report_to="none")
    assert (args.alpha_distill, args.distill_loss) == (0.3, "logit_mse")
    assert args.alpha_distil is None and args.distil_loss is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_recipe_is_an_error_not_the_demo(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(EdgeDistillError, match="the recipe is empty; .* run `edgedistill run` "
                                               "without a recipe"):
        load_recipe(path)


def test_either_spelling_in_a_file_or_an_override_lands_on_one_key(tmp_path):
    old_file = tmp_path / "old.yaml"
    old_file.write_text("distill: {alpha_distil: 0.7}\n")
    assert load_recipe(old_file, ["distill.alpha_distill=0.2"]).distill.alpha_distill == 0.2
    assert load_recipe(None, ["distill.alpha_distil=0.3"]).distill.alpha_distill == 0.3
