"""Token-level divergences and chunked dense / sparse token KD."""

import math

import pytest
import torch
from torch import nn

from edgedistill.distill.losses import token as T
from edgedistill.distill.token_kd import (add_tail_bin, coarsen, dense_token_kd, sparse_token_kd,
                                          teacher_topk)
from edgedistill.errors import EdgeDistillError

P_T = [0.7, 0.2, 0.1]   # teacher
P_S = [0.5, 0.3, 0.2]   # student


def logp(probs, dtype=torch.float64):
    return torch.tensor(probs, dtype=dtype).log()


def rand_logp(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)


# ------------------------------------------------------------------------------ hand values

def test_forward_and_reverse_kl_hand_values():
    # KL(t||s) = 0.7 ln(0.7/0.5) + 0.2 ln(0.2/0.3) + 0.1 ln(0.1/0.2)
    #          = 0.235531 - 0.081093 - 0.069315 = 0.085123
    assert T.forward_kl(logp(P_S), logp(P_T)).item() == pytest.approx(0.0851228, abs=1e-6)
    # KL(s||t) = 0.5 ln(0.5/0.7) + 0.3 ln(0.3/0.2) + 0.2 ln(0.2/0.1)
    #          = -0.168236 + 0.121640 + 0.138629 = 0.092033
    assert T.reverse_kl(logp(P_S), logp(P_T)).item() == pytest.approx(0.0920329, abs=1e-6)


def test_generalized_jsd_hand_value():
    # m = 0.5 t + 0.5 s = [0.6, 0.25, 0.15]
    # KL(t||m) = 0.7 ln(0.7/0.6) + 0.2 ln(0.2/0.25) + 0.1 ln(0.1/0.15) = 0.022730
    # KL(s||m) = 0.5 ln(0.5/0.6) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.15) = 0.021072
    # JSD = 0.5 * 0.022730 + 0.5 * 0.021072 = 0.021901
    value = T.generalized_jsd(logp(P_S), logp(P_T), beta=0.5)
    assert value.item() == pytest.approx(0.0219012, abs=1e-6)


def test_skew_kl_hand_values():
    # skew forward, alpha 0.1: mix = 0.1 t + 0.9 s = [0.52, 0.29, 0.19]
    # KL(t||mix) = 0.7 ln(0.7/0.52) + 0.2 ln(0.2/0.29) + 0.1 ln(0.1/0.19) = 0.069578
    value = T.skew_forward_kl(logp(P_S), logp(P_T), alpha=0.1)
    assert value.item() == pytest.approx(0.0695780, abs=1e-6)
    # skew reverse, alpha 0.1: mix = 0.1 s + 0.9 t = [0.68, 0.21, 0.11]
    # KL(s||mix) = 0.5 ln(0.5/0.68) + 0.3 ln(0.3/0.21) + 0.2 ln(0.2/0.11) = 0.072828
    value = T.skew_reverse_kl(logp(P_S), logp(P_T), alpha=0.1)
    assert value.item() == pytest.approx(0.0728275, abs=1e-6)


@pytest.mark.parametrize("name", sorted(T.TOKEN_LOSSES))
def test_zero_for_identical_nonnegative_and_unreduced(name):
    fn = T.TOKEN_LOSSES[name]
    x = rand_logp(4, 5, 11, seed=1)
    assert fn(x, x).abs().max().item() < 1e-12
    s, t = rand_logp(4, 5, 11, seed=2), rand_logp(4, 5, 11, seed=3)
    out = fn(s, t)
    assert out.shape == (4, 5)
    assert (out >= 0).all()
    assert out.min().item() > 0


@pytest.mark.parametrize("name", sorted(T.TOKEN_LOSSES))
def test_zero_probabilities_give_no_nan(name):
    # the last bin is empty in both, the middle one only in the teacher
    s = logp([0.6, 0.4, 0.0], torch.float32).requires_grad_(True)
    t = logp([1.0, 0.0, 0.0], torch.float32)
    value = T.TOKEN_LOSSES[name](s, t)
    if name == "reverse_kl":  # the student has mass where the teacher has none: truly infinite
        assert value.item() == math.inf
        return
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------- GKD and skew limits

