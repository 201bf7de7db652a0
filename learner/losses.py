"""Policy losses on DDIM transitions (pure functions: tensors in, tensors and a stats dict out).

Shapes: every per-transition input is [N] (N = a minibatch of (sample, timestep) pairs); losses are
means over N, so gradients are averaged over samples x timesteps.
"""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip on per-step likelihood ratios (DDPO-IS, Black et al. 2023, eq. 4 with clipping).

    ρ = exp(log p_θ - log p_old);  L = mean(max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε))).

    Args: log_prob [N] (with grad), old_log_prob [N] (recorded at sampling), advantages [N], clip_range ε > 0.
    Returns: (loss [], stats) with ``approx_kl`` = ½ mean((log p_θ - log p_old)²) (DDPO's estimator),
    ``clipfrac`` = the fraction of pairs with |ρ - 1| > ε, and ``ratio`` = mean ρ. Stats are detached.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def policy_gradient_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE / DDPO-SF (Black et al. 2023, eq. 3): L = -mean(A · log p_θ).

    ``old_log_prob`` only feeds the diagnostics (``approx_kl``; ``clipfrac`` is 0 by definition).
    """
    loss = -(advantages * log_prob).mean()
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": torch.zeros((), device=log_prob.device),
            "ratio": torch.exp(log_ratio).mean(),
        }
    return loss, stats


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, σ²I) ‖ N(ref_mean, σ²I)) per sample, averaged over non-batch dims -> [B].

    Both DDIM transition Gaussians share σ_t, so the KL reduces to ‖μ_θ - μ_pre‖² / (2σ_t²)
    (DPOK; GARD eq. 9 and 15). mean/ref_mean [B, ...]; std broadcasts against them.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
