"""DDPO's update rules on (sample, timestep) pairs, with DPOK's KL to the pretrained model.

- ``ppo`` (DDPO-IS; DDPO, Black et al., ICLR 2024): L = mean(max(−A ρ, −A clip(ρ, 1−ε, 1+ε))).
- ``pg`` (DDPO-SF, the REINFORCE form): L = −mean(A · log p_θ).
- both + β·KL_t with KL_t = ‖μ_θ − μ_pre‖² / (2σ_t²) (DPOK, Fan et al., NeurIPS 2023; GARD, You and Liu, eq. 9 and 15).

Advantages: the per-prompt running statistics (DDPO's stat tracker) or batch-normalized rewards;
with B²-DiffuRL (Hu et al., CVPR 2025, eq. 5) the z-scores of the contrastively selected leaves instead, and
only those leaves are trained. Every sample keeps a random ``timestep_fraction`` of ``inputs.steps``;
the shuffled pairs form ``updates_per_epoch`` optimizer steps, each in micro-batches of
``micro_batch_size`` pairs, the loss of a step being the mean over its pairs. With ``target_kl`` the
epoch's steps stop at the first step whose approx_kl, measured on its pairs before it is applied, exceeds
the target, and that step is dropped (early stopping as in Stable-Baselines3's PPO; cleanrl's
``--target-kl`` checks after its update epochs): a bound on how far one epoch moves the policy from the
one that sampled its data, which the per-pair clip does not give.

Several learner ranks split each step's pairs (``learner/distributed.py``); the step's gradient and the
logged means are those of all its pairs. One exception: without a KL term (β = 0) ``train/kl`` is a
monitor measured on the first micro-batch of each step, i.e. of each rank's share with several ranks.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from learner.advantages import batch_advantages, clip_advantages, group_advantages
from learner.algorithms.base import TrainState, UpdateInputs, UpdateResult
from learner.losses import gaussian_kl, policy_gradient_loss, ppo_clip_loss
from learner.schedules import linear_ramp
from learner.selection import select_contrastive
from learner.transitions import TransitionBatch, reference_mean, transition_log_prob


def advantages_for(state: TrainState, inputs: UpdateInputs, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(selected sample indices, advantages float32 [N] clipped to ±adv_clip_max); updates the
    per-prompt statistics (or, with B², the z-score history)."""
    spec, prompts = state.spec, inputs.batch.prompts
    if state.schedule is not None and spec.b2_selection == "contrastive":
        # Contrastive selection: z-scores per prompt over this epoch's rewards and the last H epochs'
        # (the release's H stages of one sampling round each); per group the best leaf with z >= +th
        # and the worst with z < −th.
        z = state.zscores.update(inputs.epoch, prompts, inputs.rewards)
        positive, negative = select_contrastive(inputs.groups, z, threshold=spec.b2_threshold,
                                                neg_threshold=spec.b2_neg_threshold)
        selected = np.concatenate([positive, negative])
        advantages = np.zeros(len(prompts), dtype=np.float32)
        advantages[selected] = z[selected]
        stats.update({"b2/n_selected": int(selected.size), "b2/n_positive": int(positive.size),
                      "b2/n_negative": int(negative.size)})
    else:
        selected = np.arange(len(prompts))
        if spec.advantage == "per_prompt":
            advantages = state.stat_tracker.update(prompts, inputs.rewards)
        elif spec.advantage == "per_group":
            advantages = group_advantages(inputs.groups, inputs.rewards)
        else:
            advantages = batch_advantages(inputs.rewards)
    return selected, clip_advantages(advantages, max_abs=spec.adv_clip_max)


