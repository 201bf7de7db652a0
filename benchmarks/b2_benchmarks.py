"""B²-DiffuRL benchmarks (in-process, one thread, the demo's tiny model); appends to BENCHMARKS.md.

1. Branch sampling vs plain sampling at the same reward budget (N rewarded images per batch):
   UNet calls, UNet row-evaluations per rewarded image, and wall time per rewarded image.
2. Learner time per epoch with backward progressive training (only the last tau steps) vs the full
   trajectory, on the same batch.

Usage: python benchmarks/b2_benchmarks.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class UnetCounter:
    """Counts UNet forward calls and the rows (batch entries) they evaluate."""

    def __init__(self, unet):
        self.calls = self.rows = 0
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self):
        self.calls = self.rows = 0


def main() -> None:
    from actors.sampler import Sampler
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import learner_spec, policy_spec
    from learner.learner import Learner

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(REPO / "configs" / "b2_demo.yaml")
    spec = policy_spec(config, pretrained=resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir),
                       num_gpus=0)
    sampler = Sampler(spec=spec)
    counter = UnetCounter(sampler.policy.unet)
    groups, n_branch, T = 4, config.b2.n_branch, config.sampling.num_steps
    prompts = config.prompts.train[:groups]
    n_images = groups * n_branch

    def timed(fn):
        fn(0)  # warm-up
        counter.reset()
        times = []
        for r in range(1, args.repeats + 1):
            start = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - start)
        return statistics.median(times), counter.calls / args.repeats, counter.rows / args.repeats

    rows = []
    plain = timed(lambda seed: sampler.sample(prompts=[p for p in prompts for _ in range(n_branch)], seed=seed))
    rows.append(("plain", "-", *plain))
    for branch_step in (T - config.b2.tau_end, T - config.b2.tau_start, T - 2):
        branch = timed(lambda seed, b=branch_step: sampler.sample_branches(prompts=prompts, seed=seed,
                                                                          n_branch=n_branch, branch_step=b))
        rows.append(("branch", branch_step, *branch))

    # Learner: BPT stage 0 (last tau_start steps) vs full trajectory, same batch and settings.
    traj, _ = sampler.sample_branches(prompts=prompts, seed=99, n_branch=n_branch, branch_step=T - config.b2.tau_start)
    rewards = np.random.default_rng(0).normal(size=len(traj)).astype(np.float32)
    learner_times = {}
    for label, cfg_over in (("BPT stage 0", []), ("full trajectory, all leaves", ["b2.enabled=false"])):
        cfg = load_config(REPO / "configs" / "b2_demo.yaml", cfg_over)
        learner = Learner(policy_spec=spec, spec=dataclasses.replace(learner_spec(cfg), b2_threshold=0.0))
        times, pairs = [], []
        for epoch in range(args.repeats + 1):
            t = dataclasses.replace(traj, policy_version=learner.version)
            start = time.perf_counter()
            stats = learner.update(trajectories=[t], rewards=[rewards], epoch=0)
            if epoch:
                times.append(time.perf_counter() - start)
                pairs.append(stats["train/n_pairs"])
        learner_times[label] = (statistics.median(times), statistics.median(pairs))

    lines = [
        "",
        "## B²-DiffuRL (`benchmarks/b2_benchmarks.py`)",
        "",
        f"Machine: 2 cores, 24 GiB, no GPU, 1 torch thread. Date: {datetime.date.today().isoformat()}. Tiny SD "
        f"(configs/b2_demo.yaml: {T} DDIM steps, CFG, 64 px). Reward budget: {n_images} rewarded images per batch "
        f"({groups} prompts x {n_branch} leaves for branching, {n_images} independent samples for plain). Median of "
        f"{args.repeats}.",
        "",
        "| sampling | branch step | UNet calls | UNet rows per rewarded image | ms per rewarded image |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, step, wall, calls, unet_rows in rows:
        lines.append(f"| {kind} | {step} | {calls:.0f} | {unet_rows / n_images:.1f} | {1e3 * wall / n_images:.1f} |")
    lines += [
        "",
        "Learner, one epoch on the same batch of 16 leaves: B² (stage 0, tau 6 of 10 steps, threshold 0 so the best and worst leaf of each group are trained) vs plain DDPO over all leaves and all steps:",
        "",
        "| training | (sample, step) pairs | seconds |",
        "| --- | --- | --- |",
        *[f"| {label} | {pairs:.0f} | {t:.2f} |" for label, (t, pairs) in learner_times.items()],
        "",
        "A branch rollout evaluates the shared prefix once per group, so the UNet rows per rewarded image fall "
        "from 2T (CFG) to 2(branch_step / n_branch + T - branch_step); wall time follows on this CPU, where "
        "cost is linear in rows. BPT trains only tau of T steps, so the learner's cost scales with tau/T.",
        "",
    ]
    section = "\n".join(lines)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    marker = "\n## B²-DiffuRL"
    if marker in text:
        end = text.find("\n## ", text.index(marker) + 1)
        text = text[: text.index(marker)] + (text[end:] if end != -1 else "")
    out.write_text(text.rstrip("\n") + "\n" + section)
    print(section)


if __name__ == "__main__":
    main()
