"""Online Diffusion-DPO on trajectory pairs (Wallace et al., CVPR 2024: eq. 14 in trajectory form).

L = −log σ(β Σ_t [(log p_θ − log p_ref)(w_t) − (log p_θ − log p_ref)(l_t)]), t over ``inputs.steps``,
for the best and the worst sample of each group (prompt or B² branch group), or explicit pairs
(D-Fusion's fused ≻ poorly aligned samples). β is ``dpo_beta``.

Memory: the sums over steps would need one graph over P x |steps| transitions. Instead the sums are
computed without a graph, the loss's gradient with respect to each pair's two sums is taken by autograd
on ``trajectory_dpo_loss`` itself (so it cannot drift from the loss), and each transition's log-prob
is then backpropagated micro-batch by micro-batch with that weight: by the chain rule, the exact
gradient of L.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from learner.algorithms.base import TrainState, UpdateInputs, UpdateResult
from learner.dpo import trajectory_dpo_loss
from learner.selection import preference_pairs
from learner.transitions import sum_log_probs


def online_dpo(state: TrainState, inputs: UpdateInputs) -> UpdateResult:
    spec, steps = state.spec, inputs.steps
    if inputs.pairs is not None:
        batch, winners, losers = inputs.pairs.batch, inputs.pairs.winners, inputs.pairs.losers
    else:
        batch = inputs.batch
        winners, losers = preference_pairs(inputs.groups, inputs.rewards)
    if winners.size == 0:
        return UpdateResult(stats={"train/n_pairs": 0, "dpo/n_pairs": 0})
    # Several ranks: each computes its share of every pair's transitions (the sums are exchanged, so every
    # rank computes the same loss and weights) and backpropagates that share; the step sums the gradients.
    sums_of = dict(policy=state.policy, batch=batch, steps=steps, micro_batch_size=spec.micro_batch_size,
                   group=state.group)
    totals = {"dpo/loss": 0.0, "dpo/acc": 0.0, "dpo/margin": 0.0, "train/grad_norm": 0.0}
    applied, n_transitions = 0, 0
    for _ in range(spec.inner_epochs):
        order = inputs.rng.permutation(winners.size)
        for chunk in np.array_split(order, min(spec.updates_per_epoch, winners.size)):
            w, l_ = winners[chunk], losers[chunk]
            ref_w = sum_log_probs(samples=w, reference=True, **sums_of)
            ref_l = sum_log_probs(samples=l_, reference=True, **sums_of)
            pol_w = sum_log_probs(samples=w, **sums_of).requires_grad_(True)
            pol_l = sum_log_probs(samples=l_, **sums_of).requires_grad_(True)
            loss, dpo_stats = trajectory_dpo_loss(pol_w, ref_w, pol_l, ref_l, beta=spec.dpo_beta)
            coeff_w, coeff_l = torch.autograd.grad(loss, [pol_w, pol_l])  # dL / dΣ_t log p_θ, per pair
            state.stepper.zero_grad()
            sum_log_probs(samples=w, backward=state.stepper.backward, weights=coeff_w, **sums_of)
            sum_log_probs(samples=l_, backward=state.stepper.backward, weights=coeff_l, **sums_of)
            loss = loss.detach()
            result = state.stepper.step(loss_finite=math.isfinite(float(loss)))
            if result.skipped:
                continue
            totals["train/grad_norm"] += result.grad_norm
            totals["dpo/loss"] += float(loss)
            totals["dpo/acc"] += float(dpo_stats["implicit_acc"])
            totals["dpo/margin"] += float(dpo_stats["reward_margin"])
            applied += 1
            n_transitions += 2 * len(chunk) * len(steps)
    state.stepper.zero_grad()
    if not applied:
        return UpdateResult(stats={"train/n_pairs": 0, "dpo/n_pairs": int(winners.size)})
    stats = {k: v / applied for k, v in totals.items()}
    # train/n_pairs counts trained (sample, timestep) transitions, dpo/n_pairs preference pairs.
    stats.update({"train/loss": stats["dpo/loss"], "train/n_pairs": n_transitions, "dpo/n_pairs": int(winners.size)})
    return UpdateResult(stats=stats, optimizer_steps=applied)
