"""Diffusion-DPO losses (pure functions: tensors in, a loss and a stats dict out).

Two forms:

1. Offline, on preference pairs of images (x0_w preferred over x0_l) noised to a common x_t with a
   common ε (Wallace et al., CVPR 2024, "Diffusion Model Alignment Using Direct Preference
   Optimization", final objective, eq. 14, with the timestep weight T·ω(λ_t) folded into β; the
   paper's pseudo-code)::

       w_diff = ‖ε - ε_θ(x_t^w)‖² - ‖ε - ε_ref(x_t^w)‖²
       l_diff = ‖ε - ε_θ(x_t^l)‖² - ‖ε - ε_ref(x_t^l)‖²
       inside = -β (w_diff - l_diff)
       L      = -log σ(inside)

   ``inside`` is the implicit reward margin: it is > 0 when the policy denoises the winner better
   (relative to the reference) than the loser. The paper's pseudo-code writes ``.norm().pow(2)`` (a sum over
   dimensions) and β; the authors' training script uses the per-sample *mean* squared error and
   ``inside = -½ β (w_diff - l_diff)``, which is this function with ``beta = β_script / 2``. The
   error reduction (sum or mean) sets the scale β is calibrated to; ``per_sample_mse`` is the mean.

2. Online, on branch pairs of DDIM trajectories (B²-DiffuRL §4.5 "DPO")::

       h = β Σ_t [(log p_θ - log p_ref)(x_{t-1}^w | x_t^w) - (log p_θ - log p_ref)(x_{t-1}^l | x_t^l)]
       L = -log σ(h)

   over the trained timesteps t of the pair (the BPT interval). The per-step log-probs are the
   dimension-mean log-densities of ``actors.ddim.gaussian_log_prob``.

Losses are means over pairs; ``F.logsigmoid`` keeps them finite for any margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta!r} is invalid: the DPO temperature must be > 0")


def _check_same_shape(**tensors: torch.Tensor) -> torch.Size:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"DPO inputs must share one shape, got {shapes}")
    return next(iter(tensors.values())).shape


def _stats(margin: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        margin = margin.detach()
        return {
            "implicit_acc": (margin > 0).float().mean(),
            "reward_margin": margin.mean(),
        }


def denoising_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses on x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε: ε for an ε-prediction model, the
    velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x0 for a v-prediction one (Salimans & Ho, 2022). x0, ε [B, C, h, w],
    t [B] -> [B, C, h, w]. Other prediction types raise a ValueError naming the scheduler's setting."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, eps, t)
    raise ValueError(f"scheduler prediction_type={prediction_type!r} is not supported by the denoising losses: "
                     "expected 'epsilon' or 'v_prediction'")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖prediction - target‖² averaged over the non-batch dims -> [B] (float32)."""
    err = (prediction.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Offline Diffusion-DPO (Wallace et al., CVPR 2024, eq. 14; the paper's pseudo-code, line for line).

    Args: per-sample noise-prediction errors [B] of the policy (with grad) and of the reference
    (adapters disabled, no grad) on the winner (w) and loser (l) of each pair; β > 0.
    Returns: (loss [], stats) with ``implicit_acc`` = fraction of pairs with inside > 0 and
    ``reward_margin`` = mean inside, where inside = -β ((model_w - ref_w) - (model_l - ref_l)).
    """
    _check_beta(beta)
    shape = _check_same_shape(
        model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l
    )
    if len(shape) != 1:
        raise ValueError(f"errors must be per-sample [B], got shape {tuple(shape)}")
    w_diff = model_err_w - ref_err_w
    l_diff = model_err_l - ref_err_l
    inside = -beta * (w_diff - l_diff)
    loss = -F.logsigmoid(inside).mean()
    return loss, _stats(inside)


def trajectory_dpo_loss(
    logp_w: torch.Tensor,
    ref_logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_l: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Online trajectory DPO on branch pairs (B²-DiffuRL §4.5 with DPO).

    L = mean_p -log σ(β Σ_t [(logp_θ - logp_ref)(w_t) - (logp_θ - logp_ref)(l_t)]).

    Args: per-step log-probs [P, T] (P pairs, T trained timesteps; [P] when already summed) of the
    winner and loser transitions under the policy (with grad) and the reference (no grad); β > 0.
    Returns: (loss [], stats) with ``implicit_acc`` (fraction of pairs with h > 0) and
    ``reward_margin`` (mean h).
    """
    _check_beta(beta)
    shape = _check_same_shape(logp_w=logp_w, ref_logp_w=ref_logp_w, logp_l=logp_l, ref_logp_l=ref_logp_l)
    if len(shape) not in (1, 2):
        raise ValueError(f"log-probs must be [P, T] or [P], got shape {tuple(shape)}")
    diff = (logp_w - ref_logp_w) - (logp_l - ref_logp_l)
    if diff.ndim == 2:
        diff = diff.sum(dim=1)
    margin = beta * diff
    loss = -F.logsigmoid(margin).mean()
    return loss, _stats(margin)
