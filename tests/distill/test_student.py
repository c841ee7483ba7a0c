import pytest
import torch
from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from edgedistill.distill.student import check_same_tokenizer, make_student, select_layers
from edgedistill.errors import EdgeDistillError
from tests.conftest import make_bert, make_tokenizer


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
    # a frozen teacher (as DistillationTrainer leaves it) still gives a trainable student
    teacher.requires_grad_(False)
    assert all(p.requires_grad for p in make_student(teacher, "uniform", 2).parameters())


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


def test_random_student_may_be_narrower():
    teacher = make_bert(num_layers=4, hidden=32)
    student = make_student(teacher, num_layers=2, init="random", hidden_size=16,
                           intermediate_size=32)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert teacher.config.hidden_size == 32  # the teacher's config is not touched
    assert student(input_ids=torch.tensor([[2, 5, 3]])).logits.shape == (1, 3)
    with pytest.raises(EdgeDistillError, match="set student.init: pruned or random"):
        make_student(teacher, num_layers=2, hidden_size=16)
    with pytest.raises(EdgeDistillError, match="not a multiple of num_attention_heads"):
        make_student(teacher, num_layers=2, init="random", hidden_size=18)
    with pytest.raises(EdgeDistillError, match="has no such setting"):
        make_student(teacher, num_layers=2, init="random", hidden_sise=16)
    with pytest.raises(EdgeDistillError, match="student.init: 'pretrained' is unknown"):
        make_student(teacher, num_layers=2, init="pretrained")


def test_a_student_with_another_tokenizer_is_refused(tmp_path):
    teacher_tok = make_tokenizer(tmp_path / "a")
    check_same_tokenizer(teacher_tok, make_tokenizer(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    other = BertTokenizerFast(vocab_file=str(tmp_path / "c" / "vocab.txt"))
    with pytest.raises(EdgeDistillError, match="tokenizer differs from the teacher's"):
        check_same_tokenizer(teacher_tok, other, "student.model")



def test_a_pretrained_student_keeps_some_of_its_own_blocks(tmp_path):
    """student.model with num_layers: its own blocks, kept as for a teacher; without, whole."""
    from edgedistill.distill.student import build_student, plan_student
    from edgedistill.recipe_blocks import StudentConfig
    from edgedistill.tasks import get_task

    teacher, pretrained = make_bert(num_layers=4), make_bert(num_layers=3, hidden=16, seed=1)
    pretrained.save_pretrained(tmp_path / "small")
    task, folder = get_task("classification"), str(tmp_path / "small")
    cut = build_student(task, teacher, StudentConfig(model=folder, num_layers=2))
    assert cut.config.num_hidden_layers == 2 and cut.config.hidden_size == 16
    assert not hasattr(cut.config, "edgedistill_teacher_layers")  # nothing of the teacher's
    kept = pretrained.bert.encoder.layer[2].state_dict()  # uniform 2 of 3: blocks 0 and 2
    assert all(torch.equal(kept[k], v) for k, v in cut.bert.encoder.layer[1].state_dict().items())
    config, teacher_blocks = plan_student(None, teacher.config,
                                          StudentConfig(model=folder, layer_ids=[1]))
    assert (config.num_hidden_layers, teacher_blocks) == (1, None)
    whole = build_student(task, teacher, StudentConfig(model=folder))
    assert whole.config.num_hidden_layers == 3
    # a student made from the teacher keeps 2 of its blocks unless told otherwise
    assert build_student(task, teacher, StudentConfig()).config.num_hidden_layers == 2
    with pytest.raises(EdgeDistillError, match="between 1 and student.model's 3"):
        plan_student(None, teacher.config, StudentConfig(model=folder, num_layers=4))
