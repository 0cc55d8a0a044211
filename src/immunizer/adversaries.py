"""The simulated attacks Phase 1 trains against (`phase1.adversary`). Each moves the student's weights to where
a harmful fine-tune would take them and returns how to move back; the refusal loss is then taken there.

    lat    δ = −ε·g/‖g‖        one normalized gradient step (L2 norm ε over all weights; the seed's LAT)
    sign   δ = −ε·sign(g)      every weight moves by ε against its harmful-SFT gradient: the shape of an Adam
                               update, whose bias-corrected first step is ±lr on every coordinate
    inner  K AdamW steps of harmful SFT from the current weights (a fresh optimizer each outer step, K and the
           learning rate drawn per step), as TAR's adversary does (Tamirisa et al. 2024, arXiv 2408.00761);
           the refusal gradient taken at the adapted weights is applied at the original ones (first order)

Why `sign` and `inner`: the standard attack (AdamW, lr 5e-5, 39 steps) moved SmolLM2-135M's weights by an RMS
of 2.9e-4 per weight after 20 steps (L2 ≈ 3.4), about 34× lat's ε = 0.1 (bench/results/adaptive_attack.json);
a perturbation that small leaves the refusal loss evaluated, in effect, at the unattacked weights.
Written here: no maintained library offers weight-space adversaries for causal-LM fine-tuning."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from immunizer.data.batches import Batch
from immunizer.data.teacher import autocast
from immunizer.losses import sft_loss
from immunizer.parallel import DataParallel

ONE_PROCESS = DataParallel.single()


@dataclass
class Displacement:
    """Where an adversary moved the weights: `undo()` moves them back; `stats` go to metrics.jsonl."""
    undo: Callable[[], None]
    stats: dict = field(default_factory=dict)


def normalized_perturbation(grads: list[torch.Tensor | None], epsilon: float, sign: float,
                            dp: DataParallel = ONE_PROCESS) -> list[torch.Tensor]:
    """δ = sign·ε·g/‖g‖ with ‖g‖ the global L2 norm over all parameters (under FSDP `grads` are this process's
    pieces, and ‖g‖ is summed over the processes)."""
    if dp.sharded:
        norm = max(dp.norm(grads), 1e-12)
    else:  # one fp32 reduction, as every release so far was trained with
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).clamp_min(1e-12)
    return [torch.zeros(0) if g is None else (sign * epsilon / norm) * g for g in grads]


def sign_perturbation(grads: list[torch.Tensor | None], epsilon: float) -> list[torch.Tensor]:
    """δ = −ε·sign(g) per weight (a weight with zero gradient stays where it is)."""
    return [torch.zeros(0) if g is None else -epsilon * torch.sign(g) for g in grads]


@torch.no_grad()
def apply_perturbation(params: list[torch.Tensor], delta: list[torch.Tensor], direction: float) -> None:
    for p, d in zip(params, delta):
        if d.numel():
            p.add_(d, alpha=direction)


def harmful_sft_loss(model, harmful: Batch, bf16: bool, dp: DataParallel = ONE_PROCESS) -> torch.Tensor:
    """The attacker's loss on `harmful` (in a data-parallel run, this process's share of the batch's mean); Phase 1
    also takes it on (prompt, refusal) pairs at the moved weights (`adapted_refusal_weight`)."""
    tokens = dp.token_normalizer(harmful.labels)
    with autocast(bf16):
        logits = model(input_ids=harmful.input_ids, attention_mask=harmful.attention_mask).logits
    return sft_loss(logits, harmful.labels, tokens)


def take_gradients(loss: torch.Tensor, params: list[torch.Tensor], dp: DataParallel = ONE_PROCESS) -> list:
    """∂loss/∂params averaged over the processes, with the parameters' `.grad` left empty. Through `backward()`
    rather than `torch.autograd.grad`: FSDP's hooks gather and reduce-scatter on backward only (under FSDP the
    gradients are this process's pieces). The caller's `.grad` must be empty before."""
    loss.backward()
    dp.average_gradients(params)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _gradient_step(model, params, harmful: Batch, bf16: bool, make_delta, dp: DataParallel) -> Displacement:
    loss = harmful_sft_loss(model, harmful, bf16, dp)
    grads = take_gradients(loss, params, dp)
    delta = make_delta(grads)
    del grads
    apply_perturbation(params, delta, +1.0)
    return Displacement(lambda: apply_perturbation(params, delta, -1.0),
                        {"adversary_sft_loss": loss.item(), "adversary_l2": dp.norm(delta)})


def lat_perturb(model, params, harmful: Batch, epsilon: float, bf16: bool, dp: DataParallel = ONE_PROCESS) -> Displacement:
    """Move the weights one normalized step towards the harmful responses (L2 norm ε)."""
    return _gradient_step(model, params, harmful, bf16,
                          lambda g: normalized_perturbation(g, epsilon, sign=-1.0, dp=dp), dp)


def sign_perturb(model, params, harmful: Batch, epsilon: float, bf16: bool, dp: DataParallel = ONE_PROCESS) -> Displacement:
    """Move every weight by ε against the sign of its harmful-SFT gradient (L∞ norm ε)."""
    return _gradient_step(model, params, harmful, bf16, lambda g: sign_perturbation(g, epsilon), dp)


def inner_attack(model, params, batches: list[Batch], lr: float, bf16: bool,
                 dp: DataParallel = ONE_PROCESS) -> Displacement:
    """Fine-tune on `batches` (one AdamW step each, a fresh optimizer, no weight decay: the attack) from the
    current weights; `undo()` restores the weights. The gradients this leaves behind are cleared."""
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = harmful_sft_loss(model, batch, bf16, dp)
        loss.backward()
        dp.average_gradients(params)
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    del optimizer  # its moments belong to this simulated attack only
    with torch.no_grad():  # one difference at a time: a list of them would hold a second copy of the model
        moved = dp.norm(p - s for p, s in zip(params, saved))

    @torch.no_grad()
    def undo():
        for p, s in zip(params, saved):
            p.copy_(s)

    return Displacement(undo, {"adversary_sft_loss": losses[0], "adversary_sft_loss_last": losses[-1],
                               "adversary_l2": moved, "inner_steps": len(batches), "inner_lr": lr})


def draw_inner_attack(steps: list[int], lr: list[float], seed: int) -> tuple[int, float]:
    """K uniform in [steps[0], steps[1]], the learning rate log-uniform in [lr[0], lr[1]]; seeded per outer step
    so that a resumed run draws the same attacks."""
    rng = random.Random(f"{seed}:inner-attack")
    k = rng.randint(int(steps[0]), int(steps[-1]))
    low, high = math.log(lr[0]), math.log(lr[-1])
    return k, math.exp(rng.uniform(low, high))


def stay() -> Displacement:
    return Displacement(lambda: None)


# phase1.adversary -> how it moves the weights. Each takes (cfg, model, params, harmful batch, bf16, seed,
# sample_batches, dp), where sample_batches(k, seed) gives k batches of the cycle's harmful pairs (for `inner`;
# this process's share of each) and dp the data-parallel job (parallel.py); an adversary of size 0 stays where it is.
def _none(cfg, model, params, harmful, bf16, seed, sample_batches, dp) -> Displacement:
    return stay()


def _lat(cfg, model, params, harmful, bf16, seed, sample_batches, dp) -> Displacement:
    return lat_perturb(model, params, harmful, cfg.lat_epsilon, bf16, dp) if cfg.lat_epsilon > 0 else stay()


def _sign(cfg, model, params, harmful, bf16, seed, sample_batches, dp) -> Displacement:
    return sign_perturb(model, params, harmful, cfg.sign_epsilon, bf16, dp) if cfg.sign_epsilon > 0 else stay()


def _inner(cfg, model, params, harmful, bf16, seed, sample_batches, dp) -> Displacement:
    k, lr = draw_inner_attack(cfg.inner_steps, cfg.inner_lr, seed)
    return inner_attack(model, params, sample_batches(k, seed), lr, bf16, dp) if k > 0 else stay()


ADVERSARIES: dict[str, Callable[..., Displacement]] = {"none": _none, "lat": _lat, "sign": _sign, "inner": _inner}
