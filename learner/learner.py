"""The Learner actor: filters an epoch's samples, runs the configured update rule, publishes the adapter.

A plain class taking values (``cluster/`` wraps it with ``ray.remote(...)`` and resolves the object
references it is sent). One ``update`` per epoch:

1. drop trajectories older than ``max_staleness`` versions, samples whose reward is NaN/inf and
   samples whose latents or log-probs are not finite (each counted, never trained on);
2. measure the importance ratio on one micro-batch of the newest samples, under the adapter version
   that sampled them, before any optimizer step: it must be 1 up to numerics (``train/onpolicy_ratio_dev``);
3. run the rule of ``learner.algorithms.ALGORITHMS`` (PPO / PG with β·KL, online DPO), over the
   denoising steps of the B²-DiffuRL stage's interval when that schedule is on, else of ``step_range``
   (all when None); every optimizer step goes through ``learner.precision.GuardedStep`` (bf16, or fp16
   with loss scaling; non-finite steps skipped);
4. bump the policy version when the rule applied at least one step; ``publish`` packs the adapter.

Data-parallel ranks (``cluster.num_learners``): after ``join_group`` each rank runs the same ``update`` on
the whole epoch, trains its share of every optimizer step and sums gradients with the others in the
guarded step (``learner/distributed.py``), so every rank holds the same adapter and optimizer state;
``check_replicas`` verifies it.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from actors.policy import Policy, PolicySpec
from actors.seeding import learner_epoch_rng
from actors.trajectory import Trajectory, TrajectoryPairs, concat_trajectories
from actors.weights import WeightsPacket, check_adapter_layout, pack_adapter
from learner.advantages import PerPromptStatTracker
from learner.algorithms import PairBatch, TrainState, UpdateInputs, get_algorithm
from learner.algorithms.policy_gradient import micro_batch_loss
from learner.distributed import RankGroup, state_digest
from learner.precision import GuardedStep, training_dtype
from learner.schedules import linear_ramp
from learner.selection import ZScoreHistory
from learner.spec import ADVANTAGE_MODES, LearnerSpec
from learner.state import to_cpu
from learner.transitions import TransitionBatch, first_step_ratio

__all__ = ["Learner", "LearnerSpec"]


class Learner:
    """Owns the trainable policy, the optimizer and the advantage statistics."""

    def __init__(self, *, policy_spec: PolicySpec, spec: LearnerSpec, torch_threads: int = 1,
                 init_adapter: str | None = None):
        torch.set_num_threads(torch_threads)
        self.rule = get_algorithm(spec.algorithm)
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
        self.state = TrainState(policy=self.policy, stepper=self.stepper, spec=spec,
                                stat_tracker=PerPromptStatTracker(buffer_size=spec.stat_buffer_size,
                                                                  min_count=spec.stat_min_count),
                                zscores=ZScoreHistory(history_epochs=spec.b2_history_epochs), schedule=spec.bpt)
        self.version = 0
        self.last_publish_s = 0.0
        # The adapter of the previous version (pipelined runs sample one version behind): the
        # first-step ratio check evaluates those samples under the weights that drew them.
        self._previous: tuple[int, list[torch.Tensor]] | None = None

    # ----- data-parallel ranks --------------------------------------------------------------
    @property
    def group(self) -> RankGroup:
        return self.state.group

    def join_group(self, group: RankGroup) -> None:
        """Trains as one rank of ``group`` from now on (every rank must hold the same state)."""
        self.state.group = group
        self.stepper.group = group

    def state_digest(self) -> str:
        """SHA-256 of the adapter and the optimizer state (equal across ranks that train in lockstep)."""
        return state_digest(self._named_params, self.optimizer)

    def check_replicas(self, *, epoch: int) -> str:
        """Compares this rank's state digest with every other rank's (a collective: every rank calls it);
        LearnerDivergedError naming the differing ranks and ``epoch`` on a mismatch. Returns the digest."""
        digest = self.state_digest()
        self.group.check_same(digest, epoch=epoch)
        return digest

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
            "stat_tracker": self.state.stat_tracker.state_dict(),
            "zscores": self.state.zscores.state_dict(),
            "rng": rng_state(),
        })

    def load_state_dict(self, *, state: dict) -> int:
        """Restores ``state_dict()``'s output exactly; returns the restored policy version.

        Raises AdapterMismatchError (naming the differences) when the adapter's parameters are not
        this policy's, before changing anything. CPU tensors are moved to the learner's device (AdamW's
        ``load_state_dict`` casts its moments to each parameter's device).
        """
        from actors.rng import set_rng_state

        check_adapter_layout(ours=[(name, tuple(p.shape)) for name, p in self._named_params],
                             theirs=[(name, tuple(t.shape)) for name, t in state["adapter"].items()],
                             what="checkpointed adapter")
        with torch.no_grad():
            for name, param in self._named_params:
                param.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state.get("precision", {}))
        self.state.stat_tracker.load_state_dict(state["stat_tracker"])
        self.state.zscores.load_state_dict(state["zscores"])
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
    def update(self, *, trajectories: list[Trajectory], rewards: list[np.ndarray], epoch: int,
               pairs: list[TrajectoryPairs] | None = None) -> dict[str, float]:
        """Trains on one epoch of trajectories and their rewards (aligned lists of values).

        ``rewards[i]`` is float32 [B_i] for ``trajectories[i]``. ``pairs`` (``algorithm="dpo"`` only):
        explicit ``TrajectoryPairs``, e.g. D-Fusion's (fused ≻ poorly aligned), trained instead of the
        best-vs-worst pairs of each group; stale ones are refused like stale trajectories.
        Returns scalar stats named ``train/``, ``reward/``, ``time/``, ``b2/``, ``dpo/`` (counts as ints); the
        version is incremented when at least one optimizer step was applied.
        """
        spec = self.spec
        start = time.perf_counter()
        totals = [np.asarray(r, dtype=np.float32) for r in rewards]
        if len(trajectories) != len(totals):
            raise ValueError(f"{len(trajectories)} trajectory batches but {len(totals)} reward batches")
        for part, total in zip(trajectories, totals, strict=True):
            if len(part) != total.shape[0]:
                raise ValueError(f"a trajectory batch of {len(part)} samples came with {total.shape[0]} rewards")
        fresh = [i for i, p in enumerate(trajectories) if self.version - p.policy_version <= spec.max_staleness]
        stats: dict[str, float] = {
            "train/stale_refused": sum(len(p) for i, p in enumerate(trajectories) if i not in fresh),
            "reward/nonfinite": 0, "train/nonfinite_trajectories": 0}
        learning_rate = linear_ramp(epoch, start=spec.learning_rate, end=spec.learning_rate_end,
                                    ramp_epochs=spec.lr_ramp_epochs)
        for group in self.optimizer.param_groups:  # set every epoch, so a resumed run gets its epoch's rate
            group["lr"] = learning_rate
        stats["train/learning_rate"] = learning_rate
        if not fresh:
            return {**stats, **self._no_update_stats()}
        joined = concat_trajectories([trajectories[i] for i in fresh])
        versions = np.concatenate([np.full(len(trajectories[i]), trajectories[i].policy_version) for i in fresh])
        reward = np.concatenate([totals[i] for i in fresh])
        finite_reward, finite_trajectory = np.isfinite(reward), joined.finite_rows()
        stats["reward/nonfinite"] = int((~finite_reward).sum())
        stats["train/nonfinite_trajectories"] = int((~finite_trajectory).sum())
        keep = np.flatnonzero(finite_reward & finite_trajectory)
        if keep.size == 0:
            if stats["train/nonfinite_trajectories"]:
                self.stepper.record_skip()  # a batch that is entirely NaN counts as a skipped step
            return {**stats, **self._no_update_stats()}
        batch = TransitionBatch.from_trajectory(self.policy, joined, keep)
        prompts, reward = batch.prompts, reward[keep]
        # Branch groups (B²) or, without branching, the samples of one prompt form a group.
        groups = joined.group_ids[keep] if joined.group_ids is not None else np.unique(prompts, return_inverse=True)[1]
        first, last = spec.step_range or (0, joined.log_probs.shape[1])
        stage = None
        if self.state.schedule is not None:
            stage = self.state.schedule.stage(epoch)
            first, last = self.state.schedule.interval(stage)
            stats.update({"b2/stage": int(stage), "b2/first_step": int(first), "b2/last_step": int(last)})
        steps = np.arange(first, last)
        stats["train/onpolicy_ratio_dev"] = self._first_step_ratio(batch, versions[keep], steps)
        if spec.max_staleness > 0:
            self._previous = (self.version, [p.detach().clone() for _, p in self._named_params])
        pair_batch = None
        if pairs is not None and spec.algorithm == "dpo":
            pair_batch, refused, nonfinite = self._explicit_pairs(pairs)
            stats["train/stale_refused"] += refused
            stats["train/nonfinite_trajectories"] += nonfinite
            if pair_batch is None:  # every explicit pair stale or non-finite: nothing to train
                stats.update({"train/n_pairs": 0, "dpo/n_pairs": 0})
        skipped_before, comm_before = self.stepper.skipped_total, self.group.comm_s
        result = None
        if pairs is None or spec.algorithm != "dpo" or pair_batch is not None:
            rng = learner_epoch_rng(spec.seed, epoch=epoch)
            result = self.rule(self.state, UpdateInputs(batch=batch, rewards=reward, groups=groups, steps=steps,
                                                        epoch=epoch, stage=stage, rng=rng, pairs=pair_batch))
            stats.update(result.stats)
        applied = result.optimizer_steps if result is not None else 0
        if applied:  # a skipped step leaves the adapter as it was
            self.version += 1
        train_s = time.perf_counter() - start
        stats.update({"train/n_samples": len(prompts), "time/train_s": train_s, "train/policy_version": self.version,
                      "time/publish_s": self.last_publish_s, "train/optimizer_steps": applied,
                      "train/skipped_steps": self.stepper.skipped_total - skipped_before,
                      "train/skipped_steps_in_row": self.stepper.skipped_in_row,
                      "train/loss_scale": self.stepper.loss_scale,
                      "train/pairs_per_s": stats.get("train/n_pairs", 0) / train_s if train_s > 0 else math.nan})
        if self.group.active:
            stats["time/allreduce_s"] = self.group.comm_s - comm_before
        return stats

    def _no_update_stats(self) -> dict[str, float]:
        """Stats of an update that trained nothing (every batch stale or non-finite)."""
        return {"train/n_samples": 0, "train/n_pairs": 0, "time/train_s": 0.0, "train/policy_version": self.version,
                "train/optimizer_steps": 0, "train/skipped_steps": 0,
                "train/skipped_steps_in_row": self.stepper.skipped_in_row}

    def _first_step_ratio(self, batch: TransitionBatch, versions: np.ndarray, steps: np.ndarray) -> float:
        """max |ρ − 1| over one micro-batch of the newest samples, before any optimizer step, under the
        adapter version that sampled them (the current one, or the previous one kept for pipelined
        runs): a sampler/learner mismatch (precision, kernels, an adapter that bound differently) shows
        here, where PPO would otherwise clip every step. NaN when that version's adapter is not held
        (the first pipelined epoch after a resume)."""
        newest = int(versions.max())
        rows = np.flatnonzero(versions == newest)[: self.spec.micro_batch_size]
        if newest == self.version:
            return first_step_ratio(self.policy, batch, rows, steps)
        if self._previous is None or self._previous[0] != newest:
            return math.nan
        saved = [p.detach().clone() for _, p in self._named_params]
        try:
            with torch.no_grad():
                for (_, param), old in zip(self._named_params, self._previous[1], strict=True):
                    param.copy_(old)
            return first_step_ratio(self.policy, batch, rows, steps)
        finally:
            with torch.no_grad():
                for (_, param), value in zip(self._named_params, saved, strict=True):
                    param.copy_(value)

    def _explicit_pairs(self, pairs: list[TrajectoryPairs]) -> tuple[PairBatch | None, int, int]:
        """Fresh explicit pairs as one batch, rows [0, P) chosen and [P, 2P) rejected -> (pairs or None,
        stale trajectories refused, non-finite trajectories dropped); a pair with a non-finite side is
        dropped whole."""
        fresh = [p for p in pairs if self.version - min(p.chosen.policy_version, p.rejected.policy_version)
                 <= self.spec.max_staleness]
        refused = 2 * sum(len(p) for p in pairs if not any(p is f for f in fresh))
        if not fresh or not sum(len(p) for p in fresh):
            return None, refused, 0
        both = concat_trajectories([p.chosen for p in fresh] + [p.rejected for p in fresh])
        n = len(both) // 2
        finite = both.finite_rows()
        keep = np.flatnonzero(finite[:n] & finite[n:])
        if not keep.size:
            return None, refused, int((~finite).sum())
        return (PairBatch(batch=TransitionBatch.from_trajectory(self.policy, both), winners=keep.astype(np.int64),
                          losers=(keep + n).astype(np.int64)), refused, int((~finite).sum()))

    # ----- diagnostics ---------------------------------------------------------------------
    def probe_gradient(self, *, trajectory: Trajectory, advantages: np.ndarray, pairs: np.ndarray,
                       weight: float = 1.0) -> torch.Tensor:
        """The LoRA gradient of one PPO/PG micro-batch loss × ``weight`` in this learner's precision
        (fp16: with its loss scale, then unscaled), as a flat float32 CPU tensor; no optimizer step.

        trajectory: one Trajectory; advantages [B]; pairs int [m, 2] of (sample row, step index).
        A precision diagnostic (tests and the device check compare it across precisions).
        """
        batch = TransitionBatch.from_trajectory(self.policy, trajectory)
        self.stepper.zero_grad()
        loss, _ = micro_batch_loss(self.state, batch, np.asarray(pairs, dtype=np.int64),
                                   torch.as_tensor(advantages, dtype=torch.float32),
                                   clipped=self.spec.algorithm == "ppo", beta=0.0, measure_kl=False)
        self.stepper.backward(loss * weight)
        gradient = self.stepper.unscaled_gradient()
        self.stepper.zero_grad()
        return gradient
