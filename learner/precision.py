"""Training precision and the guarded optimizer step (shared by the online and offline trainers).

The learner's precision is its own setting (``train.mixed_precision``), independent of the samplers'
``policy.dtype``:

- ``no``: the frozen base and the LoRA run in float32.
- ``bf16``: the frozen base is stored in bfloat16 and runs under bf16 autocast. bf16 has float32's
  exponent range, so the tiny per-element gradients at the UNet output (~1e-7 to 1e-5 for a policy
  gradient averaged over hundreds of (sample, timestep) pairs) survive without loss scaling.
- ``fp16``: the base in float16 under fp16 autocast, with ``torch.amp.GradScaler``: those gradients
  sit in fp16's subnormal range and mostly flush to zero unless the loss is scaled up first (without a
  scaler the LoRA gradient of such a micro-batch has cosine ~0.1 with the float32 one).

In every mode the trainable LoRA parameters and AdamW's moments stay float32 (``actors.policy`` keeps
adapter parameters in float32 whatever the base dtype).

``GuardedStep`` is the one optimizer step of both trainers: scale the loss (fp16), unscale before
clipping, clip the gradient norm, and skip the step when the loss or the gradient norm is not finite
(the adapter is left untouched; the caller then does not bump the policy version). Skipped steps are
counted, in total and in a row, and the counters are part of the checkpointed state. With several
learner ranks (``learner.distributed.RankGroup``) the step is where their gradients are summed and their
skip decisions agreed, before unscaling and clipping: the one place every update rule goes through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from learner.distributed import RankGroup

MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def training_dtype(mixed_precision: str) -> str:
    """``train.mixed_precision`` -> the dtype name the learner's frozen base is loaded and run in."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision={mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
    return MIXED_PRECISION[mixed_precision]


class TrainingStalledError(RuntimeError):
    """train.max_skipped_steps optimizer steps in a row were skipped (non-finite loss, gradient or batch)."""


@dataclass
class StepResult:
    """One optimizer step: the gradient norm before clipping (NaN/inf when skipped) and whether it ran."""

    grad_norm: float
    skipped: bool


