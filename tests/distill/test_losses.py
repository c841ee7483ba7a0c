import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from edgedistill import DistillationTrainer, DistillationTrainingArguments, make_student
from edgedistill.distill import losses as L
from edgedistill.distill.losses import register_loss
from edgedistill.distill.matching import resolve_matches
from edgedistill.distill.trainer import check_distill_settings
from edgedistill.errors import EdgeDistillError
from edgedistill.recipe import recipe_from_dict
from tests.conftest import LABELS, make_bert, make_texts, make_tokenizer


def logits_of(probs):
    return torch.log(torch.tensor([probs]))


def test_soft_cross_entropy_hand_value():
    # -(0.9 ln 0.8 + 0.1 ln 0.2) = 0.3618 nats (the reference article's 0.223 is wrong)
    value = L.soft_cross_entropy(logits_of([0.8, 0.2]), logits_of([0.9, 0.1]), temperature=1.0)
    assert value.item() == pytest.approx(0.3618, abs=1e-4)


def test_hidden_mse_hand_value():
    # ((0.1)^2 + (0.2)^2 + (0.3)^2) / 3 = 0.04667 (the article's 0.01 is wrong)
    s = torch.tensor([[[0.9, 1.8, 2.7]]])
    t = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert L.hidden_mse(s, t).item() == pytest.approx(0.046667, abs=1e-5)


def test_kl_hand_value_and_zero_for_identical():
    s, t = logits_of([0.8, 0.2]), logits_of([0.9, 0.1])
    expected = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    assert L.kl_divergence(s, t).item() == pytest.approx(expected, abs=1e-6)
    reverse = 0.8 * math.log(0.8 / 0.9) + 0.2 * math.log(0.2 / 0.1)
    assert L.reverse_kl_divergence(s, t).item() == pytest.approx(reverse, abs=1e-6)
    x = torch.randn(4, 7)
    assert L.kl_divergence(x, x, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_ce_is_kl_plus_teacher_entropy_times_t_squared():
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 4), torch.randn(5, 4), 2.0
    p_t = torch.softmax(t / temp, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean() * temp ** 2
    assert L.soft_cross_entropy(s, t, temp).item() == pytest.approx(
        (L.kl_divergence(s, t, temp) + entropy).item(), rel=1e-5)


def test_temperature_scaling_keeps_gradient_size_comparable():
    torch.manual_seed(0)
    t = torch.randn(64, 10) * 3
    norms = []
    for temp in (1.0, 4.0, 8.0):
        s = torch.randn(64, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
        L.kl_divergence(s, t, temp).backward()
        norms.append(s.grad.norm().item())
    # without the T^2 factor the gradient would shrink ~T^2 = 64x from T=1 to T=8
    assert max(norms) / min(norms) < 8


def test_logit_mse_and_cosine():
    a = torch.tensor([[1.0, 2.0]])
    assert L.logit_mse(a, a + 1).item() == pytest.approx(1.0)
    h = torch.randn(2, 3, 8)
    assert L.hidden_cosine(h, h).item() == pytest.approx(0.0, abs=1e-6)
    assert L.hidden_cosine(h, -h).item() == pytest.approx(2.0, abs=1e-6)


def test_masked_positions_do_not_count():
    s, t = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    t[0, 2] = 100.0  # a padded position with a huge difference
    mask = torch.tensor([[1, 1, 0]])
    assert L.hidden_mse(s, t, mask).item() == 0.0
    assert L.hidden_mse(s, t).item() > 0


def test_attention_mse_of_a_sequence_does_not_depend_on_its_padding():
    """A 5-token sequence alone and padded to 8 and 16 (as when a longer sequence shares its
    batch): the same loss. Averaging over every key gave 0.131, 0.082 and 0.041 before."""
    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 5, 5).softmax(-1), torch.randn(1, 2, 5, 5).softmax(-1)
    values = []
    for length in (5, 8, 16):  # padded rows and keys hold 0, as masked attention gives
        pad = (0, length - 5, 0, length - 5)
        mask = torch.tensor([[1] * 5 + [0] * (length - 5)])
        values.append(L.attention_mse(F.pad(s, pad), F.pad(t, pad), mask).item())
    assert values[0] > 0 and values == pytest.approx([values[0]] * 3, rel=1e-6)


def test_unknown_loss_names_the_closest():
    with pytest.raises(EdgeDistillError, match="did you mean 'kl_divergence'"):
        L.get_loss("kl_divergance", L.LOGIT_LOSSES)
    assert L.get_loss("hidden_mse", L.MATCH_LOSSES).fn is L.hidden_mse


# --------------------------------------------------------------- attention maps


def test_attention_losses_hand_values_and_mask():
    s = torch.tensor([[[[0.8, 0.2], [0.5, 0.5]]]])  # (batch 1, head 1, 2 queries, 2 keys)
    t = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]]])
    # row 0: ((0.1)^2 + (0.1)^2) / 2 = 0.01; row 1: 0; mean over the two queries: 0.005
    assert L.attention_mse(s, t).item() == pytest.approx(0.005, abs=1e-7)
    kl_row0 = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    assert L.attention_kl(s, t).item() == pytest.approx(kl_row0 / 2, abs=1e-6)
    # the second query is padding: only row 0 counts
    mask = torch.tensor([[1, 0]])
    assert L.attention_kl(s, t, mask).item() == pytest.approx(kl_row0, abs=1e-6)
    # a masked key has probability 0 in both maps: no NaN from 0 * log 0
    zero_key = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert L.attention_kl(zero_key, zero_key).item() == 0.0


