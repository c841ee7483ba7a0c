import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgedistill.distill.matching import layer_map
from edgedistill.distill.student import make_student, select_layers
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_bert


def test_select_layers():
    assert select_layers(6, "uniform", 2) == [0, 5]
    assert select_layers(6, "uniform", 3) == [0, 2, 5]
    assert select_layers(6, "uniform", 6) == list(range(6))
    assert select_layers(6, "first", 2) == [0, 1]
    assert select_layers(6, "last", 2) == [4, 5]
    assert select_layers(6, layer_ids=[4, 1]) == [1, 4]
    for bad in ({"num_layers": 7}, {"num_layers": 0}, {"layer_ids": [6]}, {"layer_ids": [1, 1]},
                {"layers": "middle"}):
        with pytest.raises(EdgeDistillError):
            select_layers(6, **bad)


def test_student_copies_teacher_layers_and_leaves_teacher_alone():
    teacher = make_bert(num_layers=6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, "uniform", 2)
    assert student.config.num_hidden_layers == 2
    assert len(student.bert.encoder.layer) == 2
    assert student.config.edgedistill_teacher_layers == [0, 5]
    t_layer5 = teacher.bert.encoder.layer[5].state_dict()
    s_layer1 = student.bert.encoder.layer[1].state_dict()
    assert all(torch.equal(t_layer5[k], s_layer1[k]) for k in t_layer5)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    # training the student must not move the teacher: they share no tensors
    with torch.no_grad():
        student.classifier.weight.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(teacher.bert.encoder.layer) == 6
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert student(input_ids=ids).logits.shape == (1, 3)


def test_student_of_a_causal_lm_generates_with_its_cache():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    teacher = LlamaForCausalLM(config).eval()
    student = make_student(teacher, "uniform", 3)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    out = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_layer_map():
    assert layer_map("uniform", 2, 6) == [(1, 3), (2, 6)]
    assert layer_map("uniform", 2, 6, kept=[0, 5]) == [(1, 1), (2, 6)]
    assert layer_map("last", 2, 6) == [(2, 6)]
    with pytest.raises(EdgeDistillError):
        layer_map("random", 2, 6)