def test_gkd_endpoints_and_limits():
    s, t = rand_logp(3, 7, seed=4), rand_logp(3, 7, seed=5)
    fwd, rev = T.forward_kl(s, t), T.reverse_kl(s, t)
    assert torch.equal(T.generalized_jsd(s, t, beta=0.0), fwd)
    assert torch.equal(T.generalized_jsd(s, t, beta=1), rev)
    eps = 1e-4
    # JSD(beta) ~ beta KL(t||s) as beta -> 0, ~ (1 - beta) KL(s||t) as beta -> 1
    torch.testing.assert_close(T.generalized_jsd(s, t, beta=eps) / eps, fwd, rtol=2e-3, atol=0)
    torch.testing.assert_close(T.generalized_jsd(s, t, beta=1 - eps) / eps, rev, rtol=2e-3, atol=0)


def test_skew_alpha_zero_is_plain_kl_and_bounded():
    s, t = rand_logp(3, 7, seed=6), rand_logp(3, 7, seed=7)
    assert torch.equal(T.skew_forward_kl(s, t, alpha=0), T.forward_kl(s, t))
    assert torch.equal(T.skew_reverse_kl(s, t, alpha=0.0), T.reverse_kl(s, t))
    # the skew bounds the divergence by -log(alpha)
    far_s, far_t = logp([1e-30, 1.0 - 1e-30]), logp([1.0 - 1e-30, 1e-30])
    assert T.skew_forward_kl(far_s, far_t, alpha=0.1).item() <= -math.log(0.1) + 1e-9


# ---------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, options, fragment", [
    ("generalized_jsd", {"beta": 1.5}, "beta = 1.5"),
    ("generalized_jsd", {"beta": -0.1}, "beta = -0.1"),
    ("generalized_jsd", {"beta": "half"}, "beta = 'half'"),
    ("skew_forward_kl", {"alpha": 1.0}, "alpha = 1.0"),
    ("skew_reverse_kl", {"alpha": -1}, "alpha = -1"),
    ("forward_kl", {"beta": 0.5}, "forward_kl has no option beta"),
    ("skew_forward_kl", {"beta": 0.5}, "it takes alpha"),
])
def test_bad_options_raise(name, options, fragment):
    with pytest.raises(EdgeDistillError, match=r"distill\.token_loss: .*") as info:
        T.get_token_loss(name, "distill.token_loss", **options)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_option_values_raise_in_the_functions_too():
    x = rand_logp(2, 3)
    with pytest.raises(EdgeDistillError, match="beta"):
        T.generalized_jsd(x, x, beta=2.0)
    with pytest.raises(EdgeDistillError, match="alpha"):
        T.skew_reverse_kl(x, x, alpha=1.0)


def test_unknown_loss_name_lists_valid_and_closest():
    with pytest.raises(EdgeDistillError) as info:
        T.get_token_loss("forward_k", "distill.token_loss")
    message = str(info.value)
    assert message.startswith("distill.token_loss: unknown loss 'forward_k'")
    assert "did you mean 'forward_kl'" in message
    assert all(name in message for name in T.TOKEN_LOSSES)
    with pytest.raises(EdgeDistillError, match="unknown loss"):
        dense_token_kd(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), nn.Linear(4, 3),
                       torch.ones(1, 2, dtype=torch.bool), loss="kl")


def test_get_token_loss_binds_options():
    s, t = rand_logp(2, 5, seed=8), rand_logp(2, 5, seed=9)
    assert T.get_token_loss("reverse_kl") is T.reverse_kl
    bound = T.get_token_loss("generalized_jsd", beta=0.2)
    assert torch.equal(bound(s, t), T.generalized_jsd(s, t, beta=0.2))


# ------------------------------------------------------------------------------- chunked KD

B, L, H, V = 2, 7, 8, 13


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    head.requires_grad_(False)
    hidden = torch.randn(B, L, H, generator=g)
    logits = torch.randn(B, L, V, generator=g) * 2
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :2] = False          # a "prompt"
    mask[1, -3:] = False         # "padding"
    return logits, hidden, head, mask


def value_and_grad(fn, logits, *args, **kwargs):
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf, *args, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("loss, options", [("forward_kl", {}), ("reverse_kl", {}),
                                           ("generalized_jsd", {"beta": 0.3}),
                                           ("skew_forward_kl", {"alpha": 0.1}),
                                           ("skew_reverse_kl", {"alpha": 0.2})])