# --------------------------------------------------------------- relations


def test_rkd_distance_hand_value():
    # teacher 0, 1, 3: distances 1, 3, 2 (mean 2) -> psi 0.5, 1.5, 1.0
    # student 0, 1, 2: distances 1, 2, 1 (mean 4/3) -> psi 0.75, 1.5, 0.75
    # differences 0.25 at 4 of the 9 entries; Huber 0.5 x^2 -> 4 * 0.03125 / 9
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [1.0], [2.0]])
    assert L.rkd_distance(s, t).item() == pytest.approx(4 * 0.03125 / 9, abs=1e-6)


def test_rkd_angle_hand_value():
    # teacher: right angle at (0,0), 45 degrees at the two others; student: three collinear
    # points, angles 180 (cos -1) at (0,0) and 0 (cos 1) at the ends. Each vertex has two
    # ordered (i, k) pairs; Huber(1) = 0.5, Huber(1 - 0.7071) = 0.5 * 0.2929^2.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    small = 0.5 * (1 - math.sqrt(0.5)) ** 2
    assert L.rkd_angle(s, t).item() == pytest.approx(2 * (0.5 + 2 * small) / 27, abs=1e-6)


def test_similarity_preserving_hand_value():
    # student Gram I; teacher Gram all ones, rows normalised to 1/sqrt(2)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = (2 * (1 - math.sqrt(0.5)) ** 2 + 2 * 0.5) / 4
    assert L.similarity_preserving(s, t).item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_relation_hand_value():
    # cosines: r01 = 0, r02 = 1, r12 = 0. Relation profiles (diagonal -> row mean, centred,
    # normalised): r0 = (0, -1, 1)/sqrt2, r1 = 0 (equally related to all), r2 = (1, -1, 0)/sqrt2.
    # Logits / tau = 0.1: row 0 (10, 0, 5), row 1 (0, 0, 0), row 2 (5, 0, 10).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    expected = (2 * math.log(1 + math.exp(-5) + math.exp(-10)) + math.log(3)) / 3
    assert L.contrastive_relation(x, x, tau=0.1).item() == pytest.approx(expected, abs=1e-6)


def test_minilm_relation_hand_value():
    # one relation head of width 1, two tokens: student queries (1, 0) give the first token
    # softmax(1, 0); the teacher's zeros give uniform rows. Keys and values agree: no loss.
    zeros = torch.zeros(1, 2, 1)
    s = (torch.tensor([[[1.0], [0.0]]]), zeros, zeros)
    t = (zeros, zeros, zeros)
    p = math.exp(1) / (math.exp(1) + 1)
    row0 = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    assert L.minilm_relation(s, t, relation_heads=1).item() == pytest.approx(row0 / 2, abs=1e-6)
    # masking the second token leaves one key: both rows put all weight on it
    assert L.minilm_relation(s, t, torch.tensor([[1, 0]]), relation_heads=1).item() == \
        pytest.approx(0.0, abs=1e-6)


