"""The immunization losses, as pure functions of tensors (our own: no library ships these
combinations). Logits are [batch, time, vocab]; labels are [batch, time] with -100 wherever a
token is not part of a response. Every function shifts by one (logits at t predict token t+1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor):
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return logits, labels.clamp_min(0), mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(response token) per sequence: [batch]."""
    logits, targets, mask = _shift(logits, labels)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean token cross-entropy over response tokens (the fine-tuning loss an attacker would use). `tokens`:
    divide the sum by this count instead of the batch's own (a data-parallel share of a batch; parallel.py)."""
    logits, targets, mask = _shift(logits, labels)
    if tokens is None:
        return F.cross_entropy(logits[mask].float(), targets[mask])
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum") / tokens


def npo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float,
             floor: float = 0.0) -> torch.Tensor:
    """Negative preference optimization, Zhang et al. 2024 ("Negative Preference Optimization:
    From Catastrophic Collapse to Effective Unlearning"), eq. 3:
        L = (2/β) · mean log(1 + (π_θ(y|x) / π_ref(y|x))^β) = −(2/β) · mean logσ(−β·(log π_θ − log π_ref)).
    It pushes the harmful response's likelihood down, with a gradient that vanishes as it falls — slowly: with
    per-token log-ratios and β = 0.1 the weight σ(β·d) is still 0.37 at d = −5 nats per token. `floor` > 0
    clamps d at −floor (our extension, like the cap on −KL): a sequence already that far below the reference
    contributes a constant and no gradient, so re-immunizing a release cannot push its answers into noise."""
    ratio = policy_logps - reference_logps
    if floor > 0:
        ratio = torch.clamp(ratio, min=-floor)
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per response token, averaged per sequence: [batch]."""
    p_logits, _, mask = _shift(p_logits, labels)
    q_logits = q_logits[:, :-1]
    log_p = torch.log_softmax(p_logits[mask].float(), dim=-1)
    log_q = torch.log_softmax(q_logits[mask].float(), dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    seq_ids = torch.nonzero(mask)[:, 0]
    totals = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=per_token.device).index_add_(0, seq_ids, per_token)
    return totals / mask.sum(-1).clamp_min(1)


def bounded_negative_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        tau: float) -> torch.Tensor:
    """L_RKL = −mean over sequences of min(KL(student ‖ harmful teacher), τ).

    −KL alone is unbounded below: minimizing it can blow the student up into noise. Capping each
    sequence's KL at τ (nats per token) removes the gradient once that sequence is τ away from the
    teacher, so the term moves the model off the harmful strategy, then stops pulling."""
    kl = token_kl(student_logits, teacher_logits.detach(), labels)
    return -torch.clamp(kl, max=tau).mean()


def refusal_loss(npo: torch.Tensor, rkl: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """L_refusal = γ · ((1 − λ) · L_NPO + λ · L_RKL)."""
    return gamma * ((1.0 - lam) * npo + lam * rkl)


def annealed_gamma(step: int, gamma0: float, rate: float) -> float:
    """γ = min(1, γ0 + step · rate)."""
    return min(1.0, gamma0 + step * rate)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct preference optimization, Rafailov et al. 2023, eq. 7:
        L = −mean logσ(β · ((log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))))."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()


def alignment_loss(dpo: torch.Tensor, kl: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_alignment = (1 − α) · L_DPO + α · L_KL."""
    return (1.0 - alpha) * dpo + alpha * kl


def sum_of_squares(current: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """Σ (c − a)² over all entries of all tensors together."""
    return sum((((c.float() - a.float()) ** 2).sum() for c, a in zip(current, anchor, strict=True)),
               torch.zeros(()))


def stabilization_loss(current: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """MSE between the canaries' current values and their anchor (values at the start of Phase 2),
    over all canary elements of all parameters together."""
    if not current:
        raise ValueError("stabilization_loss needs at least one canary tensor")
    return sum_of_squares(current, anchor) / sum(c.numel() for c in current)


def stabilization_grad(current: list[torch.Tensor], anchor: list[torch.Tensor], count: int | None = None) -> list[torch.Tensor]:
    """∂ stabilization_loss / ∂ current in closed form, 2·(c − a)/N, N the number of canaries (`count`: all of
    them, when `current` is one process's share under FSDP). The trainer adds it at the canary indices only:
    autograd through `param.reshape(-1)[idx]` would scatter into a full-size zero tensor for every parameter
    (0.2 s per step on SmolLM2-135M)."""
    n = sum(c.numel() for c in current) if count is None else count
    return [2.0 * (c.float() - a.float()) / n for c, a in zip(current, anchor, strict=True)]

