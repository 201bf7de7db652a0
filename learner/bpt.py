"""Backward progressive training (BPT) schedule of B²-DiffuRL (Hu et al., CVPR 2025, §3.2, eq. 4).

Stage k trains only the last ``τ_k`` of the T denoising steps, i.e. the transitions
x_{τ_k} -> ... -> x_0 (paper notation, t = τ_k, ..., 1), and τ_k grows stage by stage until the
interval covers all T steps. Branch rollouts (§3.3, ``actors/branch.py``) split at the start of the
interval, so all leaves of a group share x_T -> x_{τ_k}.

Notation map (paper -> code). The code indexes transitions in sampling order, i = 0..T-1, where
transition i is ``latents[:, i] -> latents[:, i+1]`` of ``actors.trajectory.Trajectory``:

    paper timestep t (T..1)   <->  step index i = T - t
    trained interval t = τ..1  <->  step indices [T - τ, T)   (``interval(stage)``)
    branch point x_τ           <->  latents[:, T - τ]          (``branch_step(stage)``)

Stage schedule. With n = τ_end - τ_start + 1 distinct values of τ and S stages,

    τ_k = τ_start + floor(n · k / S),   k = 0, ..., S - 1

which splits the S stages into n equal bins, one per value of τ, and reaches τ_end in the last
bin (this needs S >= n). It is the schedule of the authors' release (``run_process.sh``:
``level = i * (SplitStepRight - SplitStepLeft + 1) / StageCnt``, ``split_step = level +
SplitStepLeft`` with 14, 20 and 100): for T = 20, τ_start = 14, τ_end = 20, S = 100 it gives
τ_k = 14 + floor(7k / 100) (``BptSchedule.paper_reference()``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BptSchedule:
    """Which denoising steps stage k trains.

    num_steps: T, the number of DDIM steps the samplers run.
    tau_start / tau_end: τ of the first / the last stage, 1 <= tau_start <= tau_end <= num_steps.
    num_stages: S >= tau_end - tau_start + 1 (so every τ value gets at least one stage).
    epochs_per_stage: driver epochs (one sample + update round each) per stage. The authors' release
        runs one sampling round per stage and ``TrainEpoch=2`` optimization passes over it, which
        here is ``epochs_per_stage=1`` with the learner's ``inner_epochs=2``.
    """

    num_steps: int
    tau_start: int
    tau_end: int
    num_stages: int
    epochs_per_stage: int = 1

    def __post_init__(self) -> None:
        def fail(field: str, value, rule: str) -> None:
            raise ValueError(f"bpt.{field}={value!r} is invalid: expected {rule}")

        for field in ("num_steps", "tau_start", "tau_end", "num_stages", "epochs_per_stage"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, value, "an int")
        if self.num_steps < 1:
            fail("num_steps", self.num_steps, "num_steps >= 1")
        if not 1 <= self.tau_start <= self.num_steps:
            fail("tau_start", self.tau_start, f"1 <= tau_start <= num_steps ({self.num_steps})")
        if not self.tau_start <= self.tau_end <= self.num_steps:
            fail(
                "tau_end",
                self.tau_end,
                f"tau_start ({self.tau_start}) <= tau_end <= num_steps ({self.num_steps})",
            )
        n_values = self.tau_end - self.tau_start + 1
        if self.num_stages < n_values:
            fail(
                "num_stages",
                self.num_stages,
                f"num_stages >= tau_end - tau_start + 1 = {n_values} so that the schedule reaches "
                f"tau_end={self.tau_end}; raise num_stages or narrow [tau_start, tau_end]",
            )
        if self.epochs_per_stage < 1:
            fail("epochs_per_stage", self.epochs_per_stage, "epochs_per_stage >= 1")

    @classmethod
    def paper_reference(cls) -> BptSchedule:
        """T = 20, τ_k = 14 + floor(7k / 100) over 100 stages (the authors' ``run_process.sh``)."""
        return cls(num_steps=20, tau_start=14, tau_end=20, num_stages=100, epochs_per_stage=1)

    @property
    def total_epochs(self) -> int:
        """Epochs until the last stage begins plus its own: ``num_stages * epochs_per_stage``."""
        return self.num_stages * self.epochs_per_stage

    def _check_stage(self, stage: int) -> None:
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage={stage!r} is out of range: expected an int in [0, {self.num_stages})")

    def stage(self, epoch: int) -> int:
        """The stage of a (0-based) driver epoch: ``epoch // epochs_per_stage``.

        Epochs past the schedule stay in the last stage (τ = τ_end), so a run may train longer.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} is invalid: expected an int >= 0")
        return min(epoch // self.epochs_per_stage, self.num_stages - 1)

    def tau(self, stage: int) -> int:
        """τ_k = τ_start + floor((τ_end - τ_start + 1) · k / S), clamped to [1, T] (module docstring)."""
        self._check_stage(stage)
        n_values = self.tau_end - self.tau_start + 1
        tau = self.tau_start + (n_values * stage) // self.num_stages
        return max(1, min(tau, self.num_steps))

    def interval(self, stage: int) -> tuple[int, int]:
        """The trained step indices [first, last) = (T - τ_k, T) (transitions x_{τ_k} -> x_0)."""
        tau = self.tau(stage)
        return self.num_steps - tau, self.num_steps

    def branch_step(self, stage: int) -> int:
        """The step index where branches split: ``interval(stage)[0]`` (branch state latents[:, T - τ_k])."""
        return self.interval(stage)[0]
