"""Long-run benchmarks; prints a markdown section for BENCHMARKS.md and writes a plot.

1. Checkpoint write / load time and size: the demo's learner (tiny UNet, demo LoRA targets), and
   SD 1.5-sized LoRA state (the shapes of SD 1.5's attention projections to_q/k/v/out in all 16
   transformer blocks, rank 4 and 64, with AdamW moments), written and read by cluster/checkpoint.py.
2. Time from a sampler's SIGKILL to its lost batch sampled again (local Ray, the demo config).
3. Soak: the demo for --epochs epochs on local Ray with a checkpoint every 5; per epoch the RSS and
   open file descriptors of every actor and the driver, and the object store's use -> a plot.

Usage: python benchmarks/long_run_benchmarks.py [--epochs 60] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# SD 1.5 UNet: transformer blocks per channel width (down 2+2+2, mid 1, up 3+3+3), text context 768.
SD15_BLOCKS = {320: 5, 640: 5, 1280: 6}
SD15_CONTEXT = 768


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sd15_lora_state(rank: int) -> tuple[dict, dict[str, bytes]]:
    """Learner-state-shaped dict (adapter + AdamW after one step) and diffusers-format LoRA bytes."""
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(0)
    params = {}
    for width, count in SD15_BLOCKS.items():
        for b in range(count):
            for attn, kv_in in (("attn1", width), ("attn2", SD15_CONTEXT)):
                for proj, fan_in in (("to_q", width), ("to_k", kv_in), ("to_v", kv_in), ("to_out.0", width)):
                    stem = f"unet.w{width}.b{b}.{attn}.{proj}"
                    params[f"{stem}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen)
                    params[f"{stem}.lora_B.weight"] = torch.randn(width, rank, generator=gen)
    tensors = [torch.nn.Parameter(t) for t in params.values()]
    opt = torch.optim.AdamW(tensors, lr=1e-4)
    for t in tensors:
        t.grad = torch.randn_like(t)
    opt.step()
    state = {"format": 1, "version": 100, "adapter": {k: p.detach() for k, p in zip(params, tensors, strict=True)},
             "optimizer": opt.state_dict(), "stat_tracker": {"buffer_size": 32, "min_count": 16, "history": {}},
             "zscores": {"history_epochs": 8, "epochs": []}, "rng": {"torch": torch.get_rng_state()}}
    lora = {"pytorch_lora_weights.safetensors": save({k: v.contiguous() for k, v in params.items()})}
    return state, lora


def time_checkpoint(learner_state: dict, lora: dict[str, bytes], *, repeats: int = 3, restore=None) -> dict:
    from actors.rng import rng_state
    from cluster.checkpoint import load_checkpoint, write_checkpoint
    from cluster.config import Config

    writes, loads, size, n_params = [], [], 0, sum(t.numel() for t in learner_state["adapter"].values())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            start = time.perf_counter()
            path = write_checkpoint(Path(tmp), epoch=i + 1, learner_state=learner_state, lora_files=lora,
                                    driver_state={"rng": rng_state()}, metrics=[{"epoch": 0}] * 40,
                                    config=Config().to_dict(), info={"policy_version": 1}, keep_last=1)
            writes.append(time.perf_counter() - start)
            size = _dir_size(path)
            start = time.perf_counter()
            checkpoint = load_checkpoint(path)
            if restore is not None:
                restore(checkpoint.learner_state)
            loads.append(time.perf_counter() - start)
    return {"params": n_params, "size_mb": size / 2**20, "write_s": statistics.median(writes),
            "load_s": statistics.median(loads)}


def demo_learner():
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import learner_spec, policy_spec
    from learner.learner import Learner

    config = load_config(REPO / "configs" / "jpeg_demo.yaml", ["cache_dir=.cache/gard"])
    pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
    learner = Learner(policy_spec=policy_spec(config, pretrained=pretrained, num_gpus=0), spec=learner_spec(config))
    for _, p in learner._named_params:  # one optimizer step, so the AdamW moments exist
        p.grad = torch.randn_like(p)
    learner.optimizer.step()
    return learner


def _object_store_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage (\d+) MiB", text)
    return float(match.group(1)) if match else float("nan")


def soak_and_restart(epochs: int, out: Path) -> dict:
    import psutil
    import ray

    from cluster.config import load_config
    from cluster.driver import Driver
    from cluster.run import prepare_run_dir

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             log_to_driver=False)
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", [
        "cache_dir=.cache/gard", f"epochs={epochs}", "logging.progress=false", "logging.tensorboard=false",
        "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1", "evaluation.every=0",
        "checkpoint.every_epochs=5", "cluster.max_staleness=0", "train.learning_rate=1e-3"])
    run_dir = prepare_run_dir(config, str(out / "soak-run"))
    driver = Driver(config, run_dir=run_dir)
    actors = {f"sampler{i}": s for i, s in enumerate(driver.samplers)}
    actors.update(learner=driver.learner.actor, reward_stage=driver.reward_stage)

    def pids() -> dict[str, int]:
        return {name: ray.get(a.__ray_call__.remote(lambda self: os.getpid()), timeout=120) for name, a in actors.items()}

    _object_store_mib()  # fail now, not after the run, if the memory summary is unreachable
    procs = {name: psutil.Process(pid) for name, pid in pids().items()}
    procs["driver"] = psutil.Process()
    samples: list[dict] = []

    def measure(line: str) -> None:
        if not line.startswith("epoch "):
            return
        row = {"epoch": len(samples), "object_store_mib": _object_store_mib()}
        for name, proc in procs.items():
            row[f"{name}_rss_mib"] = proc.memory_info().rss / 2**20
            row[f"{name}_fds"] = proc.num_fds()
        samples.append(row)

    start = time.perf_counter()
    driver.run(log=measure)
    soak_s = time.perf_counter() - start
    # Restart latency: SIGKILL sampler 0 right after submitting an epoch, then complete it.
    batch = driver.launch(epochs)
    time.sleep(0.2)
    killed_at = time.perf_counter()
    os.kill(procs["sampler0"].pid, signal.SIGKILL)
    driver.complete(batch)
    restart = {"death_to_batches_s": time.perf_counter() - killed_at,
               "restart_and_adapter_s": driver.pool.counters.recovery_s[-1],
               "resampled": driver.pool.counters.resampled_batches}
    driver.shutdown()
    ray.shutdown()
    (out / "soak.json").write_text(json.dumps(samples, indent=1))
    plot_soak(samples, out / "soak_memory.png")
    return {"samples": samples, "soak_s": soak_s, "restart": restart}


def plot_soak(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["epoch"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in [k for k in samples[0] if k.endswith("_rss_mib")]:
        ax1.plot(x, [s[key] for s in samples], label=key.removesuffix("_rss_mib"))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(fontsize=7)
    ax2.plot(x, [s["object_store_mib"] for s in samples], label="object store (plasma) use")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def drift(samples: list[dict], key: str) -> tuple[float, float, float]:
    """(value after the first 10% of epochs, last value, max) of one series."""
    values = [s[key] for s in samples]
    warm = values[max(1, len(values) // 10)]
    return warm, values[-1], max(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    learner = demo_learner()
    demo = time_checkpoint(learner.state_dict(), learner.export_lora(),
                           restore=lambda state: learner.load_state_dict(state=state))
    rows.append(("demo (tiny UNet, r=4, demo targets)", demo))
    learner = None  # frees the demo model before the SD-sized tensors
    for rank in (4, 64):
        state, lora = sd15_lora_state(rank)
        rows.append((f"SD 1.5 attention LoRA r={rank}", time_checkpoint(state, lora)))
        del state, lora
    soak = soak_and_restart(args.epochs, out)

    print("| checkpoint | LoRA params | size on disk | write | load |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['params'] / 1e6:.2f} M | {r['size_mb']:.1f} MB | {r['write_s'] * 1e3:.0f} ms "
              f"| {r['load_s'] * 1e3:.0f} ms |")
    r = soak["restart"]
    print(f"\nsampler SIGKILL -> its lost batch re-sampled and scored: {r['death_to_batches_s']:.1f} s "
          f"(restart + adapter re-applied: {r['restart_and_adapter_s']:.1f} s; {r['resampled']} batch(es) re-sampled)")
    samples = soak["samples"]
    print(f"\nsoak: {len(samples)} epochs in {soak['soak_s']:.0f} s")
    print("| series | after 10% of epochs | last epoch | max |")
    print("| --- | --- | --- | --- |")
    for key in [k for k in samples[0] if k != "epoch"]:
        warm, last, peak = drift(samples, key)
        print(f"| {key} | {warm:.1f} | {last:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
