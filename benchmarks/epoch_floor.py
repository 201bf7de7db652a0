"""The least wall time a config's run can take on this machine: its work measured alone, one torch thread.

An online run's epoch is sampling (``samples_per_epoch`` trajectories) plus one learner update on them;
each evaluation samples its images with the same sampler. Measured here in-process, each part alone on
one core with the real ``Sampler`` and ``Learner`` (no Ray, no reward, no contention), then added up into
the work-conserving bound: all the core-seconds of the run spread perfectly over ``--cores`` cores. No
layout of samplers and learner ranks can beat it; the measured runs reach 75-90% of it (BENCHMARKS.md,
"The cost model against measured epochs on this machine"). Reward scoring, decoding for the judge and
Ray's start are left out, so the real floor is higher still.

Usage: python benchmarks/epoch_floor.py CONFIG [key=value ...] [--cores 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_SAMPLES = 64  # one learner update on these, and their sampling, set the unit costs


def measure(config_path: Path, overrides: list[str], *, repeats: int) -> dict:
    """Seconds per sampled trajectory and per trained pair (the rule's ``train/n_pairs``: a (sample, step)
    pair for ppo/pg, a ranked pair's noise draw for Diffusion-DPO), one thread, the median of ``repeats``
    timings after a warm-up; the update's cost is taken as linear in the samples of an epoch."""
    import numpy as np
    import torch

    from actors.sampler import Sampler
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import learner_spec, policy_spec
    from learner.learner import Learner

    torch.set_num_threads(1)
    config = load_config(config_path, overrides)
    pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=REPO / config.cache_dir)
    spec = policy_spec(config, pretrained=pretrained, num_gpus=0)
    sampler = Sampler(spec=spec)
    prompts = config.prompts.train
    batch = config.sampling.batch_size

    def sample_all(seed: int) -> list:
        out = []
        for b in range(max(1, CALIBRATION_SAMPLES // batch)):
            chunk = [prompts[(b * batch + i) % len(prompts)] for i in range(batch)]
            out.append(sampler.sample(prompts=chunk, seed=seed * 1000 + b)[0])
        return out

    trajectories = sample_all(0)  # warm-up
    sample_s = []
    for r in range(repeats):
        start = time.perf_counter()
        trajectories = sample_all(r + 1)
        sample_s.append(time.perf_counter() - start)
    learner = Learner(policy_spec=spec, spec=learner_spec(config))
    rng = np.random.default_rng(0)
    rewards = [rng.standard_normal(len(t.prompts)).astype(np.float32) for t in trajectories]
    learner.update(trajectories=trajectories, rewards=rewards, epoch=0)  # warm-up
    train_s, pairs = [], 0
    for r in range(repeats):
        # as if just sampled by the current adapter: the learner refuses data older than max_staleness
        fresh = [dataclasses.replace(t, policy_version=learner.version) for t in trajectories]
        start = time.perf_counter()
        stats = learner.update(trajectories=fresh, rewards=rewards, epoch=r + 1)
        train_s.append(time.perf_counter() - start)
        pairs = int(stats["train/n_pairs"])
    if pairs == 0:
        raise RuntimeError(f"the learner trained no pairs ({stats}); nothing to time")
    samples = sum(len(t.prompts) for t in trajectories)
    return {"config": config, "sample_s_per_trajectory": statistics.median(sample_s) / samples,
            "train_s_per_pair": statistics.median(train_s) / pairs, "pairs_per_sample": pairs / samples}


def floor(measured: dict, *, cores: int) -> dict:
    """The run's core-seconds, split into training, sampling and evaluation, and their bound on ``cores``."""
    from cluster.evaluation import eval_items, evaluation_due

    config = measured["config"]
    evaluations = 1 + sum(evaluation_due(config, epoch=e) for e in range(config.epochs))  # 1: the one before
    eval_images = len(eval_items(config))
    epoch_sampling = config.samples_per_epoch * measured["sample_s_per_trajectory"]
    epoch_training = config.samples_per_epoch * measured["pairs_per_sample"] * measured["train_s_per_pair"]
    core_s = {"training": config.epochs * epoch_training, "sampling": config.epochs * epoch_sampling,
              "evaluation": evaluations * eval_images * measured["sample_s_per_trajectory"]}
    return {"epochs": config.epochs, "samples_per_epoch": config.samples_per_epoch, "evaluations": evaluations,
            "eval_images": eval_images, "cores": cores,
            "ms_per_trajectory": 1e3 * measured["sample_s_per_trajectory"],
            "ms_per_pair": 1e3 * measured["train_s_per_pair"],
            "core_s": core_s, "epoch_floor_s": (epoch_sampling + epoch_training) / cores,
            "run_floor_min": sum(core_s.values()) / cores / 60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cores < 1 or args.repeats < 1:
        parser.error(f"--cores = {args.cores} and --repeats = {args.repeats}: both must be >= 1")
    result = floor(measure(args.config, args.overrides, repeats=args.repeats), cores=args.cores)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
