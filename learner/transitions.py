"""Log-probabilities of stored DDIM transitions under the policy being trained (or its reference).

Every update rule trains on the same object: (sample i, denoising step j) pairs of stored trajectories,
whose log-prob under the current adapter is recomputed with one guided network call per micro-batch
(the DDIM step of ``actors.ddim``; DDPO, Black et al., ICLR 2024). This module holds those tensors
and that computation; the rules in ``learner/algorithms/`` decide which pairs to train and how.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.policy import Policy
from actors.trajectory import Trajectory
from learner.distributed import RankGroup


@dataclass
class TransitionBatch:
    """One epoch's training tensors.

    latents:       float32 [N, T+1, C, h, w]  the stored states x_T .. x_0 (CPU; moved per micro-batch)
    old_log_probs: float32 [N, T]             log-probs recorded at sampling time
    timesteps:     int64   [T]                training timestep t of each transition
    embeds:        [N, 77, D]                 prompt embeddings without a graph (re-encoded per
                                              micro-batch when the text encoder is trained)
    prompts:       N strings
    """

    latents: torch.Tensor
    old_log_probs: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_trajectory(cls, policy: Policy, trajectory: Trajectory, rows: np.ndarray | None = None) -> TransitionBatch:
        """The rows ``rows`` (all by default) of a trajectory batch; copies, so Ray's read-only arrays
        are never written to."""
        rows = np.arange(len(trajectory)) if rows is None else np.asarray(rows)
        prompts = [trajectory.prompts[i] for i in rows]
        with torch.no_grad():
            embeds = policy.encode_prompts(prompts)
        return cls(latents=torch.from_numpy(trajectory.latents[rows]),
                   old_log_probs=torch.from_numpy(trajectory.log_probs[rows]),
                   timesteps=torch.from_numpy(trajectory.timesteps.copy()), embeds=embeds, prompts=prompts)


def embeds_for(policy: Policy, batch: TransitionBatch, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeds [m, 77, D], negative embeds or None) for samples i.

    With a trained text encoder (TexForce, Chen et al., ECCV 2024) the prompt and negative-prompt embeddings
    are encoded again here, under the current context (adapter on or off, gradients on or off), so the
    log-prob's gradient reaches the text encoder's LoRA and the reference uses the base encoder.
    """
    if policy.trains_text_encoder:
        prompts = [batch.prompts[k] for k in i.tolist()]
        return policy.encode_prompts(prompts), policy.negative_embeds(len(prompts))
    return batch.embeds[i.to(batch.embeds.device)], None


def transition_log_prob(policy: Policy, batch: TransitionBatch, i: torch.Tensor, j: torch.Tensor):
    """log p_θ of stored transitions (sample i [m], step j [m]) -> (log_prob [m], mean, std, (x_t, t)).

    mean [m, C, h, w] and std [m, 1, 1, 1] are the DDIM step's Gaussian (for the KL to the reference).
    """
    device = policy.device
    x_t = batch.latents[i, j].to(device)
    x_next = batch.latents[i, j + 1].to(device)
    t = batch.timesteps[j].to(device)
    model_output = policy.guided_output(x_t, t, *embeds_for(policy, batch, i))
    mean, std = ddim_mean_std(policy.scheduler, model_output, t, x_t, eta=policy.spec.eta)
    return gaussian_log_prob(x_next, mean, std), mean, std, (x_t, t)


def reference_mean(policy: Policy, batch: TransitionBatch, i: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """μ_pre [m, C, h, w] of the pretrained model (adapters disabled, no graph) at the same transitions."""
    with torch.no_grad(), policy.reference():
        output = policy.guided_output(x_t, t, *embeds_for(policy, batch, i))
    return ddim_mean_std(policy.scheduler, output, t, x_t, eta=policy.spec.eta)[0]


def sum_log_probs(policy: Policy, batch: TransitionBatch, samples: np.ndarray, steps: np.ndarray, *,
                  micro_batch_size: int, reference: bool = False,
                  backward: Callable[[torch.Tensor], None] | None = None,
                  weights: torch.Tensor | None = None, group: RankGroup | None = None) -> torch.Tensor:
    """Σ over ``steps`` of log p(transition) for each of ``samples`` -> float64 [P] (policy or reference).

    Summed in float64: DPO's margin is a small difference of two such sums (policy minus reference), so
    float32 sums would make it depend on the summation order; in float64 the sum of the float32 terms
    is exact, whichever order (or learner rank) adds them.

    With ``backward`` and ``weights`` [P], also backpropagates Σ_p w_p Σ_t log p micro-batch by
    micro-batch (``backward`` receives each micro-batch's scalar), instead of one graph for all
    P x |steps| transitions.

    With a ``group`` of several learner ranks, each rank computes its share of the P x |steps|
    transitions: the sums (without ``backward``) are then summed over the ranks, so every rank returns
    all of them; with ``backward`` each rank backpropagates its share only (the step sums the gradients)
    and returns its partial sums.
    """
    items = np.stack(np.meshgrid(np.arange(len(samples)), np.arange(len(steps)), indexing="ij"), -1).reshape(-1, 2)
    if group is not None:
        items = group.shard(items)
    totals = torch.zeros(len(samples), dtype=torch.float64)
    grad = backward is not None
    for start in range(0, len(items), micro_batch_size):
        micro = items[start : start + micro_batch_size]
        i = torch.from_numpy(samples[micro[:, 0]])
        j = torch.from_numpy(steps[micro[:, 1]])
        context = policy.reference() if reference else contextlib.nullcontext()
        with context, torch.set_grad_enabled(grad):
            log_prob = transition_log_prob(policy, batch, i, j)[0]
        if grad:
            backward((weights[torch.from_numpy(micro[:, 0])].to(log_prob.device) * log_prob).sum())
        totals.index_add_(0, torch.from_numpy(micro[:, 0]), log_prob.detach().double().cpu())
    if group is not None and group.active and not grad:
        totals = group.all_reduce_sum_(totals.to(policy.device)).cpu()
    return totals


def first_step_ratio(policy: Policy, batch: TransitionBatch, rows: np.ndarray, steps: np.ndarray) -> float:
    """max |ρ − 1| over (rows[k], steps[k mod |steps|]) under the policy's current adapter, no graph.

    ρ = exp(log p_θ − log p_old). Evaluated before any optimizer step with the adapter that sampled the
    rows, it must be 1 up to numerics (DDPO's importance ratio at the start of an update)."""
    if not steps.size or not rows.size:
        return float("nan")
    i = torch.from_numpy(rows)
    j = torch.from_numpy(steps[np.arange(rows.size) % steps.size])
    with torch.no_grad():
        log_prob = transition_log_prob(policy, batch, i, j)[0]
    ratio = torch.exp(log_prob.float().cpu() - batch.old_log_probs[i, j])
    return float((ratio - 1).abs().max())
