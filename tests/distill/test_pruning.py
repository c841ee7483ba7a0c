"""Width-pruned students: the ranking removes what is idle, the narrowed student is a plain
model of the smaller shape, and a recipe can ask for one."""

import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
)

from edgedistill.cli import main
from edgedistill.distill.pruning import _lowest, activation_importance, pruned_shape
from edgedistill.distill.student import make_student
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_bert, make_llama


def _batches():
    torch.manual_seed(0)
    ids = torch.randint(5, 20, (6, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding must not count
    return [{"input_ids": ids, "attention_mask": mask}]


def test_nothing_pruned_is_the_kept_blocks_student():
    teacher, batches = make_bert(num_layers=4, hidden=32), _batches()
    full = make_student(teacher, num_layers=2, init="pruned", inputs=batches).eval()
    kept = make_student(teacher, num_layers=2).eval()
    assert torch.equal(full(**batches[0]).logits, kept(**batches[0]).logits)


def test_idle_heads_and_neurons_go_first_and_the_rest_is_kept_exactly(tmp_path):
    teacher, batches = make_bert(num_layers=4, hidden=32), _batches()  # 4 heads of 8
    with torch.no_grad():  # teacher block 0 (student block 0): head 1 outputs nothing
        value = teacher.bert.encoder.layer[0].attention.self.value
        value.weight[8:16] = 0
        value.bias[8:16] = 0
        dense = teacher.bert.encoder.layer[3].intermediate.dense  # student block 1: neuron 5
        dense.weight[5] = 0
        dense.bias[5] = -10.0  # GELU(-10) is 0 to float precision
    student = make_student(teacher, num_layers=2, init="pruned", inputs=batches,
                           hidden_size=24, intermediate_size=60)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (24, 3, 60)
    assert c.edgedistill_teacher_layers == [0, 3]

    kept = make_student(teacher, num_layers=2)
    removed = set(_lowest(activation_importance(kept, batches).channels, 24))
    columns = [i for i in range(32) if i not in removed]
    rows = [*range(0, 8), *range(16, 32)]  # heads 0, 2, 3
    expected = value.weight[rows][:, columns]
    assert torch.equal(student.bert.encoder.layer[0].attention.self.value.weight, expected)
    neurons = student.bert.encoder.layer[1].intermediate.dense.weight
    assert torch.equal(neurons, dense.weight[[i for i in range(64) if i not in
                                              _lowest_of(kept, batches, 60)]][:, columns])

    student.save_pretrained(tmp_path / "s")  # a plain model of its config
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    student.eval()
    assert torch.equal(again(**batches[0]).logits, student(**batches[0]).logits)


def _lowest_of(kept, batches, keep):
    return set(_lowest(activation_importance(kept, batches).neurons[1], keep))


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": 20}, "hidden_size: 20 is not a whole number of the teacher's 8-wide heads"),
    ({"hidden_size": 64}, "hidden_size: 64 must be a whole number from 1 to the teacher's 32"),
    ({"hidden_size": 16, "num_attention_heads": 4}, "num_attention_heads: 4 heads of the "
     "teacher's 8 dims make 32, not hidden_size 16"),
    ({"num_hidden_layers": 1}, "num_hidden_layers: pruning sets only hidden_size"),
])
def test_shapes_pruning_cannot_make_are_refused(overrides, message):
    with pytest.raises(EdgeDistillError, match=message):
        pruned_shape(make_bert(hidden=32).config, overrides)


def test_a_teacher_with_pruned_heads_is_refused():
    config = make_bert(hidden=32).config
    config.pruned_heads = {0: [1]}
    with pytest.raises(EdgeDistillError, match="needs a teacher without pruned heads"):
        pruned_shape(config, {})


def test_a_teacher_the_hooks_do_not_know_is_refused():
    with pytest.raises(EdgeDistillError, match="student.init: pruned supports bert, mpnet models; "
                       "the teacher is llama"):
        pruned_shape(make_llama().config, {})


def test_a_recipe_distils_a_pruned_student(tmp_path, tiny_teacher_dir, capsys):
    from tests.conftest import write_tsv
    from tests.test_pipeline import RECIPE

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=write_tsv(tmp_path / "data", 80, 30),
                                    teacher=tiny_teacher_dir))
    out = tmp_path / "out"
    shape = ["--set", "student.init=pruned", "--set", "student.prune_texts=16"]
    assert main(["distill", str(recipe), "-o", str(out), *shape,
                 "--set", "student.config={hidden_size: 16, intermediate_size: 32}"]) == 0
    config = json.loads((out / "distill" / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (16, 2)
    assert config["edgedistill_pruned_from"]["hidden_size"] == 32
    # the recipe's hidden_mse match gets a projection to the teacher's width, as for random
    assert main(["distill", str(recipe), "-o", str(tmp_path / "o2"), *shape,
                 "--set", "student.config={hidden_size: 12}"]) == 2
    assert "student.config.hidden_size: 12 is not a whole number of the teacher's 8-wide " \
           "heads" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "teacher").exists()  # refused before any training


def test_pruning_without_texts_says_what_to_pass():
    with pytest.raises(EdgeDistillError, match=r"pass make_student\(\.\.\., inputs="):
        make_student(make_bert(), num_layers=2, init="pruned", hidden_size=16)


# ------------------------------------------------------------------------------------- MPNet

def _mpnet(cls=MPNetForSequenceClassification):
    torch.manual_seed(0)
    return cls(MPNetConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, num_labels=3)).eval()


@pytest.mark.parametrize("cls", [MPNetForSequenceClassification, MPNetModel])
def test_an_mpnet_keeps_one_set_of_heads_for_its_shared_position_bias(tmp_path, cls):
    teacher, batches = _mpnet(cls), _batches()
    full = make_student(teacher, num_layers=2, init="pruned", inputs=batches).eval()
    kept = make_student(teacher, num_layers=2).eval()
    assert torch.equal(full(**batches[0])[0], kept(**batches[0])[0])

    base = teacher.base_model
    with torch.no_grad():  # head 2 is idle in the kept blocks 0 and 3 (4 heads of 8)
        for i in (0, 3):
            value = base.encoder.layer[i].attention.attn.v
            value.weight[16:24] = 0
            value.bias[16:24] = 0
    student = make_student(teacher, num_layers=2, init="pruned", inputs=batches,
                           hidden_size=24, intermediate_size=48)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (24, 3, 48)
    bias = student.base_model.encoder.relative_attention_bias.weight
    columns = [0, 1, 3]  # the bias keeps the kept heads' columns, in order
    assert torch.equal(bias, base.encoder.relative_attention_bias.weight[:, columns])
    student.save_pretrained(tmp_path / "s")  # a plain model of its config
    again = (AutoModelForSequenceClassification if cls is MPNetForSequenceClassification
             else AutoModel).from_pretrained(tmp_path / "s").eval()
    student.eval()
    assert torch.equal(again(**batches[0])[0], student(**batches[0])[0])
