"""The published alignment-stage defences the harness compares immunizer with, as pure functions.
Re-implemented from the papers (no package ships them); each function cites the equation it follows.

- Vaccine (Huang, Hu & Liu 2024, "Vaccine: Perturbation-aware Alignment for Large Language Models
  against Harmful Fine-tuning Attack", NeurIPS, arXiv 2402.01109), §4, eq. (3)-(4): the worst-case
  perturbation of every layer's hidden embedding within a ρ-ball, ε_l = ρ·∇_{e_l}L / ‖∇_e L‖.
- RepNoise (Rosati et al. 2024, "Representation Noising: A Defence Mechanism Against Harmful
  Finetuning", NeurIPS, arXiv 2405.14577), §3, eq. (3): L = L_harmless + α·MMD(harmful
  representations, N(0, I)) − β·L_harmful.
- Booster (Huang et al. 2024, "Booster: Tackling Harmful Fine-tuning for Large Language Models via
  Attenuating Harmful Perturbation", ICLR 2025, arXiv 2409.01586), §4, eq. (1): min_w f(w) +
  λ·(h(w) − h(w − α·∇h(w)/‖∇h(w)‖)), whose gradient (Algorithm 1, first order) is
  ∇f(w) + λ·(∇h(w) − ∇h(w̃))."""
from __future__ import annotations

import torch


def vaccine_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Vaccine eq. (4): ε_l = ρ·g_l / ‖g‖, the norm taken over all layers' hidden-embedding gradients
    together, so the whole perturbation has L2 norm ρ."""
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).clamp_min(1e-12)
    return [(rho / norm) * g.detach() for g in grads]


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples x [n, d] and y [m, d] under a sum of Gaussian
    kernels k(a, b) = exp(−‖a − b‖² / (2σ²d)) (σ in units of √d, so the scale suits any width):
    MMD² = E k(x, x') + E k(y, y') − 2 E k(x, y), the biased estimator (Gretton et al. 2012, eq. 5)."""
    x, y = x.float(), y.float()
    d = x.shape[-1]

    def kernel(a, b):
        sq = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-sq / (2 * s * s * d)) for s in bandwidths)
    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def repnoise_loss(harmless: torch.Tensor, harmful: torch.Tensor, mmd: torch.Tensor, alpha: float, beta: float,
                  ascent_cap: float) -> torch.Tensor:
    """RepNoise eq. (3). The gradient-ascent term is capped (−min(L_harmful, cap)) so that, as in the
    paper's small β, it cannot run away once the harmful answers are already unlikely."""
    return harmless + alpha * mmd - beta * torch.clamp(harmful, max=ascent_cap)


def booster_gradient(align_grad: torch.Tensor, harmful_grad: torch.Tensor, perturbed_harmful_grad: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """Booster Algorithm 1: ∇f(w) + λ·(∇h(w) − ∇h(w − α·∇h(w)/‖∇h(w)‖)), per parameter. The
    regularizer shrinks the loss drop a normalized harmful step would buy (the "harmful perturbation")."""
    return align_grad + lam * (harmful_grad - perturbed_harmful_grad)