def test_dense_chunked_equals_unchunked(loss, options):
    logits, hidden, head, mask = make_case()
    with torch.inference_mode():  # as the trainer computes the teacher's hidden states
        hidden = hidden.clone()
    one = value_and_grad(dense_token_kd, logits, hidden, head, mask, loss, 2.0, 10 ** 6, **options)
    chunked = value_and_grad(dense_token_kd, logits, hidden, head, mask, loss, 2.0, 3, **options)
    torch.testing.assert_close(chunked[0], one[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[1], one[1], rtol=1e-5, atol=1e-7)
    # against a direct, unchunked computation: T^2 * mean over the masked positions
    t_logp = torch.log_softmax(head(hidden) / 2.0, -1)
    s_logp = torch.log_softmax(logits / 2.0, -1)
    direct = T.get_token_loss(loss, **options)(s_logp, t_logp)[mask].mean() * 4.0
    torch.testing.assert_close(one[0], direct, rtol=1e-5, atol=1e-6)


def test_dense_masked_out_positions_do_not_matter():
    logits, hidden, head, mask = make_case()
    value, grad = value_and_grad(dense_token_kd, logits, hidden, head, mask, chunk_tokens=4)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    other_logits, other_hidden = logits.clone(), hidden.clone()
    other_logits[~mask] = float("nan")
    other_hidden[~mask] = float("inf")
    value2, grad2 = value_and_grad(dense_token_kd, other_logits, other_hidden, head, mask,
                                   chunk_tokens=4)
    assert torch.equal(value, value2)
    assert torch.equal(grad, grad2)


def test_dense_takes_shifted_views_and_inference_tensors():
    # as a trainer calls it: position i predicts i + 1, teacher states from inference_mode
    logits, hidden, head, mask = make_case()
    with torch.inference_mode():
        hidden = hidden.clone()
    for keep in (mask[:, 1:], torch.ones_like(mask[:, 1:])):
        view = value_and_grad(lambda x: dense_token_kd(x[:, :-1], hidden[:, :-1], head, keep,
                                                       chunk_tokens=2), logits)
        copy = value_and_grad(lambda x: dense_token_kd(x[:, :-1].contiguous(),
                                                       hidden[:, :-1].clone(), head, keep), logits)
        torch.testing.assert_close(view[0], copy[0])
        torch.testing.assert_close(view[1], copy[1])
        assert (view[1][:, -1] == 0).all()


def test_no_masked_positions_give_a_connected_zero():
    logits, hidden, head, mask = make_case()
    none = torch.zeros_like(mask)
    for value, grad in (value_and_grad(dense_token_kd, logits, hidden, head, none),
                        value_and_grad(sparse_token_kd, logits, *teacher_topk(hidden, head, 4),
                                       none)):
        assert value.item() == 0.0
        assert grad is not None and (grad == 0).all()


def test_dense_shape_errors():
    logits, hidden, head, mask = make_case()
    with pytest.raises(EdgeDistillError, match="shared vocabulary"):
        dense_token_kd(logits, hidden, nn.Linear(H, V + 1), mask)
    with pytest.raises(EdgeDistillError, match="mask has shape"):
        dense_token_kd(logits, hidden, head, mask[:, :-1])
    with pytest.raises(EdgeDistillError, match="temperature"):
        dense_token_kd(logits, hidden, head, mask, temperature=0)
    with pytest.raises(EdgeDistillError, match="chunk_tokens"):
        dense_token_kd(logits, hidden, head, mask, chunk_tokens=0)


# ---------------------------------------------------------------------------------- sparse

def test_coarsen_bins_sum_to_one():
    full = rand_logp(3, 4, V, seed=10).float()
    idx = full.topk(5, dim=-1).indices
    bins = coarsen(full, idx)
    assert bins.shape == (3, 4, 6)
    torch.testing.assert_close(bins.exp().sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(bins[..., :5], full.gather(-1, idx), rtol=0, atol=1e-6)
    # all of the vocabulary: the tail is floored, not log(0); still sums to 1
    everything = coarsen(full, torch.arange(V).expand(3, 4, V))
    assert torch.isfinite(everything).all()
    torch.testing.assert_close(everything.exp().sum(-1), torch.ones(3, 4))
    assert everything[..., -1].exp().max().item() < 2e-6
    # float16 rounding can make the head's mass exceed 1: still a distribution
    over = add_tail_bin(torch.log(torch.tensor([0.6, 0.41])).half())
    assert torch.isfinite(over).all()
    assert over.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def full_topk(hidden, head, temperature):
    """The teacher's full-vocabulary top-k in float32 (no float16 rounding)."""
    with torch.no_grad():
        values, indices = torch.log_softmax(head(hidden) / temperature, -1).topk(V, dim=-1)
    return values, indices.int()


@pytest.mark.parametrize("loss, options", [("forward_kl", {}), ("reverse_kl", {}),
                                           ("generalized_jsd", {"beta": 0.5}),
                                           ("skew_forward_kl", {"alpha": 0.1})])
def test_sparse_with_full_vocabulary_equals_dense(loss, options):
    logits, hidden, head, mask = make_case(seed=1)
    dense = value_and_grad(dense_token_kd, logits, hidden, head, mask, loss, 1.5, 4, **options)
    values, indices = full_topk(hidden, head, 1.5)
    sparse = value_and_grad(sparse_token_kd, logits, values, indices, mask, loss, 1.5, 4, **options)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-3, atol=1e-5)
    # from the float16 cache format: the same up to float16 rounding
    cached = value_and_grad(sparse_token_kd, logits, *teacher_topk(hidden, head, V, 1.5), mask,
                            loss, 1.5, 4, **options)
    torch.testing.assert_close(cached[0], dense[0], rtol=2e-2, atol=1e-3)


def test_sparse_small_k_finite_with_gradient_and_chunk_invariant():
    logits, hidden, head, mask = make_case(seed=2)
    values, indices = teacher_topk(hidden, head, 3, temperature=2.0)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32
    assert values.shape == indices.shape == (B, L, 3)
    for loss in T.TOKEN_LOSSES:
        value, grad = value_and_grad(sparse_token_kd, logits, values, indices, mask, loss, 2.0, 3)
        assert torch.isfinite(value) and value.item() > 0
        assert torch.isfinite(grad).all() and grad[mask].abs().sum() > 0
        assert (grad[~mask] == 0).all()
        whole = value_and_grad(sparse_token_kd, logits, values, indices, mask, loss, 2.0, 10 ** 6)
        torch.testing.assert_close(whole[0], value, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(whole[1], grad, rtol=1e-5, atol=1e-8)
    # coarsening can only lose information: forward KL over k + 1 bins <= the full one
    dense = dense_token_kd(logits, hidden, head, mask, "forward_kl", 2.0)
    sparse = sparse_token_kd(logits, values.float(), indices, mask, "forward_kl", 2.0)
    assert sparse.item() <= dense.item() + 1e-6


def test_sparse_rejects_a_cache_of_another_vocabulary():
    logits, hidden, head, mask = make_case()
    values, indices = teacher_topk(hidden, head, 4)
    with pytest.raises(EdgeDistillError, match="shared vocabulary"):
        sparse_token_kd(logits[..., :5], values, indices, mask)
    with pytest.raises(EdgeDistillError, match="exceeds the vocabulary"):
        teacher_topk(hidden, head, V + 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_fused_into_the_kd_pass(temperature):
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    hidden, head = torch.randn(2, 5, 4), nn.Linear(4, 11, bias=False).requires_grad_(False)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3:] = -100  # positions without a next token
    mask = targets != -100
    parts = {}
    fused = dense_token_kd(logits, hidden, head, mask, "forward_kl", temperature, 3,
                           targets=targets, kd_weight=0.7, ce_weight=0.3, parts=parts)
    (g_fused,) = torch.autograd.grad(fused, logits)
    kd = dense_token_kd(logits, hidden, head, mask, "forward_kl", temperature, 3)
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    apart = 0.7 * kd + 0.3 * ce
    (g_apart,) = torch.autograd.grad(apart, logits)
    assert float(fused) == pytest.approx(float(apart), rel=1e-5)
    assert torch.allclose(g_fused, g_apart, atol=1e-6)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["distill"] == pytest.approx(float(kd), rel=1e-5)
    with pytest.raises(EdgeDistillError, match="has no target"):
        dense_token_kd(logits, hidden, head, torch.ones(2, 5, dtype=torch.bool), targets=targets,
                       ce_weight=0.5)
