"""The DDIM step with the log-probability of the transition it samples (pure math, no I/O).

Notation (DDIM paper, Song et al. 2021, eq. 12 and 16; DDPO, Black et al. 2023):

    ᾱ_t  = scheduler.alphas_cumprod[t]         t' = t - T_train // num_inference_steps
    ᾱ_t' = alphas_cumprod[t'] for t' >= 0, else alphas_cumprod[0]   (so σ_t > 0 at the last step)
    x̂0   = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)                     (eq. 12, "predicted x0")
    σ_t  = η sqrt((1 - ᾱ_t') / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_t')        (eq. 16)
    μ    = sqrt(ᾱ_t') x̂0 + sqrt(1 - ᾱ_t' - σ_t²) ε̂
    x_t' = μ + σ_t z,  z ~ N(0, I)
    log p(x_t' | x_t) = mean over C,H,W of [-(x_t' - μ)² / (2σ_t²) - log σ_t - ½ log 2π]

The mean over the non-batch dimensions (not the sum) sets the scale that the PPO clip range is
calibrated to (DDPO). Given the same noise z, ``prev_sample`` equals diffusers'
``DDIMScheduler.step(..., eta=η)`` for a scheduler with ``set_alpha_to_one=False``.

Shapes: ``sample``/``model_output`` [B, C, H, W]; ``timestep`` an int or a tensor [B] (a batch of
(sample, timestep) pairs at different timesteps, as the learner trains them).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] (or scalar) tensor against [B, C, H, W]."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def _alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_t') for int or [B] timesteps; t' is clamped at 0 (see the module docstring)."""
    step = _step_size(scheduler)
    t = torch.as_tensor(timestep, dtype=torch.long).cpu()
    prev_t = (t - step).clamp(min=0)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    return alphas_cumprod[t], alphas_cumprod[prev_t]


def check_ddim_schedule(scheduler, *, eta: float = 1.0) -> None:
    """Refuses a schedule on which some step has σ_t = 0 (its log-prob would be NaN).

    diffusers' ``DDIMScheduler.step`` takes t' = t - T_train // num_inference_steps whatever the
    ``timestep_spacing``, and with ``set_alpha_to_one=False`` uses ᾱ_{t'} = alphas_cumprod[0] for t' < 0.
    A schedule that contains t = 0 (``linspace`` spacing, or ``leading`` with ``steps_offset=0``) then
    has ᾱ_t' = ᾱ_t at its last step, σ_t = 0 and a deterministic transition with no density. gard keeps
    diffusers' t' (so sampling equals ``DDIMScheduler.step`` for every schedule it accepts) and refuses
    these schedules instead, naming the scheduler fields to change. Also refuses ``set_alpha_to_one=True``
    for the same reason. Call after ``set_timesteps``; raises ValueError.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called before checking the schedule")
    config = scheduler.config
    timesteps = torch.as_tensor(scheduler.timesteps).cpu()
    alpha_t, alpha_prev = _alphas(scheduler, timesteps)
    if getattr(config, "set_alpha_to_one", False):
        alpha_prev = torch.where(timesteps - _step_size(scheduler) < 0, torch.ones_like(alpha_prev), alpha_prev)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    bad = torch.nonzero(~(variance > 0) | ~torch.isfinite(variance)).flatten().tolist()
    if bad:
        k = bad[0]
        raise ValueError(
            f"the DDIM schedule has sigma_t = 0 at step {k} (t = {int(timesteps[k])}, previous t = "
            f"{max(int(timesteps[k]) - _step_size(scheduler), 0)}): scheduler timestep_spacing="
            f"{getattr(config, 'timestep_spacing', 'leading')!r}, steps_offset={getattr(config, 'steps_offset', 0)}, "
            f"set_alpha_to_one={getattr(config, 'set_alpha_to_one', False)}, num_inference_steps="
            f"{scheduler.num_inference_steps}, eta={eta}. A step with sigma_t = 0 has no log-probability "
            f"(training on it gives NaN). Use sampling.timestep_spacing=trailing, or 'leading' with the "
            f"scheduler's steps_offset=1 (Stable Diffusion's own setting), and eta > 0")


def _step_size(scheduler) -> int:
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddim_mean_std(
    scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian p(x_t' | x_t) = N(μ, σ_t² I) of one DDIM step.

    Returns ``(mean [B, C, H, W] float32, std)`` where ``std`` broadcasts against the mean
    ([B, 1, 1, 1] for tensor timesteps, a 0-d tensor for an int timestep). Computed in float32 so
    log-probs of fp16/bf16 models stay accurate.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called before a DDIM step")
    sample = sample.to(torch.float32)
    model_output = model_output.to(torch.float32)
    alpha_t, alpha_prev = _alphas(scheduler, timestep)
    alpha_t, alpha_prev = _per_sample(alpha_t, sample), _per_sample(alpha_prev, sample)
    beta_t = 1 - alpha_t

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_eps = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    elif prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (sample - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    else:
        raise ValueError(
            f"scheduler prediction_type {prediction_type!r} is not supported; "
            "expected 'epsilon', 'v_prediction' or 'sample'"
        )
    if scheduler.config.thresholding:
        raise ValueError("scheduler.config.thresholding=True is not supported by the DDIM log-prob step")
    if scheduler.config.clip_sample:
        # Same as diffusers: clip x̂0 but keep the unclipped ε̂ for the direction term.
        limit = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-limit, limit)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * pred_eps
    mean = alpha_prev.sqrt() * pred_x0 + direction
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std² I), averaged over all non-batch dims -> [B]."""
    x = x.to(torch.float32)
    std = std.to(torch.float32)
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    *,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step x_t -> x_t' and its log-probability.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        model_output: the (guided) network output [B, C, H, W] (ε or v, per the scheduler config).
        timestep: int or long tensor [B] of training timesteps t.
        sample: x_t [B, C, H, W].
        eta: η > 0 (η = 0 is deterministic DDIM and has no log-prob).
        prev_sample: when given, x_t' is not sampled: it is returned unchanged with its log-prob
            (recomputing the log-prob of a stored transition under the current weights).
        generator: draws z ~ N(0, I) in the same order and shape as diffusers' ``step``.

    Returns:
        ``(prev_sample [B, C, H, W] in sample.dtype, log_prob [B] float32)``.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-prob, got {eta}")
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta=eta)
    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = (mean + std * noise.to(torch.float32)).to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)