class GuardedStep:
    """AdamW step with gradient clipping, fp16 loss scaling and non-finite guards.

    Usage per step: ``zero_grad()``; ``backward(loss)`` once per micro-batch (the loss already weighted
    by the micro-batch's share of the step); ``step(loss_finite=...)``.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *,
                 mixed_precision: str, device_type: str, max_grad_norm: float):
        training_dtype(mixed_precision)  # validates the name
        self.params = params
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.mixed_precision = mixed_precision
        # Standard fp16 recipe: initial scale 2**16, halve on overflow, double after 2000 clean steps.
        self.scaler = torch.amp.GradScaler(device_type, enabled=mixed_precision == "fp16")
        self.steps_taken = 0
        self.skipped_total = 0
        self.skipped_in_row = 0
        self.group = RankGroup()  # the single learner; Learner.join_group sets the ranks' group

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates the gradient of ``loss`` (scaled up in fp16 mode)."""
        self.scaler.scale(loss).backward()

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def unscaled_gradient(self) -> torch.Tensor:
        """The accumulated gradient, unscaled, as one flat float32 CPU tensor (zeros where None)."""
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                 for p in self.params]
        return torch.cat(grads) / self.loss_scale

    def step(self, *, loss_finite: bool = True) -> StepResult:
        """Unscales, clips and applies the accumulated gradient, or skips the step when the loss or the
        gradient norm is not finite (the parameters and the optimizer state are left untouched). With several
        ranks the gradients are first summed over them and the loss flags agreed (``RankGroup.reduce_gradients``)."""
        loss_finite = self.group.reduce_gradients(self.params, loss_finite=bool(loss_finite))
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        finite = bool(loss_finite) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)  # fp16: skips on its own if unscale_ found inf (it did not)
        self.scaler.update()  # fp16: halves the scale after an overflow, grows it after clean steps
        self.zero_grad()
        if finite:
            self.steps_taken += 1
            self.skipped_in_row = 0
        else:
            self.record_skip()
        return StepResult(grad_norm=grad_norm, skipped=not finite)

    def record_skip(self) -> None:
        """Counts a step that could not be taken (also used when a whole batch was non-finite)."""
        self.skipped_total += 1
        self.skipped_in_row += 1

    def state_dict(self) -> dict:
        """Loss-scaler state and skip counters (plain numbers; the optimizer is saved by its owner)."""
        return {"scaler": self.scaler.state_dict(), "steps_taken": self.steps_taken,
                "skipped_total": self.skipped_total, "skipped_in_row": self.skipped_in_row}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.steps_taken = int(state.get("steps_taken", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.skipped_in_row = int(state.get("skipped_in_row", 0))


def ratio_warning(*, deviation: float, threshold: float, sampler_dtype: str, mixed_precision: str) -> str | None:
    """The warning for a first-step importance ratio that is not 1 (None when it is within threshold).

    With the samples' own adapter version restored, log p_θ of a stored transition must equal the
    log-prob recorded at sampling time, so ρ = 1 up to numerics. A |ρ − 1| larger than the PPO clip
    range means every PPO step is clipped from the start, i.e. sampler and learner compute different
    models.
    """
    if not math.isfinite(deviation):
        return (f"train/first-step ratio check: |rho - 1| is {deviation} (non-finite log-probs on the "
                f"learner); see the causes below")
    if deviation <= threshold:
        return None
    causes = [f"samplers run policy.dtype={sampler_dtype} while the learner trains with "
              f"train.mixed_precision={mixed_precision}; use the same precision on both sides"
              if MIXED_PRECISION.get(mixed_precision) != sampler_dtype else
              "reduced-precision kernels differ with the batch shape (sampler: B images x CFG at one timestep; "
              "learner: micro-batches of mixed timesteps); try float32 or bf16 on both sides",
              "the samplers' adapter did not bind to the same modules as the learner's (check policy.lora_targets)",
              "a sampler ran an adapter version other than the one stamped on its trajectories"]
    return (f"first-step importance ratio: max |rho - 1| = {deviation:.3g} exceeds the clip range "
            f"{threshold:.3g}: sampler and learner disagree on the log-probs. Likely causes: " + "; ".join(causes))


def ratio_check(stats: dict, *, config) -> str | None:
    """The warning for an update's ``train/onpolicy_ratio_dev`` (None when fine or not measured), with the
    run's clip range as the threshold. NaN with pipelining means the sampling adapter was not held."""
    deviation = stats.get("train/onpolicy_ratio_dev")
    if deviation is None or (deviation != deviation and config.cluster.max_staleness):
        return None
    return ratio_warning(deviation=deviation, threshold=config.train.clip_range, sampler_dtype=config.policy.dtype,
                         mixed_precision=config.train.mixed_precision)


def stalled_error(stats: dict, *, limit: int) -> TrainingStalledError | None:
    """TrainingStalledError when ``limit`` optimizer steps in a row were skipped, else None."""
    in_row = int(stats.get("train/skipped_steps_in_row", 0))
    if in_row < limit:
        return None
    return TrainingStalledError(
        f"{in_row} optimizer steps in a row were skipped because the loss, the gradient norm or the whole "
        f"batch was not finite (train.max_skipped_steps = {limit}; last epoch: "
        f"{int(stats.get('train/nonfinite_trajectories', 0))} non-finite trajectories, "
        f"{int(stats.get('reward/nonfinite', 0))} non-finite rewards, loss scale {stats.get('train/loss_scale', 1.0):g}). "
        f"Lower train.learning_rate, use train.mixed_precision=bf16 or policy.dtype=float32/bfloat16 if the "
        f"samplers overflow in float16")
