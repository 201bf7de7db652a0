"""The Learner actor: advantages, PPO / policy-gradient + β·KL updates on DDIM transitions, publishing.

A plain class; ``cluster/`` wraps it with ``ray.remote(...)``. One ``update`` per epoch:

1. drop trajectories older than ``max_staleness`` versions (counted) and samples whose reward is
   NaN/inf (counted, never trained on);
2. advantages from the per-prompt stat tracker (DDPO), clipped to ±adv_clip_max;
3. for each inner epoch, every sample keeps a random ``timestep_fraction`` of its T transitions; the
   (sample, timestep) pairs are shuffled and split into ``updates_per_epoch`` optimizer steps, each
   processed in micro-batches of ``micro_batch_size`` pairs with per-pair timesteps in one UNet call;
   the loss of a step is the mean over its pairs (gradients averaged over samples x timesteps);
4. AdamW with gradient-norm clipping (``learner.precision.GuardedStep``: bf16 autocast, or fp16 with
   loss scaling; a step whose loss or gradient norm is not finite is skipped and counted); the version
   increments when at least one step was taken, and ``publish`` packs the adapter.

Samples whose latents or log-probs are not finite are dropped before training and counted, like
non-finite rewards. Before the first step of every update, the importance ratio ρ of a micro-batch is
measured under the adapter version that sampled it (kept for one version when pipelining): it must be
1 up to numerics, and its largest |ρ − 1| is reported as ``onpolicy_ratio_dev``.

With B²-DiffuRL (``spec.bpt``) only the stage's interval [first, last) of denoising steps is trained
(the learner never forwards the others), and PPO/PG train on the contrastively selected leaves with
their z-scores as advantages. ``algorithm="dpo"`` trains the best-vs-worst pairs of each group with the
trajectory form of Diffusion-DPO over the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.policy import Policy, PolicySpec
from actors.trajectory import Trajectory, TrajectoryPairs, concat_trajectories
from actors.weights import AdapterMismatchError, WeightsPacket, pack_adapter
from learner.advantages import PerPromptStatTracker, batch_advantages, clip_advantages
from learner.bpt import BptSchedule
from learner.dpo import trajectory_dpo_loss
from learner.losses import gaussian_kl, policy_gradient_loss, ppo_clip_loss
from learner.precision import GuardedStep, training_dtype
from learner.schedules import linear_ramp
from learner.selection import ZScoreHistory, preference_pairs, select_contrastive
from learner.state import to_cpu

ALGORITHMS = ("ppo", "pg", "dpo")
ADVANTAGE_MODES = ("per_prompt", "batch")


@dataclass(frozen=True)
class LearnerSpec:
    """Optimization settings (the ``train`` config section)."""

    algorithm: str = "ppo"
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    advantage: str = "per_prompt"
    stat_buffer_size: int = 32
    stat_min_count: int = 16
    timestep_fraction: float = 1.0
    inner_epochs: int = 1
    updates_per_epoch: int = 4
    micro_batch_size: int = 16
    kl_beta: float = 0.0
    kl_beta_end: float | None = None
    kl_ramp_epochs: int = 0
    max_staleness: int = 0
    seed: int = 0
    # B²-DiffuRL (backward progressive training + contrastive selection); None = off.
    bpt: BptSchedule | None = None
    b2_threshold: float = 0.5
    b2_history_stages: int = 8
    dpo_beta: float = 1.0  # online trajectory DPO
    mixed_precision: str = "no"  # the learner's own precision: no | bf16 | fp16 (learner/precision.py)


@dataclass
class _Batch:
    """One epoch's training tensors: latents [N, T+1, C, h, w], old_log_probs [N, T], timesteps [T],
    embeds [N, 77, D] (no graph; re-encoded per micro-batch when the text encoder is trained), prompts N."""

    latents: torch.Tensor
    old_log_probs: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    prompts: list[str]


def _resolve(items: list) -> list:
    """Materializes Ray ObjectRefs (the driver passes references, never the data itself)."""
    refs = [i for i, item in enumerate(items) if type(item).__name__ == "ObjectRef"]
    if not refs:
        return list(items)
    import ray

    values = ray.get([items[i] for i in refs], timeout=600)
    out = list(items)
    for i, value in zip(refs, values, strict=True):
        out[i] = value
    return out


class Learner:
    """Owns the trainable policy, the optimizer and the advantage statistics."""

    def __init__(self, *, policy_spec: PolicySpec, spec: LearnerSpec, torch_threads: int = 1,
                 init_adapter: str | None = None):
        torch.set_num_threads(torch_threads)
        if spec.algorithm not in ALGORITHMS:
            raise ValueError(f"train.algorithm={spec.algorithm!r} is not one of {list(ALGORITHMS)}")
        if spec.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"train.advantage={spec.advantage!r} is not one of {list(ADVANTAGE_MODES)}")
        self.spec = spec
        # The samplers' precision is policy_spec.dtype; the learner's frozen base runs in its own.
        self.sampler_dtype = policy_spec.dtype
        self.policy = Policy(dataclasses.replace(policy_spec, dtype=training_dtype(spec.mixed_precision)))
        # Refuse to start when an adapter binds to nothing or does not change the model's output.
        self.policy.verify_adapters()
        if init_adapter:  # a previous run's adapter; the first broadcast carries it to the samplers
            self.policy.load_lora(init_adapter)
        for module in self.policy.adapted.values():
            module.train()
        self._named_params = self.policy.named_trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self._named_params],
            lr=spec.learning_rate,
            betas=(spec.adam_beta1, spec.adam_beta2),
            weight_decay=spec.adam_weight_decay,
            eps=spec.adam_eps,
        )
        self.stepper = GuardedStep([p for _, p in self._named_params], self.optimizer,
                                   mixed_precision=spec.mixed_precision, device_type=self.policy.device.type,
                                   max_grad_norm=spec.max_grad_norm)
        # The adapter of the previous version (pipelined runs sample one version behind): the
        # first-step ratio check evaluates those samples under the weights that drew them.
        self._previous: tuple[int, list[torch.Tensor]] | None = None
        self.stat_tracker = PerPromptStatTracker(buffer_size=spec.stat_buffer_size, min_count=spec.stat_min_count)
        self.schedule = spec.bpt
        self.zscores = ZScoreHistory(history_stages=spec.b2_history_stages)
        self.version = 0
        self.last_publish_s = 0.0

    # ----- publishing ----------------------------------------------------------------------
    def publish(self) -> WeightsPacket:
        """The current adapter as one flat buffer with (version, checksum)."""
        start = time.perf_counter()
        packet = pack_adapter(self._named_params, version=self.version)
        self.last_publish_s = time.perf_counter() - start
        return packet

    # ----- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact resume needs from the learner, as CPU tensors and plain values.

        The adapter tensors by name (every trainable parameter, whatever modules carry LoRA), the
        optimizer state (AdamW moments, step counts, param-group hyperparameters including the
        learning rate), the fp16 loss scaler and skip counters, the advantage statistics, the B²
        z-score history, the policy version and this process's global RNG states. Every tensor is a
        CPU copy (a learner on a GPU hands its state to a driver that may have none);
        ``torch.load(weights_only=True, map_location="cpu")`` reads it back.
        """
        from actors.rng import rng_state

        return to_cpu({
            "format": 1,
            "version": self.version,
            "adapter": {name: p.detach() for name, p in self._named_params},
            "optimizer": self.optimizer.state_dict(),
            "precision": self.stepper.state_dict(),
            "stat_tracker": self.stat_tracker.state_dict(),
            "zscores": self.zscores.state_dict(),
            "rng": rng_state(),
        })

    def load_state_dict(self, *, state: dict) -> int:
        """Restores ``state_dict()``'s output exactly; returns the restored policy version.

        Raises AdapterMismatchError (naming the differences) when the adapter's parameters are not
        this policy's, before changing anything. CPU tensors are moved to the learner's device (AdamW's
        ``load_state_dict`` casts its moments to each parameter's device).
        """
        from actors.rng import set_rng_state

        ours = {name: tuple(p.shape) for name, p in self._named_params}
        theirs = {name: tuple(t.shape) for name, t in state["adapter"].items()}
        if ours != theirs:
            missing, extra = sorted(set(ours) - set(theirs))[:3], sorted(set(theirs) - set(ours))[:3]
            shapes = [f"{k}: {theirs[k]} vs {ours[k]}" for k in ours if k in theirs and theirs[k] != ours[k]][:3]
            raise AdapterMismatchError(
                f"checkpointed adapter does not match the policy: missing {missing}, unexpected {extra}, "
                f"shape differences {shapes} (check policy.lora_rank and policy.lora_targets)")
        with torch.no_grad():
            for name, param in self._named_params:
                param.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("precision", {}))
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.zscores.load_state_dict(state["zscores"])
        self.version = int(state["version"])
        set_rng_state(state["rng"])
        return self.version

    def save_lora(self, *, directory: str) -> str:
        return str(self.policy.save_lora(directory))

    def export_lora(self) -> dict[str, bytes]:
        """The diffusers-format adapter files as bytes, so a driver on another node can write them."""
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            self.policy.save_lora(tmp)
            return {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}

    # ----- training ------------------------------------------------------------------------
    def update(self, *, trajectories: list, rewards: list, epoch: int, pairs: list | None = None) -> dict[str, float]:
        """Trains on one epoch of trajectories and their rewards (aligned lists, refs or values).

        ``rewards[i]`` is a float array [B_i] or an object with ``total`` [B_i] (a ScoredBatch).
        ``pairs`` (``algorithm="dpo"`` only): explicit ``TrajectoryPairs`` (refs or values), e.g. D-Fusion's
        (fused ≻ poorly aligned) pairs, trained instead of the best-vs-worst pairs of each group;
        stale ones (``max_staleness``) are refused like stale trajectories.
        Returns scalar stats; the version is incremented when at least one optimizer step ran.
        """
        wait_start = time.perf_counter()
        spec = self.spec
        parts: list[Trajectory] = _resolve(trajectories)
        totals = [np.asarray(getattr(r, "total", r), dtype=np.float32) for r in _resolve(rewards)]
        start = time.perf_counter()  # train_s excludes waiting for the samplers and rewards
        wait_inputs_s = start - wait_start
        if len(parts) != len(totals):
            raise ValueError(f"{len(parts)} trajectory batches but {len(totals)} reward batches")
        for part, total in zip(parts, totals, strict=True):
            if len(part) != total.shape[0]:
                raise ValueError(f"a trajectory batch of {len(part)} samples came with {total.shape[0]} rewards")

        fresh = [i for i, p in enumerate(parts) if self.version - p.policy_version <= spec.max_staleness]
        stale_refused = sum(len(parts[i]) for i in range(len(parts)) if i not in fresh)
        stats: dict[str, float] = {"stale_refused": float(stale_refused), "wait_inputs_s": wait_inputs_s,
                                   "nonfinite_rewards": 0.0, "nonfinite_trajectories": 0.0}
        if not fresh:
            return {**stats, **self._no_update_stats()}
        batch = concat_trajectories([parts[i] for i in fresh])
        versions = np.concatenate([np.full(len(parts[i]), parts[i].policy_version) for i in fresh])
        reward = np.concatenate([totals[i] for i in fresh])
        finite_reward = np.isfinite(reward)
        finite_trajectory = batch.finite_rows()
        stats["nonfinite_rewards"] = float((~finite_reward).sum())
        stats["nonfinite_trajectories"] = float((~finite_trajectory).sum())
        keep = np.flatnonzero(finite_reward & finite_trajectory)
        if keep.size == 0:
            if stats["nonfinite_trajectories"]:
                self.stepper.record_skip()  # a batch that is entirely NaN counts as a skipped step
            return {**stats, **self._no_update_stats()}
        prompts = [batch.prompts[i] for i in keep]
        reward = reward[keep]
        # Branch groups (B²) or, without branching, the samples of one prompt form a group.
        groups = batch.group_ids[keep] if batch.group_ids is not None else np.unique(prompts, return_inverse=True)[1]
        n_steps = batch.log_probs.shape[1]
        first, last = (0, n_steps)
        if self.schedule is not None:
            stage = self.schedule.stage(epoch)
            first, last = self.schedule.interval(stage)
            stats.update({"bpt_stage": float(stage), "train_first_step": float(first), "train_last_step": float(last)})

        # Fancy indexing copies, so these tensors own writable memory (Ray's arrays are read-only).
        latents = torch.from_numpy(batch.latents[keep])
        old_log_probs = torch.from_numpy(batch.log_probs[keep])
        timesteps = torch.from_numpy(batch.timesteps.copy())
        with torch.no_grad():
            embeds = self.policy.encode_prompts(prompts)
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, epoch, 0x1EA2]))
        data = _Batch(latents=latents, old_log_probs=old_log_probs, timesteps=timesteps, embeds=embeds,
                      prompts=prompts)
        steps = np.arange(first, last)
        stats["onpolicy_ratio_dev"] = self._first_step_ratio(data, versions[keep], steps)
        if spec.max_staleness > 0:
            self._previous = (self.version, [p.detach().clone() for _, p in self._named_params])
        steps_before, skipped_before = self.stepper.steps_taken, self.stepper.skipped_total

        if spec.algorithm == "dpo" and pairs is not None:
            pair_data, winners, losers, refused, nonfinite = self._explicit_pairs(_resolve(pairs))
            stats["stale_refused"] += refused
            stats["nonfinite_trajectories"] += nonfinite
            stats.update(self._dpo_update(pair_data, winners, losers, steps=steps, rng=rng)
                         if pair_data is not None else {"n_pairs": 0.0, "n_dpo_pairs": 0.0})
        elif spec.algorithm == "dpo":
            winners, losers = preference_pairs(groups, reward)
            stats.update(self._dpo_update(data, winners, losers, steps=steps, rng=rng))
        else:
            if self.schedule is not None:
                # Contrastive selection (B²-DiffuRL eq. 5): z-scores per prompt over this stage and
                # the last H; per group the best leaf with z >= +th and the worst with z < -th.
                z = self.zscores.update(stage, prompts, reward)
                positive, negative = select_contrastive(groups, z, threshold=spec.b2_threshold)
                selected = np.concatenate([positive, negative])
                advantages = np.zeros(len(prompts), dtype=np.float32)
                advantages[selected] = z[selected]
                stats["n_selected"] = float(selected.size)
            else:
                selected = np.arange(len(prompts))
                if spec.advantage == "per_prompt":
                    advantages = self.stat_tracker.update(prompts, reward)
                else:
                    advantages = batch_advantages(reward)
            advantages = clip_advantages(advantages, max_abs=spec.adv_clip_max)
            beta = linear_ramp(epoch, start=spec.kl_beta, end=spec.kl_beta_end, ramp_epochs=spec.kl_ramp_epochs)
            stats["beta"] = float(beta)
            stats["advantage_abs_mean"] = float(np.abs(advantages[selected]).mean()) if selected.size else 0.0
            stats.update(self._policy_gradient_update(data, torch.from_numpy(advantages), selected,
                                                      steps=steps, beta=beta, rng=rng))
        if self.stepper.steps_taken > steps_before:  # a skipped step leaves the adapter as it was
            self.version += 1
        train_s = time.perf_counter() - start
        stats.update({"n_samples": float(len(prompts)), "train_s": train_s, "version": float(self.version),
                      "publish_s": self.last_publish_s,
                      "optimizer_steps": float(self.stepper.steps_taken - steps_before),
                      "skipped_steps": float(self.stepper.skipped_total - skipped_before),
                      "skipped_steps_in_row": float(self.stepper.skipped_in_row),
                      "loss_scale": self.stepper.loss_scale,
                      "pairs_per_s": stats.get("n_pairs", 0.0) / train_s if train_s > 0 else math.nan})
        return stats

    def _no_update_stats(self) -> dict[str, float]:
        """Stats of an update that trained nothing (every batch stale or non-finite)."""
        return {"n_samples": 0.0, "n_pairs": 0.0, "train_s": 0.0, "version": float(self.version),
                "optimizer_steps": 0.0, "skipped_steps": 0.0,
                "skipped_steps_in_row": float(self.stepper.skipped_in_row)}

    def _first_step_ratio(self, data: _Batch, versions: np.ndarray, steps: np.ndarray) -> float:
        """max |ρ − 1| over one micro-batch of the newest samples, before any optimizer step.

        ρ = exp(log p_θ − log p_old) with θ the adapter version that sampled them (the current one, or
        the previous one kept for pipelined runs): a sampler/learner mismatch (precision, kernels, an
        adapter that bound differently) shows here, where PPO would otherwise clip every step. NaN
        when that version's adapter is not held (the first pipelined epoch after a resume).
        """
        newest = int(versions.max())
        rows = np.flatnonzero(versions == newest)[: self.spec.micro_batch_size]
        if not steps.size or not rows.size:
            return math.nan
        saved = None
        if newest != self.version:
            if self._previous is None or self._previous[0] != newest:
                return math.nan
            saved = [p.detach().clone() for _, p in self._named_params]
            with torch.no_grad():
                for (_, param), old in zip(self._named_params, self._previous[1], strict=True):
                    param.copy_(old)
        try:
            j = steps[np.arange(rows.size) % steps.size]
            with torch.no_grad():
                log_prob = self._transition_log_prob(torch.from_numpy(rows), torch.from_numpy(j), data)[0]
            ratio = torch.exp(log_prob.float().cpu() - data.old_log_probs[torch.from_numpy(rows), torch.from_numpy(j)])
            return float((ratio - 1).abs().max())
        finally:
            if saved is not None:
                with torch.no_grad():
                    for (_, param), value in zip(self._named_params, saved, strict=True):
                        param.copy_(value)

    def _policy_gradient_update(self, data: _Batch, adv: torch.Tensor, selected: np.ndarray, *, steps: np.ndarray,
                                beta: float, rng: np.random.Generator) -> dict[str, float]:
        """PPO / PG (+ β·KL) over (selected sample, step) pairs, steps drawn from ``steps`` only."""
        spec = self.spec
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(name: str, value: float, weight: int) -> None:
            sums[name] = sums.get(name, 0.0) + value * weight
            counts[name] = counts.get(name, 0) + weight

        n_train_steps = max(1, int(len(steps) * spec.timestep_fraction))
        n_pairs_total = 0
        for _ in range(spec.inner_epochs if selected.size else 0):
            step_idx = np.stack([rng.permutation(steps)[:n_train_steps] for _ in range(selected.size)])
            sample_idx = np.repeat(selected, n_train_steps)
            pairs = np.stack([sample_idx, step_idx.reshape(-1)], axis=1)[rng.permutation(sample_idx.size)]
            for chunk in np.array_split(pairs, min(spec.updates_per_epoch, len(pairs))):
                self.stepper.zero_grad()
                step_stats: list[tuple[dict[str, float], int]] = []
                for m_start in range(0, len(chunk), spec.micro_batch_size):
                    micro = chunk[m_start : m_start + spec.micro_batch_size]
                    weight = len(micro) / len(chunk)
                    measure_kl = beta > 0 or m_start == 0  # monitor KL cheaply when it is not trained
                    loss, micro_stats = self._micro_batch_loss(micro, data, adv, beta=beta, measure_kl=measure_kl)
                    self.stepper.backward(loss * weight)
                    step_stats.append((micro_stats, len(micro)))
                result = self.stepper.step(loss_finite=all(math.isfinite(s["loss"]) for s, _ in step_stats))
                if result.skipped:  # nothing of a skipped step enters the averages
                    continue
                for micro_stats, size in step_stats:
                    for name, value in micro_stats.items():
                        add(name, value, size)
                add("grad_norm", result.grad_norm, 1)
                n_pairs_total += len(chunk)
        self.stepper.zero_grad()
        out = {name: sums[name] / counts[name] for name in sums}
        out["n_pairs"] = float(n_pairs_total)
        return out

    def probe_gradient(self, *, trajectory: Trajectory, advantages: np.ndarray, pairs: np.ndarray,
                       weight: float = 1.0) -> torch.Tensor:
        """The LoRA gradient of one PPO/PG micro-batch loss × ``weight`` in this learner's precision
        (fp16: with its loss scale, then unscaled), as a flat float32 CPU tensor; no optimizer step.

        trajectory: one Trajectory; advantages [B]; pairs int [m, 2] of (sample row, step index).
        A precision diagnostic (tests and the device check compare it across precisions).
        """
        with torch.no_grad():
            embeds = self.policy.encode_prompts(list(trajectory.prompts))
        data = _Batch(latents=torch.from_numpy(trajectory.latents.copy()),
                      old_log_probs=torch.from_numpy(trajectory.log_probs.copy()),
                      timesteps=torch.from_numpy(trajectory.timesteps.copy()), embeds=embeds,
                      prompts=list(trajectory.prompts))
        self.stepper.zero_grad()
        loss, _ = self._micro_batch_loss(np.asarray(pairs, dtype=np.int64), data,
                                         torch.as_tensor(advantages, dtype=torch.float32), beta=0.0, measure_kl=False)
        self.stepper.backward(loss * weight)
        gradient = self.stepper.unscaled_gradient()
        self.stepper.zero_grad()
        return gradient

    def _embeds(self, i: torch.Tensor, data: _Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeds [m, 77, D], negative embeds or None) for samples i.

        With a trained text encoder (TexForce) the prompt and negative-prompt embeddings are encoded
        again here, under the current context (adapter on or off, gradients on or off), so the
        log-prob's gradient reaches the text encoder's LoRA and the reference uses the base encoder.
        """
        if self.policy.trains_text_encoder:
            prompts = [data.prompts[k] for k in i.tolist()]
            return self.policy.encode_prompts(prompts), self.policy.negative_embeds(len(prompts))
        return data.embeds[i.to(data.embeds.device)], None

    def _transition_log_prob(self, i: torch.Tensor, j: torch.Tensor, data: _Batch):
        """log p_θ of stored transitions (sample i, step j) -> (log_prob [m], mean, std, (x_t, t))."""
        policy = self.policy
        device = policy.device
        x_t = data.latents[i, j].to(device)
        x_next = data.latents[i, j + 1].to(device)
        t = data.timesteps[j].to(device)
        model_output = policy.guided_output(x_t, t, *self._embeds(i, data))
        mean, std = ddim_mean_std(policy.scheduler, model_output, t, x_t, eta=policy.spec.eta)
        return gaussian_log_prob(x_next, mean, std), mean, std, (x_t, t)

    def _micro_batch_loss(self, micro, data: _Batch, adv, *, beta, measure_kl):
        """Loss and stats of one micro-batch of (sample, step) index pairs [m, 2]."""
        policy = self.policy
        i = torch.from_numpy(micro[:, 0])
        j = torch.from_numpy(micro[:, 1])
        log_prob, mean, std, (x_t, t) = self._transition_log_prob(i, j, data)
        old = data.old_log_probs[i, j].to(policy.device)
        advantages = adv[i].to(policy.device)
        if self.spec.algorithm == "ppo":
            pg_loss, stats = ppo_clip_loss(log_prob, old, advantages, clip_range=self.spec.clip_range)
        else:
            pg_loss, stats = policy_gradient_loss(log_prob, old, advantages)
        out = {name: float(value) for name, value in stats.items()}
        out["pg_loss"] = float(pg_loss.detach())
        loss = pg_loss
        if measure_kl:
            with torch.no_grad(), policy.reference():
                ref_output = policy.guided_output(x_t, t, *self._embeds(i, data))
            ref_mean, _ = ddim_mean_std(policy.scheduler, ref_output, t, x_t, eta=policy.spec.eta)
            kl = gaussian_kl(mean, ref_mean, std).mean()
            out["kl"] = float(kl.detach())
            if beta > 0:
                loss = loss + beta * kl
        out["loss"] = float(loss.detach())
        return loss, out

    def _sum_log_probs(self, samples: np.ndarray, steps: np.ndarray, data: _Batch, *, grad: bool,
                       reference: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over ``steps`` of log p(transition) for each sample -> [P] (policy or reference).

        With ``weights`` [P] and ``grad``, backpropagates Σ_p w_p Σ_t log p micro-batch by micro-batch
        instead of keeping one graph for all P x |steps| transitions.
        """
        items = np.stack(np.meshgrid(np.arange(len(samples)), np.arange(len(steps)), indexing="ij"), -1).reshape(-1, 2)
        totals = torch.zeros(len(samples))
        for m_start in range(0, len(items), self.spec.micro_batch_size):
            micro = items[m_start : m_start + self.spec.micro_batch_size]
            i = torch.from_numpy(samples[micro[:, 0]])
            j = torch.from_numpy(steps[micro[:, 1]])
            context = self.policy.reference() if reference else contextlib.nullcontext()
            with context, torch.set_grad_enabled(grad):
                log_prob = self._transition_log_prob(i, j, data)[0]
            if grad and weights is not None:
                self.stepper.backward((weights[torch.from_numpy(micro[:, 0])].to(log_prob.device) * log_prob).sum())
            totals.index_add_(0, torch.from_numpy(micro[:, 0]), log_prob.detach().float().cpu())
        return totals

    def _explicit_pairs(self, pairs: list[TrajectoryPairs]) -> tuple[_Batch | None, np.ndarray, np.ndarray, int, int]:
        """Fresh explicit pairs as one batch: rows [0, P) chosen, [P, 2P) rejected -> (batch, winners,
        losers, number of stale trajectories refused, number of non-finite trajectories dropped); a pair
        with a non-finite side is dropped whole."""
        empty = np.zeros(0, np.int64)
        fresh = [p for p in pairs if self.version - min(p.chosen.policy_version, p.rejected.policy_version)
                 <= self.spec.max_staleness]
        refused = 2 * sum(len(p) for p in pairs if not any(p is f for f in fresh))
        if not fresh or not sum(len(p) for p in fresh):
            return None, empty, empty, refused, 0
        both = concat_trajectories([p.chosen for p in fresh] + [p.rejected for p in fresh])
        n = len(both) // 2
        finite = both.finite_rows()
        nonfinite = int((~finite).sum())
        keep = np.flatnonzero(finite[:n] & finite[n:])
        if not keep.size:
            return None, empty, empty, refused, nonfinite
        with torch.no_grad():
            embeds = self.policy.encode_prompts(both.prompts)
        data = _Batch(latents=torch.from_numpy(both.latents.copy()), old_log_probs=torch.from_numpy(both.log_probs.copy()),
                      timesteps=torch.from_numpy(both.timesteps.copy()), embeds=embeds, prompts=both.prompts)
        return data, keep.astype(np.int64), (keep + n).astype(np.int64), refused, nonfinite

    def _dpo_update(self, data: _Batch, winners: np.ndarray, losers: np.ndarray, *, steps: np.ndarray,
                    rng: np.random.Generator) -> dict[str, float]:
        """Online Diffusion-DPO on trajectory pairs (DESIGN.md §3, seed 003):
        L = -log σ(β Σ_t [(log p_θ - log p_ref)(w_t) - (log p_θ - log p_ref)(l_t)]), t over ``steps``.

        The gradient of L is -β σ(-β M_p) Σ_t ∇[log p_θ(w_t) - log p_θ(l_t)] per pair p (M_p the margin),
        so the margins are computed first without a graph, then each transition's log-prob is
        backpropagated with that per-pair weight: exact, in micro-batches.
        """
        spec = self.spec
        if winners.size == 0:
            return {"n_pairs": 0.0, "n_dpo_pairs": 0.0}
        sums = {"dpo_loss": 0.0, "dpo_acc": 0.0, "dpo_margin": 0.0, "grad_norm": 0.0}
        n_steps_taken = 0  # steps applied (a non-finite loss or gradient skips the step)
        n_transitions = 0
        for _ in range(spec.inner_epochs):
            order = rng.permutation(winners.size)
            for chunk in np.array_split(order, min(spec.updates_per_epoch, winners.size)):
                w, l_ = winners[chunk], losers[chunk]
                ref_w = self._sum_log_probs(w, steps, data, grad=False, reference=True)
                ref_l = self._sum_log_probs(l_, steps, data, grad=False, reference=True)
                pol_w = self._sum_log_probs(w, steps, data, grad=False)
                pol_l = self._sum_log_probs(l_, steps, data, grad=False)
                loss, dpo_stats = trajectory_dpo_loss(pol_w, ref_w, pol_l, ref_l, beta=spec.dpo_beta)
                margin = (pol_w - ref_w) - (pol_l - ref_l)
                # dL/d(log p) per pair, averaged over the chunk's pairs.
                coeff = -spec.dpo_beta * torch.sigmoid(-spec.dpo_beta * margin) / len(chunk)
                self.stepper.zero_grad()
                self._sum_log_probs(w, steps, data, grad=True, weights=coeff)
                self._sum_log_probs(l_, steps, data, grad=True, weights=-coeff)
                result = self.stepper.step(loss_finite=math.isfinite(float(loss)))
                if result.skipped:
                    continue
                sums["grad_norm"] += result.grad_norm
                sums["dpo_loss"] += float(loss)
                sums["dpo_acc"] += float(dpo_stats["implicit_acc"])
                sums["dpo_margin"] += float(dpo_stats["reward_margin"])
                n_steps_taken += 1
                n_transitions += 2 * len(chunk) * len(steps)
        self.stepper.zero_grad()
        if not n_steps_taken:
            return {"n_pairs": 0.0, "n_dpo_pairs": float(winners.size)}
        out = {k: v / n_steps_taken for k, v in sums.items()}
        out.update({"loss": out["dpo_loss"], "n_pairs": float(n_transitions), "n_dpo_pairs": float(winners.size)})
        return out
