"""How long an epoch takes on G devices, for each way of splitting them between samplers and learners.

A pure model (no Ray, no torch): unit costs measured per device (``UnitCosts``), the work of one epoch
read from a config (``EpochWork``), and a layout (``Layout``) give a predicted epoch time and device
utilisation (``predict``); ``plan`` ranks every layout and split of G devices.

The model, per epoch of N samples of T denoising steps:
  sampling   N·T transitions            -> N·T·s / S seconds on S samplers
  reward     N images                   -> N·r / R seconds on R reward devices (overlaps sampling; only
                                           the last sampler batch's reward is on the critical path)
  training   N·⌈T·f⌉·E (sample, step) pairs (f = timestep_fraction, E = inner_epochs)
                                        -> pairs·c / L + U·E·a(L) seconds on L learner ranks, where U
                                           optimizer steps each all-reduce the gradients in a(L) seconds
  publish    b·max(1, log2 S) seconds per epoch (weights to S samplers: Ray's object store lets every
                                           node that holds the weights serve them, a broadcast tree)
  driver     d seconds per epoch
Disaggregated (separate sampler and learner devices) with ``max_staleness: 1`` overlaps sampling and
training: epoch = max(sampling + reward tail, training) + publish + driver. Synchronous runs (staleness
0), and colocated ones (a sampler and a learner rank on every device, taking turns as ddpo-pytorch's
processes do), add them: epoch = sampling + reward tail + training + publish + driver.
Utilisation = (sampling + training device-seconds) / (G · epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of work on one device (measured by ``benchmarks/scaling.py`` or assumed).

    sample_transition_s: one denoising step of one image (CFG included); train_pair_s: one trained
    (sample, step) pair (forward with CFG, backward, and the reference forward when a KL term is on);
    reward_image_s: one image scored; allreduce_s: one gradient all-reduce between two ranks (the model
    grows it with log2 of the ranks: a tree or ring whose latency dominates for LoRA-sized gradients);
    publish_s: one weight publish to two samplers (grown with log2 of the samplers); driver_s: the
    driver's own time per epoch.
    """

    sample_transition_s: float
    train_pair_s: float
    reward_image_s: float = 0.0
    allreduce_s: float = 0.0
    publish_s: float = 0.0
    driver_s: float = 0.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"UnitCosts.{name} = {value!r}: expected a finite number of seconds >= 0")


@dataclass(frozen=True)
class EpochWork:
    """One epoch's work: N samples of T steps, the trained pairs and the optimizer steps."""

    samples: int
    steps: int
    trained_pairs: int
    optimizer_steps: int
    batch_size: int  # images per sampler batch (the reward tail scores one batch)

    @classmethod
    def from_config(cls, config) -> EpochWork:
        """The work of one epoch of ``config`` (a ``cluster.config.Config``), with its own sampler count."""
        s, t = config.sampling, config.train
        samples = s.batch_size * s.batches_per_sampler * config.cluster.num_samplers
        trained_steps = max(1, int(s.num_steps * t.timestep_fraction))
        return cls(samples=samples, steps=s.num_steps, trained_pairs=samples * trained_steps * t.inner_epochs,
                   optimizer_steps=t.updates_per_epoch * t.inner_epochs, batch_size=s.batch_size)