def micro_batch_loss(state: TrainState, batch: TransitionBatch, micro: np.ndarray, advantages: torch.Tensor, *,
                     clipped: bool, beta: float, measure_kl: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss [] (with a graph into the adapter) and ``train/`` stats of one micro-batch of (sample, step) pairs [m, 2]."""
    policy = state.policy
    i, j = torch.from_numpy(micro[:, 0]), torch.from_numpy(micro[:, 1])
    log_prob, mean, std, (x_t, t) = transition_log_prob(policy, batch, i, j)
    old = batch.old_log_probs[i, j].to(policy.device)
    adv = advantages[i].to(policy.device)
    if clipped:
        pg_loss, stats = ppo_clip_loss(log_prob, old, adv, clip_range=state.spec.clip_range)
    else:
        pg_loss, stats = policy_gradient_loss(log_prob, old, adv)
    out = {f"train/{name}": float(value) for name, value in stats.items()}
    out["train/pg_loss"] = float(pg_loss.detach())
    loss = pg_loss
    if measure_kl:
        kl = gaussian_kl(mean, reference_mean(policy, batch, i, x_t, t), std).mean()
        out["train/kl"] = float(kl.detach())
        if beta > 0:
            loss = loss + beta * kl
    out["train/loss"] = float(loss.detach())
    return loss, out


def _update(state: TrainState, inputs: UpdateInputs, *, clipped: bool) -> UpdateResult:
    spec, batch, steps, rng = state.spec, inputs.batch, inputs.steps, inputs.rng
    stats: dict[str, float] = {}
    selected, advantages = advantages_for(state, inputs, stats)
    beta = linear_ramp(inputs.epoch, start=spec.kl_beta, end=spec.kl_beta_end, ramp_epochs=spec.kl_ramp_epochs)
    stats["train/kl_beta"] = float(beta)
    stats["train/advantage_abs_mean"] = float(np.abs(advantages[selected]).mean()) if selected.size else 0.0
    adv = torch.from_numpy(advantages)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float, weight: int) -> None:
        sums[name] = sums.get(name, 0.0) + value * weight
        counts[name] = counts.get(name, 0) + weight

    n_train_steps = max(1, int(len(steps) * spec.timestep_fraction))
    n_pairs, applied, stopped_at_kl = 0, 0, None
    for _ in range(spec.inner_epochs if selected.size else 0):
        step_idx = np.stack([rng.permutation(steps)[:n_train_steps] for _ in range(selected.size)])
        sample_idx = np.repeat(selected, n_train_steps)
        pairs = np.stack([sample_idx, step_idx.reshape(-1)], axis=1)[rng.permutation(sample_idx.size)]
        for chunk in np.array_split(pairs, min(spec.updates_per_epoch, len(pairs))):
            state.stepper.zero_grad()
            step_stats: list[tuple[dict[str, float], int]] = []
            mine = state.group.shard(chunk)  # this rank's pairs; the weights below stay those of the whole step
            for start in range(0, len(mine), spec.micro_batch_size):
                micro = mine[start : start + spec.micro_batch_size]
                measure_kl = beta > 0 or start == 0  # monitor KL cheaply when it is not trained
                loss, micro_stats = micro_batch_loss(state, batch, micro, adv, clipped=clipped, beta=beta,
                                                     measure_kl=measure_kl)
                state.stepper.backward(loss * (len(micro) / len(chunk)))
                step_stats.append((micro_stats, len(micro)))
            if spec.target_kl is not None:
                step_kl = _step_approx_kl(state, step_stats)
                if step_kl > spec.target_kl:  # every rank sees the same mean, so every rank stops here
                    stopped_at_kl = step_kl
                    break
            result = state.stepper.step(loss_finite=all(math.isfinite(s["train/loss"]) for s, _ in step_stats))
            if result.skipped:  # nothing of a skipped step enters the averages
                continue
            for micro_stats, size in step_stats:
                for name, value in micro_stats.items():
                    add(name, value, size)
            add("train/grad_norm", result.grad_norm, 1)
            n_pairs += len(chunk)
            applied += 1
        if stopped_at_kl is not None:
            break
    state.stepper.zero_grad()  # also drops the gradient of a step stopped by target_kl
    if spec.target_kl is not None:
        stats["train/target_kl_stopped"] = float(stopped_at_kl is not None)
    if stopped_at_kl is not None:
        stats["train/approx_kl_at_stop"] = stopped_at_kl
    if state.group.active:  # pair-weighted means over every rank's micro-batches (grad_norm: the same on all)
        stats.update(state.group.merge_means(sums, counts))
    else:
        stats.update({name: sums[name] / counts[name] for name in sums})
    stats["train/n_pairs"] = n_pairs
    return UpdateResult(stats=stats, optimizer_steps=applied)


def _step_approx_kl(state: TrainState, step_stats: list[tuple[dict[str, float], int]]) -> float:
    """The pair-weighted approx_kl of one optimizer step's micro-batches, over every rank's share."""
    total = sum(stats["train/approx_kl"] * size for stats, size in step_stats)
    count = sum(size for _, size in step_stats)
    if state.group.active:
        return state.group.merge_means({"approx_kl": total}, {"approx_kl": count})["approx_kl"]
    return total / count


ppo = partial(_update, clipped=True)
pg = partial(_update, clipped=False)
