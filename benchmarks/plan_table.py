"""The cost model (`cluster/cost_model.py`) extrapolated to 8, 64 and 512 devices with SD 1.5 unit costs.

Weak scaling, as ddpo-pytorch grows its batch with its GPUs: 32 samples of 50 steps per device and epoch,
every step trained (timestep_fraction 1), 4 optimizer steps per epoch, one reward device per 8 devices
is *not* assumed (the reward shares the samplers' devices). Prints a markdown table: for each size, the
best colocated layout, the best disaggregated split, and the recommendation.

Usage: python benchmarks/plan_table.py [--costs benchmarks/costs/sd15_h200.json]
"""

from __future__ import annotations

import argparse

from cluster.cost_model import EpochWork, plan
from cluster.plan import load_costs

SAMPLES_PER_DEVICE = 32
STEPS = 50
OPTIMIZER_STEPS = 4


def rows(costs, sizes=(8, 64, 512)) -> list[str]:
    out = ["| devices | samples/epoch | layout | sample s | train s | epoch s | images/s | utilisation |",
           "|---|---|---|---|---|---|---|---|"]
    for devices in sizes:
        samples = SAMPLES_PER_DEVICE * devices
        work = EpochWork(samples=samples, steps=STEPS, trained_pairs=samples * STEPS,
                         optimizer_steps=OPTIMIZER_STEPS, batch_size=8)
        ranked = plan(work, costs, devices)
        colocated = next(p for p in ranked if p.layout.kind == "colocated")
        split = next(p for p in ranked if p.layout.kind == "disaggregated")
        for p in (colocated, split):
            mark = " (recommended)" if p is ranked[0] else ""
            out.append(f"| {devices} | {samples} | {p.layout.describe()}{mark} | {p.sample_s + p.reward_tail_s:.2f} | "
                       f"{p.train_s:.2f} | {p.epoch_s:.2f} | {samples / p.epoch_s:.1f} | {p.utilisation:.1%} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", default="benchmarks/costs/sd15_h200.json")
    args = parser.parse_args()
    print("\n".join(rows(load_costs(args.costs))))


if __name__ == "__main__":
    main()
