"""Learner ranks and samplers on this machine: measured epochs against the cost model's predictions.

CPU cores stand in for GPUs (every actor runs one torch thread). The baseline's arithmetic: 32 samples
of 20 steps per epoch, 4 PPO updates, the demo's tiny pipeline and JPEG reward. One calibration run
(1 sampler, 1 learner, synchronous) gives the unit costs per core: sampling and training time per
transition and pair, reward time per image, the weight broadcast, and the driver's residual time. The
cost model (`cluster/cost_model.py`) then predicts every other layout; on 2 cores a layout with more
busy actors than cores cannot beat the work-conserving limit (all the device-seconds / 2), so the
prediction is the larger of the two.

A second table (``--sweep-samplers 2 4 8``) holds the work per epoch small and fixed (16 images of 5
steps) while the number of tiny samplers grows, and reports what should stay flat: the weight broadcast
(publish on the learner + the slowest sampler's verify-and-copy) and the driver's own time per epoch
(the epoch minus the time it waited for the samplers, rewards and learner).

Usage: python benchmarks/scaling.py [--epochs 8] [--cores 2] [--sweep-samplers 2 4 8]   (markdown tables)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES, STEPS, BATCH, UPDATES = 32, 20, 8, 4
# (samplers, learners, max_staleness, what it stands for)
LAYOUTS = [
    (1, 1, 0, "calibration: disaggregated 1 + 1, synchronous"),
    (1, 1, 1, "disaggregated 1 + 1, pipelined"),
    (2, 1, 1, "2 samplers + 1 learner, pipelined (3 actors on 2 cores)"),
    (1, 2, 1, "1 sampler + 2 learner ranks, pipelined (3 actors on 2 cores)"),
    (2, 2, 0, "colocated: each core a sampler and a learner rank, synchronous"),
    (2, 2, 1, "2 samplers + 2 learner ranks, pipelined (4 actors on 2 cores)"),
]


def run(samplers: int, learners: int, staleness: int, *, epochs: int, out: Path) -> dict:
    from cluster.config import load_config
    from cluster.run import train

    overrides = [f"epochs={epochs}", f"cluster.max_staleness={staleness}", f"cluster.num_samplers={samplers}",
                 f"cluster.num_learners={learners}", f"sampling.num_steps={STEPS}", f"sampling.batch_size={BATCH}",
                 f"sampling.batches_per_sampler={SAMPLES // (BATCH * samplers)}", f"train.updates_per_epoch={UPDATES}",
                 "cluster.sampler_num_cpus=0.5", "cluster.learner_num_cpus=0.5", "cluster.local_num_cpus=4",
                 "logging.progress=false", "logging.tensorboard=false",
                 "checkpoint.every_epochs=0"]
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", overrides)
    run_dir = train(config, output_dir=str(out), resume="never", log=lambda *_: None)
    # the first two epochs warm up; the last one also evaluates
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:-1]
    return {k: statistics.median(r[f"time/{k}"] for r in rows)
            for k in ("epoch_s", "sample_s", "reward_s", "train_s", "broadcast_s")}


def sweep(samplers: int, *, epochs: int, out: Path) -> dict:
    """Broadcast and driver time per epoch with ``samplers`` tiny samplers and a fixed 16-image epoch."""
    from cluster.config import load_config
    from cluster.run import train

    overrides = [f"epochs={epochs}", "cluster.max_staleness=0", f"cluster.num_samplers={samplers}",
                 "sampling.num_steps=5", f"sampling.batch_size={16 // samplers}", "sampling.batches_per_sampler=1",
                 "cluster.sampler_num_cpus=0.1", "cluster.learner_num_cpus=0.1", "cluster.reward_num_cpus=0.1",
                 "cluster.local_num_cpus=4", "logging.progress=false", "logging.tensorboard=false",
                 "checkpoint.every_epochs=0", "train.updates_per_epoch=1"]
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", overrides)
    run_dir = train(config, output_dir=str(out), resume="never", log=lambda *_: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:-1]
    return {"broadcast_s": statistics.median(r["time/broadcast_s"] for r in rows),
            "driver_s": statistics.median(r["time/epoch_s"] - r["time/driver_wait_s"] for r in rows),
            "epoch_s": statistics.median(r["time/epoch_s"] for r in rows)}


def unit_costs(calibration: dict):
    """Per-core unit costs from the synchronous 1 + 1 run (its epoch is the serial chain plus the driver)."""
    from cluster.cost_model import UnitCosts

    reward_tail = calibration["reward_s"] * BATCH / SAMPLES
    chain = calibration["sample_s"] + reward_tail + calibration["train_s"] + calibration["broadcast_s"]
    return UnitCosts(sample_transition_s=calibration["sample_s"] / (SAMPLES * STEPS),
                     train_pair_s=calibration["train_s"] / (SAMPLES * STEPS),
                     reward_image_s=calibration["reward_s"] / SAMPLES,
                     publish_s=calibration["broadcast_s"], driver_s=max(0.0, calibration["epoch_s"] - chain))


def predicted(costs, samplers: int, learners: int, staleness: int, *, cores: int) -> float:
    from cluster.cost_model import EpochWork, Layout, predict, publish_time

    work = EpochWork(samples=SAMPLES, steps=STEPS, trained_pairs=SAMPLES * STEPS, optimizer_steps=UPDATES,
                     batch_size=BATCH)
    kind = "colocated" if samplers == learners and staleness == 0 and samplers == cores else "disaggregated"
    model = predict(work, costs, Layout(kind, samplers, learners, max_staleness=staleness)).epoch_s
    device_s = SAMPLES * STEPS * (costs.sample_transition_s + costs.train_pair_s) + SAMPLES * costs.reward_image_s
    limit = device_s / cores + publish_time(costs, samplers) + costs.driver_s
    return max(model, limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--sweep-samplers", type=int, nargs="*", default=None,
                        help="only the broadcast/driver sweep over these sampler counts")
    args = parser.parse_args()
    if args.sweep_samplers:
        with tempfile.TemporaryDirectory() as tmp:
            results = {n: sweep(n, epochs=args.epochs, out=Path(tmp) / f"s{n}") for n in args.sweep_samplers}
        print("| samplers | broadcast ms per epoch | driver ms per epoch | epoch s |")
        print("|---|---|---|---|")
        for n, r in results.items():
            print(f"| {n} | {1e3 * r['broadcast_s']:.1f} | {1e3 * r['driver_s']:.1f} | {r['epoch_s']:.2f} |")
        return
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (s, n, staleness, _) in enumerate(LAYOUTS):
            measured[i] = run(s, n, staleness, epochs=args.epochs, out=Path(tmp) / f"run{i}")
            print(f"measured {LAYOUTS[i][3]}: {measured[i]}", flush=True)
    costs = unit_costs(measured[0])
    print(f"unit costs per core: {costs}")
    print("| layout | samplers | learner ranks | max_staleness | sampling s | training s | measured epoch s | "
          "predicted epoch s | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (s, n, staleness, what) in enumerate(LAYOUTS):
        m = measured[i]
        p = predicted(costs, s, n, staleness, cores=args.cores)
        print(f"| {what} | {s} | {n} | {staleness} | {m['sample_s']:.2f} | {m['train_s']:.2f} | {m['epoch_s']:.2f} | "
              f"{p:.2f} | {100 * (p - m['epoch_s']) / m['epoch_s']:+.0f}% |")


if __name__ == "__main__":
    main()
