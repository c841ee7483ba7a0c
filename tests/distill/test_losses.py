import math

import pytest
import torch

from edgedistill.distill import losses as L
from edgedistill.errors import EdgeDistillError


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


def test_unknown_loss_names_the_closest():
    with pytest.raises(EdgeDistillError, match="did you mean 'kl_divergence'"):
        L.get_loss("kl_divergance", L.LOGIT_LOSSES)
    assert L.get_loss("hidden_mse", L.FEATURE_LOSSES) is L.hidden_mse