@dataclass(frozen=True)
class Layout:
    """colocated: every one of ``devices`` holds a sampler and a learner rank; disaggregated: ``samplers``
    and ``learners`` devices apart. ``reward_devices``: devices given to the reward models (0: the reward
    runs beside the samplers and its time is added to theirs)."""

    kind: str
    samplers: int
    learners: int
    max_staleness: int = 1
    reward_devices: int = 0

    def __post_init__(self):
        if self.kind not in ("colocated", "disaggregated"):
            raise ValueError(f"Layout.kind = {self.kind!r}: expected 'colocated' or 'disaggregated'")
        if self.samplers < 1 or self.learners < 1:
            raise ValueError(f"Layout needs >= 1 sampler and learner, got {self.samplers} and {self.learners}")
        if self.kind == "colocated" and self.samplers != self.learners:
            raise ValueError(f"a colocated layout pairs samplers and learners one to one, got {self.samplers} "
                             f"and {self.learners}")

    @property
    def devices(self) -> int:
        shared = self.samplers if self.kind == "colocated" else self.samplers + self.learners
        return shared + self.reward_devices

    def describe(self) -> str:
        if self.kind == "colocated":
            text = f"colocated {self.samplers} x (sampler + learner)"
        else:
            text = (f"disaggregated {self.samplers} sampler{'s' * (self.samplers > 1)} + {self.learners} "
                    f"learner{'s' * (self.learners > 1)}")
        return text + (f" + {self.reward_devices} reward" if self.reward_devices else "")


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    sample_s: float
    reward_tail_s: float
    train_s: float
    epoch_s: float
    utilisation: float


def allreduce_time(costs: UnitCosts, ranks: int) -> float:
    """One gradient all-reduce among ``ranks`` (0 for one rank; ``allreduce_s`` · log2(ranks))."""
    return 0.0 if ranks <= 1 else costs.allreduce_s * math.log2(ranks)


def publish_time(costs: UnitCosts, samplers: int) -> float:
    """Publishing the weights to ``samplers`` (``publish_s`` · max(1, log2(samplers)))."""
    return costs.publish_s * max(1.0, math.log2(samplers))


def predict(work: EpochWork, costs: UnitCosts, layout: Layout) -> Prediction:
    """The epoch time and utilisation of ``layout`` (see the module docstring for the formulas)."""
    sample_device_s = work.samples * work.steps * costs.sample_transition_s
    train_device_s = work.trained_pairs * costs.train_pair_s
    reward_s = work.samples * costs.reward_image_s
    sample_s = sample_device_s / layout.samplers
    if layout.reward_devices:
        sample_s = max(sample_s, reward_s / layout.reward_devices)
        tail = min(work.batch_size, work.samples) * costs.reward_image_s
    else:  # the reward shares the samplers' devices
        sample_s += reward_s / layout.samplers
        tail = 0.0
    train_s = train_device_s / layout.learners + work.optimizer_steps * allreduce_time(costs, layout.learners)
    overlap = layout.kind == "disaggregated" and layout.max_staleness >= 1
    body = max(sample_s + tail, train_s) if overlap else sample_s + tail + train_s
    epoch = body + publish_time(costs, layout.samplers) + costs.driver_s
    utilisation = (sample_device_s + train_device_s) / (layout.devices * epoch) if epoch > 0 else 0.0
    return Prediction(layout=layout, sample_s=sample_s, reward_tail_s=tail, train_s=train_s, epoch_s=epoch,
                      utilisation=utilisation)


def candidate_layouts(devices: int, *, reward_devices: int = 0) -> list[Layout]:
    """Every colocated layout on ``devices`` and every disaggregated split of them (pipelined)."""
    if devices < 1 + reward_devices:
        raise ValueError(f"{devices} devices cannot hold a sampler, a learner and {reward_devices} reward devices")
    usable = devices - reward_devices
    layouts = [Layout("colocated", usable, usable, max_staleness=0, reward_devices=reward_devices)]
    layouts += [Layout("disaggregated", s, usable - s, max_staleness=1, reward_devices=reward_devices)
                for s in range(1, usable)]
    return layouts


def plan(work: EpochWork, costs: UnitCosts, devices: int, *, reward_devices: int = 0) -> list[Prediction]:
    """Every candidate layout of ``devices``, fastest epoch first (ties: higher utilisation)."""
    predictions = [predict(work, costs, layout) for layout in candidate_layouts(devices, reward_devices=reward_devices)]
    return sorted(predictions, key=lambda p: (round(p.epoch_s, 9), -p.utilisation))