def _feature_pair(loss_name, width_s=8, width_t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if loss_name.startswith("attention"):
        return (torch.softmax(torch.randn(3, 2, 5, 5, generator=g), -1),
                torch.softmax(torch.randn(3, 2, 5, 5, generator=g), -1))
    if loss_name == "minilm_relation":
        return (tuple(torch.randn(3, 5, width_s, generator=g) for _ in range(3)),
                tuple(torch.randn(3, 5, width_t, generator=g) for _ in range(3)))
    if loss_name.startswith("hidden"):
        return torch.randn(3, 5, width_s, generator=g), torch.randn(3, 5, width_t, generator=g)
    return torch.randn(6, width_s, generator=g), torch.randn(6, width_t, generator=g)


@pytest.mark.parametrize("name", sorted(set(L.MATCH_LOSSES) - {"contrastive_relation"}))
def test_zero_for_identical_inputs(name):
    x, _ = _feature_pair(name)
    options = {"relation_heads": 2} if name == "minilm_relation" else {}
    assert L.MATCH_LOSSES[name].fn(x, x, None, **options).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_relation_prefers_the_teacher_relations():
    x, y = _feature_pair("contrastive_relation")
    assert L.contrastive_relation(x, x) < L.contrastive_relation(y, x)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "similarity_preserving"])
def test_relation_losses_ignore_feature_scale(name):
    s, t = _feature_pair(name)
    fn = L.MATCH_LOSSES[name].fn
    assert fn(s * 7.5, t).item() == pytest.approx(fn(s, t).item(), rel=1e-4)


def test_similarity_preserving_ignores_channel_order():
    s, t = _feature_pair("similarity_preserving")
    shuffled = s[:, torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(3))]
    assert L.similarity_preserving(shuffled, t).item() == pytest.approx(
        L.similarity_preserving(s, t).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "similarity_preserving",
                                  "contrastive_relation", "minilm_relation"])
def test_relation_losses_accept_different_widths(name):
    s, t = _feature_pair(name, width_s=4, width_t=12)
    options = {"relation_heads": 2} if name == "minilm_relation" else {}
    assert torch.isfinite(L.MATCH_LOSSES[name].fn(s, t, None, **options))


# --------------------------------------------------------------- registering losses by name


@pytest.fixture
def registry():
    """Whatever a test registers is gone afterwards (other modules list the losses)."""
    saved = [(table, dict(table)) for table in (L.LOGIT_LOSSES, L.TOKEN_LOSSES, L.MATCH_LOSSES)]
    yield
    for table, entries in saved:
        table.clear()
        table.update(entries)


