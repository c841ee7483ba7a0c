import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgedistill.distill.features import forward_with_features
from edgedistill.distill.matching import layer_map, resolve_matches
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_bert


def test_layer_map_strategies():
    assert layer_map("uniform", 2, 6) == [(1, 3), (2, 6)]
    assert layer_map("uniform", 2, 6, kept=[0, 5]) == [(1, 1), (2, 6)]
    assert layer_map("skip", 3, 12) == [(1, 4), (2, 8), (3, 12)]      # PKD-Skip
    assert layer_map("skip", 4, 6) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert layer_map("last", 2, 6) == [(1, 5), (2, 6)]                  # PKD-Last
    with pytest.raises(EdgeDistillError, match="valid: uniform, skip, last"):
        layer_map("random", 2, 6)
    with pytest.raises(EdgeDistillError, match="at most the teacher's"):
        layer_map("last", 8, 6)


def configs(student_hidden=32, student_heads=4):
    teacher = make_bert(num_layers=6, hidden=32).config
    student = make_bert(num_layers=2, hidden=student_hidden).config
    student.num_attention_heads = student_heads
    return student, teacher


def test_resolve_matches_builds_pairs_and_defaults():
    s, t = configs()
    matches = resolve_matches([
        {"loss": "hidden_mse", "strategy": "uniform", "weight": 1.0},
        {"loss": "hidden_mse", "student_layer": 0, "teacher_layer": 0, "weight": 0.5},
        {"loss": "rkd_distance"},
        {"loss": "minilm_relation", "options": {"relation_heads": 2}},
    ], s, t, kept=[0, 5])
    assert [(m.student_layer, m.teacher_layer, m.weight) for m in matches[:3]] == [
        (1, 1, 0.5), (2, 6, 0.5), (0, 0, 0.5)]   # a strategy shares its weight
    assert (matches[3].feature, matches[3].student_layer, matches[3].teacher_layer) == ("pooled", 2, 6)
    assert matches[4].feature == "qkv" and matches[4].options == {"relation_heads": 2}
    # the relation head count defaults to the teacher's attention heads
    assert resolve_matches([{"loss": "minilm_relation"}], s, t)[0].options == {"relation_heads": 4}


@pytest.mark.parametrize("spec, student, message", [
    ({"loss": "attention_mse"}, {"student_heads": 2, "student_hidden": 32},
     "teacher has 4 heads and the student 2; use minilm_relation"),
    ({"loss": "hidden_mse", "student_layer": 3, "teacher_layer": 6}, {},
     "student layer 3 is out of range"),
    ({"loss": "attention_kl", "student_layer": 0, "teacher_layer": 0}, {},
     "attention exists for layers 1..2"),
    ({"loss": "minilm_relation", "options": {"relation_heads": 3}}, {}, "must divide"),
    ({"loss": "rkd_distance", "options": {"tau": 0.1}}, {}, "takes no options"),
    ({"loss": "contrastive_relation", "options": {"temperature": 0.1}}, {}, "takes tau"),
    ({"loss": "hidden_mse", "feature": "attention"}, {}, "compares hidden, not 'attention'"),
    ({"loss": "rkd_angle", "feature": "qkv"}, {}, "compares pooled or cls"),
    ({"loss": "hidden_mse", "strategy": "uniform", "student_layer": 1}, {}, "not both"),
    ({"loss": "hidden_mse", "student_layer": 1}, {}, "give both"),
    ({"loss": "hiden_mse"}, {}, "did you mean 'hidden_mse'"),
    ({"weight": 1.0}, {}, "needs 'loss'"),
    ({"loss": "hidden_mse", "layer": 1}, {}, "unknown key 'layer'"),
    ({"loss": "hidden_mse", "weight": -1}, {}, "must be >= 0"),
    ({"loss": "hidden_mse", "strategy": "every"}, {}, "strategy: 'every' is unknown"),
])
def test_impossible_matches_fail_with_a_clear_line(spec, student, message):
    s, t = configs(**student)
    with pytest.raises(EdgeDistillError, match=message) as err:
        resolve_matches([spec], s, t, where="distill.matches")
    assert str(err.value).startswith("distill.matches[0]") and "\n" not in str(err.value)


def test_features_come_from_one_forward_pass():
    model = make_bert(num_layers=2)
    batch = {"input_ids": torch.tensor([[2, 6, 7, 3], [2, 8, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    wanted = {("hidden", 0), ("pooled", 2), ("cls", 1), ("attention", 1), ("qkv", 2)}
    out, f = forward_with_features(model, batch, wanted)
    hidden = out.hidden_states[2]
    assert torch.allclose(f["pooled", 2][1], hidden[1, :3].mean(0), atol=1e-6)  # padding left out
    assert torch.equal(f["cls", 1], out.hidden_states[1][:, 0])
    assert f["attention", 1].shape == (2, 4, 4, 4)
    q, k, v = f["qkv", 2]
    block = model.bert.encoder.layer[1].attention.self
    assert torch.allclose(q, block.query(out.hidden_states[1]), atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed again


def test_queries_keys_values_of_a_grouped_query_decoder():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    _, f = forward_with_features(model, {"input_ids": torch.tensor([[1, 2, 3]])}, {("qkv", 2)})
    assert [x.shape[-1] for x in f["qkv", 2]] == [32, 16, 16]
    # relation heads must divide the narrower key/value width too
    with pytest.raises(EdgeDistillError, match=r"\[16, 32\]"):
        resolve_matches([{"loss": "minilm_relation", "options": {"relation_heads": 5}}],
                        config, config)


@pytest.mark.parametrize("spec, message", [
    ({"loss": "hidden_mse", "strategy": "uniform", "student_layer": 1},
     "m: give either a strategy or student_layer and teacher_layer, not both"),
    ({"loss": "hidden_mse", "student_layer": 1}, "m: give both student_layer and teacher_layer"),
    ({"loss": "hidden_mse", "weight": -1}, "m.weight: -1 must be >= 0"),  # the field's limit
])
def test_a_match_spec_is_checked_once_for_recipes_and_code(spec, message):
    from edgedistill.distill.matching import check_match_spec

    with pytest.raises(EdgeDistillError, match=message):
        check_match_spec(spec, "m")
