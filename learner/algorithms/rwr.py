"""Reward-weighted regression (RWR) on the epoch's own samples: the baseline of DDPO (Black et al.,
"Training Diffusion Models with Reinforcement Learning", ICLR 2024, §4.1), after Peters & Schaal's RWR.

The objective is the reward-weighted likelihood of the samples, max E[w(r) log p_θ(x0 | c)], whose usual
bound for a diffusion model is the denoising loss, so each optimizer step minimizes

    L = Σ_i w_i ‖ε − ε̃_θ(√ᾱ_t x0_i + √(1 − ᾱ_t) ε, t, c_i)‖² / Σ_i w_i

over the step's samples i with t ~ U{0, …, T_train − 1}, ε ~ N(0, I) (``noise_draws`` draws per sample),
where ε̃_θ = ε_θ(·, ∅) + w (ε_θ(·, c) − ε_θ(·, ∅)) is the classifier-free-guided prediction the samplers
use (v in place of ε for a v-prediction model). Why the guided one: the policy being trained is the
guided sampler; regressing the conditional prediction alone on guided samples pulls ε_θ(·, c) towards
the guided output every epoch while ε_θ(·, ∅) stays, so the effective guidance compounds (measured on
the shapes world, 4 square prompts, CLIP reward, lr 1e-3: the judge's accuracy 0.31 -> 0.02 in 10
epochs that way, 0.31 -> 0.17 with the guided prediction).

A caution, measured (README, "The shapes world"): even so, RWR on a small model's own samples drifts.
It regresses the model on its samples' defects too, and they compound epoch after epoch (on the 4
prompts of ``configs/prompts/shapes_tune.txt``: the judge's accuracy 0.58 -> 0.08 in 20 epochs while
online Diffusion-DPO, whose loss is a difference of two samples of one prompt, raised it to 0.75).

The weights come from the sample's reward within its group
(its prompt, or a B² branch group), so a prompt that is easy does not dominate one that is hard:

- ``sparse`` (DDPO's RWR-sparse, w = 1[r above the group's mean]): a filtered fine-tune on the better half;
- ``exponential`` (DDPO's RWR, w = exp(β r)): w_i = exp(z_i / τ), z_i the reward z-scored in the group.

Why it is here: its gradient is a regression gradient on fixed targets (the sampled x0), so unlike DDPO's
score-function estimator the sampling noise of the T transitions does not enter it, and unlike the
denoising form of Diffusion-DPO it never pushes the model away from a sample, only towards the better ones.
A group whose rewards are all equal carries no preference and gets weight 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from learner.algorithms.base import TrainState, UpdateInputs, UpdateResult
from learner.algorithms.denoising_draws import NoiseDraws
from learner.dpo import denoising_target, per_sample_mse
from learner.transitions import embeds_for


def rwr_weights(group_ids: np.ndarray, rewards: np.ndarray, *, weighting: str, temperature: float) -> np.ndarray:
    """Per-sample weights float64 [N] (see the module docstring). Non-finite rewards and groups whose
    finite rewards are all equal get 0."""
    group_ids = np.asarray(group_ids)
    rewards = np.asarray(rewards, dtype=np.float64)
    if weighting not in ("sparse", "exponential"):
        raise ValueError(f"rwr weighting={weighting!r} is not one of ['sparse', 'exponential']")
    weights = np.zeros(rewards.shape, dtype=np.float64)
    for group in np.unique(group_ids):
        members = np.flatnonzero((group_ids == group) & np.isfinite(rewards))
        r = rewards[members]
        if r.size < 2 or np.ptp(r) == 0:
            continue
        z = (r - r.mean()) / r.std()
        weights[members] = (z > 0).astype(np.float64) if weighting == "sparse" else np.exp(z / temperature)
    return weights


def rwr(state: TrainState, inputs: UpdateInputs) -> UpdateResult:
    spec, batch, policy = state.spec, inputs.batch, state.policy
    weights = rwr_weights(inputs.groups, inputs.rewards, weighting=spec.rwr_weighting,
                          temperature=spec.rwr_temperature)
    chosen = np.flatnonzero(weights > 0)
    if chosen.size == 0:
        return UpdateResult(stats={"train/n_pairs": 0, "rwr/n_weighted": 0})
    draws = NoiseDraws(policy, batch.latents, inputs.rng)
    device, x0 = draws.device, draws.x0  # x0: [N, C, h, w], the sampled final latents
    totals = {"rwr/loss": 0.0, "train/grad_norm": 0.0}
    applied, n_items = 0, 0
    for _ in range(spec.inner_epochs):
        order = inputs.rng.permutation(chosen)
        for chunk in np.array_split(order, min(spec.updates_per_epoch, chosen.size)):
            items = np.repeat(chunk, spec.rwr_noise_draws)  # every (sample, draw) of the step
            t, eps = draws.draw(items.size)
            w = torch.from_numpy(weights[items] / weights[items].sum()).float().to(device)  # sums to 1
            state.stepper.zero_grad()
            step_loss = 0.0
            mine = state.group.shard(np.arange(items.size))  # this rank's items (all of them on one learner)
            for start in range(0, mine.size, spec.micro_batch_size):
                part = torch.from_numpy(mine[start : start + spec.micro_batch_size])
                idx = torch.from_numpy(items[part.numpy()])
                noisy = policy.scheduler.add_noise(x0[idx], eps[part], t[part]).to(policy.dtype)
                # the guided prediction: the policy is the guided sampler (see the module docstring);
                # the embeddings are re-encoded when the text encoder trains
                prediction = policy.guided_output(noisy, t[part], *embeds_for(policy, batch, idx))
                target = denoising_target(policy.scheduler, x0[idx], eps[part], t[part])  # ε, or v
                errors = per_sample_mse(prediction, target)  # [m]
                loss = (w[part] * errors).sum()  # this part's share of the step's weighted mean
                state.stepper.backward(loss)
                step_loss += float(loss.detach())
            if state.group.active:  # the step's loss is the sum of the ranks' shares
                step_loss = state.group.sum_values({"loss": step_loss})["loss"]
            result = state.stepper.step(loss_finite=math.isfinite(step_loss))  # agreed over the ranks
            if result.skipped:
                continue
            totals["train/grad_norm"] += result.grad_norm
            totals["rwr/loss"] += step_loss
            applied += 1
            n_items += items.size
    state.stepper.zero_grad()
    if not applied:
        return UpdateResult(stats={"train/n_pairs": 0, "rwr/n_weighted": int(chosen.size)})
    stats = {k: v / applied for k, v in totals.items()}
    # train/n_pairs counts the trained (sample, noise draw) items (the throughput metric's unit)
    stats.update({"train/loss": stats["rwr/loss"], "train/n_pairs": n_items, "rwr/n_weighted": int(chosen.size),
                  "rwr/weight_max_share": float(weights.max() / weights.sum())})
    return UpdateResult(stats=stats, optimizer_steps=applied)
