"""``gard plan CONFIG --gpus G --costs COSTS.json``: the predicted epoch time and utilisation of every
layout of G devices for CONFIG's epoch (``cluster/cost_model.py``), fastest first, and a recommendation.

COSTS is a JSON object of ``UnitCosts`` fields (seconds per unit on one device), e.g. the ones
``benchmarks/scaling.py`` measures on this machine or ``benchmarks/costs/sd15_h200.json`` (SD 1.5 on
one H200, measured by ``benchmarks/gpu/device_check.py``; its ``assumptions`` key says what was measured
and what assumed).
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.config import Config, ConfigError
from cluster.cost_model import EpochWork, Prediction, UnitCosts, plan

COST_FIELDS = tuple(UnitCosts.__dataclass_fields__)


def load_costs(path: str | Path) -> UnitCosts:
    """UnitCosts from a JSON file; keys outside ``COST_FIELDS`` other than ``assumptions``/``source`` are refused."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--costs {path}: cannot read a JSON object of unit costs ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--costs {path}: expected a JSON object of unit costs, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(COST_FIELDS) - {"assumptions", "source", "machine", "date"})
    if unknown:
        raise ConfigError(f"--costs {path}: unknown keys {unknown}; the unit costs are {list(COST_FIELDS)}")
    values = {k: raw[k] for k in COST_FIELDS if k in raw}
    bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    if bad:
        raise ConfigError(f"--costs {path}: {bad} are not numbers of seconds")
    try:
        return UnitCosts(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--costs {path}: {err}") from None


def format_plan(predictions: list[Prediction], *, devices: int) -> str:
    """A table of the predictions (fastest first) and the recommended layout."""
    lines = [f"{'layout':<48} {'sample s':>9} {'train s':>9} {'epoch s':>9} {'util':>6}"]
    for p in predictions:
        lines.append(f"{p.layout.describe():<48} {p.sample_s + p.reward_tail_s:>9.3f} {p.train_s:>9.3f} "
                     f"{p.epoch_s:>9.3f} {p.utilisation:>6.1%}")
    best = predictions[0]
    staleness = best.layout.max_staleness
    lay = best.layout
    lines.append(f"recommended on {devices} devices: {lay.describe()} (cluster.layout: {lay.kind}, cluster.num_samplers: "
                 f"{lay.samplers}, cluster.num_learners: {lay.learners}, cluster.max_staleness: {staleness}), "
                 f"{best.epoch_s:.3f} s per epoch, {best.utilisation:.0%} of the devices busy")
    return "\n".join(lines)


def run_plan(config: Config, *, devices: int, costs_path: str, reward_devices: int = 0) -> str:
    if devices < 2 + reward_devices:
        raise ConfigError(f"--gpus {devices}: a plan needs at least 2 devices besides the {reward_devices} "
                          f"reward devices (1 is the colocated layout only; say --gpus 2 or more)")
    work = EpochWork.from_config(config)
    predictions = plan(work, load_costs(costs_path), devices, reward_devices=reward_devices)
    head = (f"gard plan: {work.samples} samples x {work.steps} steps per epoch, {work.trained_pairs} trained "
            f"pairs, {work.optimizer_steps} optimizer steps; {devices} devices")
    return head + "\n" + format_plan(predictions, devices=devices)
