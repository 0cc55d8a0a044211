"""Losses against values computed by hand (derivations in the docstrings) and their properties."""
import math

import pytest
import torch

from immunizer.losses import (IGNORE, alignment_loss, annealed_gamma, bounded_negative_kl, dpo_loss, npo_loss,
                              refusal_loss, sequence_logprob, sft_loss, stabilization_grad, stabilization_loss,
                              token_kl)


def logits_from_probs(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_sequence_logprob_and_sft_on_a_two_token_vocabulary():
    """Logits at t predict token t+1. Sequence [x, 0, 1] with labels [-100, 0, 1]:
    position 0 predicts token 0 with p=0.25, position 1 predicts token 1 with p=0.5.
    Sum = ln 0.25 + ln 0.5 = -ln 8; mean NLL = ln 8 / 2."""
    logits = logits_from_probs([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]])
    labels = torch.tensor([[IGNORE, 0, 1]])
    assert sequence_logprob(logits, labels).item() == pytest.approx(-math.log(8), rel=1e-6)
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(8) / 2, rel=1e-6)


def test_npo_loss_matches_its_closed_form():
    """Equal log-probs: (2/β)·ln(1 + 1) = 2 ln 2 / β. With log π_θ − log π_ref = d:
    (2/β)·ln(1 + e^{βd}); β = 0.5, d = 2: 4·ln(1 + e) = 5.2530."""
    same = npo_loss(torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    assert same.item() == pytest.approx(2 * math.log(2) / 0.1, rel=1e-6)
    moved = npo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), beta=0.5)
    assert moved.item() == pytest.approx(4 * math.log(1 + math.e), rel=1e-6)


def test_npo_floor_stops_pushing_answers_already_far_below_the_reference():
    """d = log π_θ − log π_ref. With floor 3: d = −5 is clamped to −3, so its loss is that of d = −3 and its
    gradient is 0; d = −1 is above the floor and keeps the plain NPO loss and gradient."""
    policy = torch.tensor([-6.0, -2.0], requires_grad=True)
    reference = torch.tensor([-1.0, -1.0])
    loss = npo_loss(policy, reference, beta=0.1, floor=3.0)
    plain_far = npo_loss(torch.tensor([-4.0]), torch.tensor([-1.0]), beta=0.1)
    plain_near = npo_loss(torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.1)
    assert loss.item() == pytest.approx((plain_far.item() + plain_near.item()) / 2, rel=1e-6)
    loss.backward()
    assert policy.grad[0].item() == 0.0 and policy.grad[1].item() > 0
    assert npo_loss(policy, reference, beta=0.1).item() != pytest.approx(loss.item())  # floor 0: unbounded as before


def test_npo_gradient_pushes_the_harmful_likelihood_down_and_not_the_reference():
    policy = torch.tensor([-2.0], requires_grad=True)
    reference = torch.tensor([-2.0], requires_grad=True)
    npo_loss(policy, reference.detach(), beta=0.1).backward()
    assert policy.grad.item() > 0  # descending the loss lowers log π_θ(harmful)
    assert reference.grad is None


def test_dpo_loss_matches_its_closed_form():
    """Margin m = (πc − rc) − (πr − rr); loss = ln(1 + e^{−βm}). m = 0 → ln 2;
    πc=-1, πr=-4, rc=-2, rr=-2 → m = 1 − (−2) = 3, β = 0.1 → ln(1 + e^{−0.3}) = 0.5544."""
    zero = dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1)
    assert zero.item() == pytest.approx(math.log(2), rel=1e-6)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)


def test_token_kl_matches_hand_computation_and_ignores_prompt_tokens():
    """One response token (position 0 predicts it). p = (0.5, 0.5), q = (0.25, 0.75):
    KL(p‖q) = 0.5 ln 2 + 0.5 ln(2/3) = 0.14384. Position 1 is masked and must not count."""
    p = logits_from_probs([[[0.5, 0.5], [0.01, 0.99], [0.5, 0.5]]])
    q = logits_from_probs([[[0.25, 0.75], [0.99, 0.01], [0.5, 0.5]]])
    labels = torch.tensor([[IGNORE, 1, IGNORE]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert token_kl(p, q, labels).item() == pytest.approx(expected, rel=1e-5)
    assert token_kl(p, p, labels).item() == pytest.approx(0.0, abs=1e-7)


def test_bounded_negative_kl_is_capped_and_has_no_gradient_once_capped():
    student = logits_from_probs([[[0.5, 0.5], [0.5, 0.5]]]).requires_grad_(True)
    teacher = logits_from_probs([[[0.25, 0.75], [0.5, 0.5]]]).requires_grad_(True)
    labels = torch.tensor([[IGNORE, 1]])
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    loose = bounded_negative_kl(student, teacher, labels, tau=10.0)
    assert loose.item() == pytest.approx(-kl, rel=1e-5)
    loose.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher is a constant
    student.grad = None
    capped = bounded_negative_kl(student, teacher, labels, tau=0.1)
    assert capped.item() == pytest.approx(-0.1)
    capped.backward()
    assert student.grad.abs().sum() == 0


def test_refusal_and_alignment_mix_their_terms():
    npo, rkl = torch.tensor(2.0), torch.tensor(-1.0)
    assert refusal_loss(npo, rkl, gamma=0.5, lam=0.25).item() == pytest.approx(0.5 * (0.75 * 2 - 0.25))
    assert alignment_loss(torch.tensor(0.6), torch.tensor(0.2), alpha=0.5).item() == pytest.approx(0.4)


def test_annealed_gamma_grows_then_saturates():
    assert annealed_gamma(0, 0.5, 0.1) == 0.5
    assert annealed_gamma(3, 0.5, 0.1) == pytest.approx(0.8)
    assert annealed_gamma(100, 0.5, 0.1) == 1.0


def test_stabilization_loss_is_the_mse_over_all_canaries_and_pulls_only_the_current_values():
    """Squared errors 1, 4 (first tensor) and 9 (second): mean over 3 elements = 14/3."""
    current = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)]
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([0.0])]
    loss = stabilization_loss(current, anchor)
    assert loss.item() == pytest.approx(14 / 3)
    loss.backward()
    assert torch.allclose(current[0].grad, torch.tensor([2 / 3, 4 / 3]))  # d/dc (c−a)²/3 = 2(c−a)/3
    assert stabilization_loss([a.clone() for a in anchor], anchor).item() == 0.0
    with pytest.raises(ValueError):
        stabilization_loss([], [])


def test_stabilization_grad_is_the_gradient_of_the_loss():
    current = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.5], requires_grad=True)]
    anchor = [torch.tensor([0.0, 2.0]), torch.tensor([1.5])]
    stabilization_loss(current, anchor).backward()
    closed = stabilization_grad([c.detach() for c in current], anchor)
    # by hand: N = 3, grad = 2(c − a)/3 = [2/3, 0], [−2/3]
    assert torch.allclose(closed[0], torch.tensor([2 / 3, 0.0])) and torch.allclose(closed[1], torch.tensor([-2 / 3]))
    for c, g in zip(current, closed):
        assert torch.allclose(c.grad, g)

