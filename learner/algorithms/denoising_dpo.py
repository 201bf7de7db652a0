"""Online Diffusion-DPO in its denoising form: the offline loss of Wallace et al. (CVPR 2024, eq. 14)
on preference pairs drawn from the epoch's own samples.

Each prompt's samples are ranked by reward and the k-th best is paired with the k-th worst
(``learner.selection.ranked_pairs``). A pair's two final latents x0_w, x0_l are noised with a common
(t, ε), t ~ U{0, …, T_train − 1}, and the loss is

    L = −log σ(−β [(‖ε − ε_θ(x_t^w)‖² − ‖ε − ε_ref(x_t^w)‖²) − (‖ε − ε_θ(x_t^l)‖² − ‖ε − ε_ref(x_t^l)‖²)])

with the conditional prediction (no guidance) and the per-sample mean squared error, averaged over
``dpo_noise_draws`` draws of (t, ε) per pair. β is ``dpo.beta`` (the offline form's).

Why a second online form: the trajectory form (``online_dpo``) and DDPO weight the score of every
sampled transition, ∇ log p(x_{t−1} | x_t) ∝ ε_t / σ_t · ∂μ/∂θ, by the sample's advantage; the injected
noise ε_t of all T steps enters the estimate, and most of it is unrelated to the reward. This form
never differentiates a sampled transition: it asks the model to denoise the preferred image better than
the other one, a regression target, so the sampling noise does not enter its gradient.
``benchmarks/gradient_noise.py`` measures both estimators' gradient noise (BENCHMARKS.md).

Several learner ranks draw the same (t, ε) (one seeded generator) and split each step's (pair, draw)
items; each backpropagates its share with the whole step's weights and the step sums the gradients.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from learner.algorithms.base import TrainState, UpdateInputs, UpdateResult
from learner.algorithms.denoising_draws import NoiseDraws
from learner.dpo import denoising_target, diffusion_dpo_loss, per_sample_mse
from learner.selection import ranked_pairs
from learner.transitions import TransitionBatch, embeds_for


def _errors(state: TrainState, batch: TransitionBatch, x0: torch.Tensor, i: torch.Tensor, t: torch.Tensor,
            eps: torch.Tensor, *, reference: bool) -> torch.Tensor:
    """Per-sample noise-prediction error [m] of the policy (or the reference: adapters off, no graph) on
    the final latents of samples i [m] noised to steps t [m] with ε [m, C, h, w], conditioned on the
    prompt (re-encoded when the text encoder trains, so TexForce gets its gradient)."""
    policy = state.policy
    noisy = policy.scheduler.add_noise(x0[i], eps, t).to(policy.dtype)
    context = policy.reference() if reference else contextlib.nullcontext()
    with context, torch.set_grad_enabled(not reference):
        embeds = embeds_for(policy, batch, i)[0]
        target = denoising_target(policy.scheduler, x0[i], eps, t)  # ε, or v for a v-prediction model
        return per_sample_mse(policy.unet(noisy, t, embeds).sample, target)


def denoising_dpo(state: TrainState, inputs: UpdateInputs) -> UpdateResult:
    spec, batch, policy = state.spec, inputs.batch, state.policy
    winners, losers = ranked_pairs(inputs.groups, inputs.rewards)
    if winners.size == 0:
        return UpdateResult(stats={"train/n_pairs": 0, "dpo/n_pairs": 0})
    draws = NoiseDraws(policy, batch.latents, inputs.rng)
    x0 = draws.x0  # [N, C, h, w]: the sampled final latents
    totals = {"dpo/loss": 0.0, "dpo/acc": 0.0, "dpo/margin": 0.0, "train/grad_norm": 0.0}
    applied, n_pairs = 0, 0
    for _ in range(spec.inner_epochs):
        order = inputs.rng.permutation(winners.size)
        for chunk in np.array_split(order, min(spec.updates_per_epoch, winners.size)):
            # every (pair, draw) of the step; a draw's t and ε are shared by the pair's two images
            pairs = np.repeat(chunk, spec.dpo_noise_draws)
            t, eps = draws.draw(pairs.size)
            state.stepper.zero_grad()
            step_loss, step_acc, step_margin = 0.0, 0.0, 0.0
            mine = state.group.shard(np.arange(pairs.size))  # this rank's items (all of them on one learner)
            for start in range(0, mine.size, spec.micro_batch_size):
                part = torch.from_numpy(mine[start : start + spec.micro_batch_size])
                w = torch.from_numpy(winners[pairs[part.numpy()]])
                lo = torch.from_numpy(losers[pairs[part.numpy()]])
                errors = [_errors(state, batch, x0, idx, t[part], eps[part], reference=ref)
                          for ref in (False, True) for idx in (w, lo)]
                loss, stats = diffusion_dpo_loss(*errors, beta=spec.dpo_denoise_beta)
                share = len(w) / pairs.size
                state.stepper.backward(loss * share)
                step_loss += float(loss.detach()) * share
                step_acc += float(stats["implicit_acc"]) * share
                step_margin += float(stats["reward_margin"]) * share
            result = state.stepper.step(loss_finite=math.isfinite(step_loss))  # agreed over the ranks
            if result.skipped:
                continue
            totals["train/grad_norm"] += result.grad_norm
            totals["dpo/loss"] += step_loss
            totals["dpo/acc"] += step_acc
            totals["dpo/margin"] += step_margin
            applied += 1
            n_pairs += pairs.size
    state.stepper.zero_grad()
    if not applied:
        return UpdateResult(stats={"train/n_pairs": 0, "dpo/n_pairs": int(winners.size)})
    if state.group.active:  # each rank holds its share of the steps' means; the grad norm is the same on all
        totals.update(state.group.sum_values({k: v for k, v in totals.items() if k.startswith("dpo/")}))
    stats = {k: v / applied for k, v in totals.items()}
    # train/n_pairs counts trained (pair, noise draw) items, dpo/n_pairs preference pairs.
    stats.update({"train/loss": stats["dpo/loss"], "train/n_pairs": n_pairs, "dpo/n_pairs": int(winners.size)})
    return UpdateResult(stats=stats, optimizer_steps=applied)