def test_registered_losses_train_by_name_like_built_ins(tmp_path, registry):
    calls = {"logit": 0, "match": 0}

    @register_loss("test_logit_l1", kind="logit")
    def logit_l1(student_logits, teacher_logits, temperature=1.0):
        calls["logit"] += 1
        return (student_logits - teacher_logits).abs().mean()

    @register_loss("test_hidden_l1", kind="match", features="hidden", same_width=True)
    def hidden_l1(student, teacher, mask=None, scale=1.0):
        calls["match"] += 1
        return scale * L.masked_mean((student - teacher).abs().mean(-1), mask)

    # a recipe names them like built-ins (the checks the pipeline runs before training)
    recipe = recipe_from_dict({"distill": {"distill_loss": "test_logit_l1", "matches": [
        {"loss": "test_hidden_l1", "strategy": "uniform", "options": {"scale": 2.0}}]}})
    check_distill_settings(recipe.distill, "distill.")

    tokenizer = make_tokenizer(tmp_path / "tok")
    texts, labels = make_texts(16)
    data = Dataset.from_dict({"text": texts, "labels": [LABELS.index(x) for x in labels]}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    teacher = make_bert(num_layers=4)
    student = make_student(teacher, num_layers=2, init="random", hidden_size=16,
                           intermediate_size=32)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2,
        per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
        distill_loss="test_logit_l1",
        matches=[{"loss": "test_hidden_l1", "strategy": "uniform", "options": {"scale": 2.0}}])
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data,
                                  tokenizer=tokenizer, teacher_model=teacher)
    trainer.train()
    assert calls == {"logit": 2, "match": 4}  # 2 steps; uniform: one match per student block
    assert student.distill_projections  # same_width: widths 16 and 32 got a projection
    logged = [h for h in trainer.state.log_history if "loss_test_hidden_l1" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss_distill"]) for h in logged)


def test_registered_match_loss_resolves_with_its_features_and_options(registry):
    @register_loss("test_pooled_gap", kind="match", features=("pooled", "cls"))
    def pooled_gap(student, teacher, mask=None, power=2.0):
        return (student.norm(dim=-1) - teacher.norm(dim=-1)).abs().pow(power).mean()

    specs = [{"loss": "test_pooled_gap", "options": {"power": 1.0}},
             {"loss": "test_pooled_gap", "feature": "cls", "student_layer": 1,
              "teacher_layer": 3}]
    first, second = resolve_matches(specs, make_bert(2).config, make_bert(4).config)
    assert (first.feature, first.student_layer, first.teacher_layer) == ("pooled", 2, 4)
    assert first.options == {"power": 1.0} and first.spec.fn is pooled_gap
    assert (second.feature, second.student_layer, second.teacher_layer) == ("cls", 1, 3)
    with pytest.raises(EdgeDistillError, match="compares pooled or cls, not 'hidden'"):
        resolve_matches([{"loss": "test_pooled_gap", "feature": "hidden"}],
                        make_bert(2).config, make_bert(4).config)
    with pytest.raises(EdgeDistillError, match=r"options.scale: 'test_pooled_gap' takes power"):
        resolve_matches([{"loss": "test_pooled_gap", "options": {"scale": 1}}],
                        make_bert(2).config, make_bert(4).config)


def test_unknown_names_list_registered_losses_and_the_closest(registry):
    @register_loss("test_sharp_kd", kind="logit")
    def sharp_kd(student_logits, teacher_logits, temperature=1.0):
        return L.kl_divergence(student_logits, teacher_logits, temperature / 2)

    with pytest.raises(EdgeDistillError) as info:
        DistillationTrainingArguments(output_dir="out", distill_loss="test_sharp_k")
    message = str(info.value)
    assert message.startswith("distill_loss: unknown loss 'test_sharp_k'; did you mean "
                              "'test_sharp_kd'?")
    assert all(name in message for name in [*L.LOGIT_LOSSES, *L.TOKEN_LOSSES])
    with pytest.raises(EdgeDistillError, match="did you mean 'hidden_mse'"):
        L.get_loss("hiden_mse", "match")
    assert L.get_loss("test_sharp_kd", "logit") is sharp_kd


def test_a_taken_name_is_an_error_unless_replaced(registry):
    def kd(student_logits, teacher_logits, temperature=1.0):
        return L.soft_cross_entropy(student_logits, teacher_logits, temperature)

    with pytest.raises(EdgeDistillError, match=r"register_loss\('kl_divergence'\): the name is "
                       r"taken by the logit loss edgedistill.distill.losses.logit.kl_divergence; "
                       r".*replace=True"):
        register_loss("kl_divergence", kind="logit")(kd)
    # one namespace: distill_loss may name a logit or a token loss, so kinds cannot share names
    with pytest.raises(EdgeDistillError, match="taken by the match loss"):
        register_loss("hidden_mse", kind="logit")(kd)
    assert L.LOGIT_LOSSES["kl_divergence"] is L.kl_divergence

    register_loss("kl_divergence", kind="logit", replace=True)(kd)
    assert L.get_loss("kl_divergence", L.LOGIT_LOSSES) is kd
    # re-running the cell or module that defined a loss replaces it without replace=True
    register_loss("kl_divergence", kind="logit")(kd)


@pytest.mark.parametrize("kind, extra, fragment", [
    ("logits", {}, "kind 'logits' is unknown; valid: logit, token, embedding, match"),
    ("match", {}, "a match loss needs features among hidden, attention"),
    ("match", {"features": "pooler"}, "needs features among"),
    ("logit", {"features": "hidden"}, "describe match losses only"),
    ("token", {"same_width": True}, "describe match losses only"),
])
def test_bad_registrations_fail_at_once(kind, extra, fragment, registry):
    with pytest.raises(EdgeDistillError, match=fragment):
        register_loss("test_bad", kind=kind, **extra)


def test_a_loss_must_take_its_kinds_arguments(registry):
    with pytest.raises(EdgeDistillError, match=r"a match loss takes \(student, teacher, mask"):
        register_loss("test_two_args", kind="match", features="hidden")(lambda s, t: 0)
    register_loss("test_varargs", kind="logit")(lambda *args: 0)  # cannot tell: accepted
    assert "test_two_args" not in L.MATCH_LOSSES
