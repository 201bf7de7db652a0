"""Benchmarks on the demo configuration; writes BENCHMARKS.md.

1. In-process throughput (one process, 1 torch thread): sampler images/s, learner (sample, timestep)
   pairs/s, adapter pack/verify/unpack time.
2. Full runs on a local Ray with max_staleness 0 and 1: the epoch-time breakdown (sampling, rewards,
   training, weight broadcast, the rest = driver/Ray overhead and waiting) from metrics.jsonl.

Usage: python benchmarks/run_demo_benchmarks.py [--epochs 12] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}, torch {torch.__version__}"


def in_process(config) -> dict:
    from actors.policy import PolicySpec
    from actors.sampler import Sampler
    from actors.tiny import resolve_pretrained
    from actors.weights import pack_adapter
    from cluster.specs import learner_spec, policy_spec
    from learner.learner import Learner

    torch.set_num_threads(1)
    path = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
    spec: PolicySpec = policy_spec(config, pretrained=path, num_gpus=0)
    sampler = Sampler(spec=spec)
    prompts = config.prompts.train[: config.sampling.batch_size]
    prompts = (prompts * config.sampling.batch_size)[: config.sampling.batch_size]
    sampler.sample(prompts=prompts, seed=0)  # warm-up
    times, trajs = [], []
    for seed in range(1, 6):
        start = time.perf_counter()
        traj, _ = sampler.sample(prompts=prompts, seed=seed)
        times.append(time.perf_counter() - start)
        trajs.append(traj)
    learner = Learner(policy_spec=spec, spec=learner_spec(config))
    rewards = [np.random.default_rng(i).normal(size=len(t)).astype(np.float32) for i, t in enumerate(trajs)]
    learner.update(trajectories=trajs[:2], rewards=rewards[:2], epoch=0)  # warm-up
    import dataclasses

    stats = [learner.update(trajectories=[dataclasses.replace(t, policy_version=learner.version) for t in trajs[:4]],
                            rewards=rewards[:4], epoch=e) for e in range(1, 4)]
    named = learner.policy.named_trainable_parameters()
    pack_t, apply_t = [], []
    for v in range(10):
        start = time.perf_counter()
        packet = pack_adapter(named, version=100 + v)
        pack_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        sampler.set_weights(packet=packet)
        apply_t.append(time.perf_counter() - start)
    return {
        "images_per_s": config.sampling.batch_size / statistics.median(times),
        "pairs_per_s": statistics.median(s["pairs_per_s"] for s in stats),
        "pack_ms": 1e3 * statistics.median(pack_t),
        "apply_ms": 1e3 * statistics.median(apply_t),
        "adapter_params": int(packet.buffer.size),
    }


def ray_run(config_path: Path, *, epochs: int, staleness: int, out: Path) -> dict:
    from cluster.config import load_config
    from cluster.run import train

    config = load_config(config_path, [f"epochs={epochs}", f"cluster.max_staleness={staleness}",
                                       "logging.progress=false", "logging.tensorboard=false"])
    run_dir = train(config, output_dir=str(out), resume="never", log=lambda *_: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]  # skip warm-up
    med = {k: statistics.median(r[f"time/{k}"] for r in rows if r.get(f"time/{k}") is not None)
           for k in ("epoch_s", "sample_s", "reward_s", "train_s", "broadcast_s", "samples_per_s")}
    # What the samplers and the learner must do in sequence (staleness 0) or may overlap (staleness 1).
    # Rewards overlap sampling except the last batch's, approximated by reward_s / n_batches.
    n_batches = config.cluster.num_samplers * config.sampling.batches_per_sampler
    reward_tail = med["reward_s"] / n_batches
    serial = med["sample_s"] + reward_tail + med["train_s"] + med["broadcast_s"]
    med["serial_compute_s"] = serial
    med["max_sample_train_s"] = max(med["sample_s"] + reward_tail, med["train_s"])
    med["other_s"] = med["epoch_s"] - serial if staleness == 0 else max(0.0, med["epoch_s"] - med["max_sample_train_s"] - med["broadcast_s"])
    return med


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--config", default=str(REPO / "configs" / "jpeg_demo.yaml"))
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    from cluster.config import load_config

    config = load_config(args.config)
    micro = in_process(config)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for staleness in (0, 1):
            runs[staleness] = ray_run(Path(args.config), epochs=args.epochs, staleness=staleness,
                                      out=Path(tmp) / f"s{staleness}")
    lines = [
        "## Demo configuration (`configs/jpeg_demo.yaml`)",
        "",
        f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}. "
        f"Command: `python benchmarks/run_demo_benchmarks.py --epochs {args.epochs}` (medians over epochs 2..{args.epochs - 1}).",
        "",
        f"Batch: {config.samples_per_epoch} samples/epoch ({config.cluster.num_samplers} samplers x "
        f"{config.sampling.batches_per_sampler} x {config.sampling.batch_size}), {config.sampling.num_steps} DDIM steps, "
        f"{config.sampling.resolution}px, CFG {config.sampling.guidance_scale}; adapter {micro['adapter_params']} params.",
        "",
        "In-process, one thread:",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| sampler images/s (batch {config.sampling.batch_size}, {config.sampling.num_steps} steps + decode) | {micro['images_per_s']:.1f} |",
        f"| learner (sample, timestep) pairs/s (fwd + bwd + ref fwd for KL, AdamW) | {micro['pairs_per_s']:.0f} |",
        f"| adapter pack + checksum (learner) | {micro['pack_ms']:.2f} ms |",
        f"| adapter verify + copy (sampler) | {micro['apply_ms']:.2f} ms |",
        "",
        "On local Ray (2 samplers, reward stage, learner as actors), per epoch:",
        "",
        "| max_staleness | epoch s | sampling s | rewards s | training s | broadcast s (share) | serial compute s | max(sample, train) s | overhead+waiting s (share) | samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, m in runs.items():
        lines.append(
            f"| {s} | {m['epoch_s']:.2f} | {m['sample_s']:.2f} | {m['reward_s']:.3f} | {m['train_s']:.2f} | "
            f"{m['broadcast_s'] * 1e3:.1f} ms ({100 * m['broadcast_s'] / m['epoch_s']:.2f}%) | {m['serial_compute_s']:.2f} | "
            f"{m['max_sample_train_s']:.2f} | {m['other_s']:.2f} ({100 * m['other_s'] / m['epoch_s']:.1f}%) | {m['samples_per_s']:.1f} |"
        )
    section = "\n".join(lines) + "\n"
    out = Path(args.out)
    header = "# Benchmarks\n\nGenerated by `benchmarks/` scripts; each section names its machine and date.\n\n"
    rest = ""
    if out.exists():  # keep the other scripts' sections
        text = out.read_text()
        first_other = text.find("\n## ", text.find("## Demo configuration") + 1)
        rest = text[first_other:] if "## Demo configuration" in text and first_other != -1 else ""
    out.write_text(header + section + NOTES + rest)
    print(section)


NOTES = """
Reading the table: `sampling s` is one sampler's busy time (the two run in parallel), `training s` the
learner's update, `broadcast s` packing + hashing the adapter on the learner plus verifying + copying it
on the slowest sampler. With `max_staleness: 0` the epoch is serial (sample -> last rewards -> train ->
broadcast) and `overhead+waiting` is what remains of the epoch beyond that chain. With `max_staleness: 1`
sampling of epoch k+1 overlaps training on epoch k, so the target is an epoch near max(sample, train);
on this 2-core machine the three busy actors share two cores, so overlapping cannot reach the ideal.

GPU (SD 1.5 UNet, 512 px, 50 steps): not measured: no GPU machine was lent to this task.
"""

if __name__ == "__main__":
    main()
