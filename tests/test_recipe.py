from pathlib import Path

import pytest

from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import Recipe, default_recipe_path, field_help, load_recipe

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
    with pytest.raises(EdgeDistillError, match="drug-reviews-minilm, smollm2-distill"):
        load_recipe("smollm3-distill")
