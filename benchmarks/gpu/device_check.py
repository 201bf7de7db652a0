"""The device check: gard's plain Sampler and Learner on one accelerator, no Ray, no model hub.

On a CUDA machine it writes a Stable Diffusion 1.5 pipeline locally from its architecture configs (the
real UNet: 859.5M parameters; VAE; CLIP ViT-L/14 text encoder; a byte-level tokenizer), with random
weights, loads it through ``from_pretrained`` like a real checkpoint, and measures at 512 px, 50 DDIM
steps with classifier-free guidance:

- sampling images/s and training (sample, timestep) pairs/s (one PPO update of the sampled batch);
- model-FLOP utilization: FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` on the same
  shapes (one guided UNet step and the VAE decode for sampling; one micro-batch's forward + backward for
  training) divided by the measured time and the GPU's dense bf16 peak;
- the first-step importance-ratio deviation max |ρ − 1| with samplers and learner in fp32 / bf16 / fp16
  (same precision on both sides), and with fp32 samplers beside each learner precision;
- the LoRA-gradient cosine to fp32 of a policy-gradient micro-batch weighted 4/320 (one micro-batch of a
  320-pair optimizer step): fp16 with the GradScaler, fp16 without it, bf16;
- a checkpoint round trip: the learner's state is all on the CPU, ``torch.save`` / ``torch.load(
  map_location="cpu")`` into a fresh learner restores the adapter exactly, with AdamW's moments back on
  the device.

``--device cpu --tiny`` runs the same code on the tiny random pipeline (a test runs it, so the script
cannot rot). Results: a JSON file in ``--out`` and a table on stdout.

On the lent GPU machine (it has torch, transformers, peft, safetensors; not diffusers, nor Ray): fetch
the diffusers wheel here with ``bash benchmarks/gpu/fetch_wheels.sh`` (writes ``.whl/``, git-ignored),
then run ``bash benchmarks/gpu/run_on_device.sh`` there with ``.whl`` carried. Budget: under 8 minutes
on one H100/H200 (model build and loads included).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu import unit_costs  # noqa: E402
from benchmarks.gpu.sd15 import build_sd15  # noqa: E402
from learner.precision import training_dtype  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, SXM parts), matched on the device name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}
PROMPTS = ["a photo of a cat", "a red bicycle", "a mountain lake at dawn", "a bowl of fruit",
           "a city street at night", "a horse in a field", "a lighthouse", "a cup of coffee"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----- measurements -------------------------------------------------------------------------------
def _specs(args, pretrained: str, dtype: str):
    from cluster.specs import default_policy_spec

    return default_policy_spec(pretrained=pretrained, device=args.device, dtype=dtype, num_steps=args.steps,
                      resolution=args.resolution, guidance_scale=7.5, eta=1.0, lora_rank=args.lora_rank,
                      lora_alpha=float(args.lora_rank))


def _learner_spec(mixed_precision: str, **overrides):
    from cluster.specs import default_learner_spec

    base = dict(algorithm="ppo", learning_rate=3e-4, clip_range=1e-4, advantage="batch", updates_per_epoch=4,
                micro_batch_size=8, mixed_precision=mixed_precision, max_staleness=0)
    return default_learner_spec(**{**base, **overrides})


def _main_learner_spec(args):
    return _learner_spec(args.precision, micro_batch_size=args.micro_batch)


def measure_sampling(args, pretrained: str) -> tuple[dict, object]:
    from torch.utils.flop_counter import FlopCounterMode

    from actors.sampler import Sampler

    sampler = Sampler(spec=_specs(args, pretrained, training_dtype(args.precision)))
    prompts = (PROMPTS * args.batch)[: args.batch]
    sampler.sample(prompts=prompts[:1], seed=99)  # warm-up (kernels, allocator)
    _sync(args.device)
    start = time.perf_counter()
    trajectory, images = sampler.sample(prompts=prompts, seed=0)
    _sync(args.device)
    seconds = time.perf_counter() - start
    policy = sampler.policy
    with torch.no_grad(), FlopCounterMode(display=False) as step_flops:
        latents = policy.initial_latents(len(prompts), torch.Generator().manual_seed(0))
        policy.guided_output(latents, policy.scheduler.timesteps[0], policy.encode_prompts(prompts),
                             policy.negative_embeds(len(prompts)))
    with torch.no_grad(), FlopCounterMode(display=False) as decode_flops:
        policy.decode(latents)
    flops = step_flops.get_total_flops() * args.steps + decode_flops.get_total_flops()
    # A larger batch (the unit cost ``gard plan`` uses): a batch of 8 leaves a large GPU partly idle.
    many = (PROMPTS * args.batch_large)[: args.batch_large]
    _sync(args.device)
    start = time.perf_counter()
    sampler.sample(prompts=many, seed=1)
    _sync(args.device)
    large_s = time.perf_counter() - start
    del sampler
    _free()
    per_image = flops / len(prompts)
    return {"batch": len(prompts), "seconds": seconds, "images_per_s": len(prompts) / seconds,
            "tflop_per_image": per_image / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "large_batch": {"batch": len(many), "seconds": large_s, "images_per_s": len(many) / large_s,
                            "achieved_tflops": per_image * len(many) / large_s / 1e12},
            "finite": bool(trajectory.finite_rows().all()), "image_shape": list(images.images.shape[1:])}, trajectory


def measure_training(args, pretrained: str, trajectory) -> tuple[dict, object]:
    from torch.utils.flop_counter import FlopCounterMode

    from actors.weights import pack_adapter
    from learner.learner import Learner

    learner = Learner(policy_spec=_specs(args, pretrained, training_dtype(args.precision)),
                      spec=_main_learner_spec(args))
    n = len(trajectory)
    advantages = np.linspace(-1, 1, n, dtype=np.float32)
    micro = np.stack([np.arange(learner.spec.micro_batch_size) % n,
                      np.arange(learner.spec.micro_batch_size) % args.steps], axis=1)
    learner.probe_gradient(trajectory=trajectory, advantages=advantages, pairs=micro)  # warm-up
    with FlopCounterMode(display=False) as counter:
        learner.probe_gradient(trajectory=trajectory, advantages=advantages, pairs=micro)
    flops_per_pair = counter.get_total_flops() / len(micro)
    rewards = np.random.default_rng(0).normal(size=n).astype(np.float32)
    _sync(args.device)
    stats = learner.update(trajectories=[trajectory], rewards=[rewards], epoch=0)
    _sync(args.device)
    start = time.perf_counter()
    packet = pack_adapter(learner.policy.named_trainable_parameters(), version=learner.version)
    publish_s = time.perf_counter() - start
    pairs, seconds = stats["train/n_pairs"], stats["time/train_s"]
    useful = flops_per_pair * pairs
    out = {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
           "tflop_per_pair": flops_per_pair / 1e12, "achieved_tflops": useful / seconds / 1e12,
           "optimizer_steps": stats["train/optimizer_steps"], "skipped_steps": stats["train/skipped_steps"],
           "first_step_ratio_dev": stats["train/onpolicy_ratio_dev"], "loss": stats.get("train/loss", math.nan),
           "adapter_mb": packet.buffer.nbytes / 2**20, "publish_s": publish_s}
    if args.device == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out, learner


def measure_precision(args, pretrained: str) -> dict:
    """Gradient cosine to fp32 (a 4/320-weighted PG micro-batch) and the first-step ratio per precision."""
    from actors.sampler import Sampler
    from learner.learner import Learner

    prompts = PROMPTS[:2]
    reference = Sampler(spec=_specs(args, pretrained, "float32")).sample(prompts=prompts, seed=1)[0]
    _free()
    t = args.steps
    pairs = np.array([[0, 2 % t], [1, t // 2], [0, max(t - 2, 0)], [1, t - 1]])
    advantages = np.array([1.0, -1.0], np.float32)
    grads, same, vs_fp32 = {}, {}, {}
    # lr 0: the update measures the ratio (before any step) and leaves the adapter as it was.
    spec_kw = dict(algorithm="pg", learning_rate=0.0, adam_weight_decay=0.0, timestep_fraction=1.0 / t,
                   updates_per_epoch=1, micro_batch_size=4, max_staleness=1)
    for mode in ("no", "bf16", "fp16"):
        dtype = training_dtype(mode)
        learner = Learner(policy_spec=_specs(args, pretrained, dtype), spec=_learner_spec(mode, **spec_kw))
        probe = dict(trajectory=reference, advantages=advantages, pairs=pairs, weight=4 / 320)
        grads[mode] = learner.probe_gradient(**probe)
        if mode == "fp16":
            scaler = learner.stepper.scaler
            learner.stepper.scaler = torch.amp.GradScaler(args.device, enabled=False)
            grads["fp16_no_scaler"] = learner.probe_gradient(**probe)
            learner.stepper.scaler = scaler
        rewards = [advantages]
        vs_fp32[mode] = learner.update(trajectories=[reference], rewards=rewards, epoch=0)["train/onpolicy_ratio_dev"]
        own = reference if mode == "no" else Sampler(spec=_specs(args, pretrained, dtype)).sample(
            prompts=prompts, seed=1)[0]
        same[mode] = learner.update(trajectories=[own], rewards=rewards, epoch=1)["train/onpolicy_ratio_dev"]
        del learner, own
        _free()

    def cosine(g):
        return float(torch.nn.functional.cosine_similarity(grads["no"], g, dim=0))

    return {"grad_cosine_to_fp32": {k: cosine(v) for k, v in grads.items() if k != "no"},
            "grad_nonzero_fraction": {k: float((v != 0).float().mean()) for k, v in grads.items()},
            "first_step_ratio_dev_same_precision": same,
            "first_step_ratio_dev_fp32_sampler": vs_fp32}


def measure_checkpoint(args, pretrained: str, learner) -> dict:
    from learner.learner import Learner
    from learner.state import tensors_not_on_cpu

    start = time.perf_counter()
    state = learner.state_dict()
    state_s = time.perf_counter() - start
    off_cpu = tensors_not_on_cpu(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "learner.pt"
        start = time.perf_counter()
        torch.save(state, path)
        save_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20
        fresh = Learner(policy_spec=_specs(args, pretrained, training_dtype(args.precision)),
                        spec=_main_learner_spec(args))
        start = time.perf_counter()
        loaded = torch.load(path, weights_only=True, map_location="cpu")
        fresh.load_state_dict(state=loaded)
        _sync(args.device)
        load_s = time.perf_counter() - start
    params = learner.policy.named_trainable_parameters()
    exact = all(torch.equal(a, b) for (_, a), (_, b) in zip(params, fresh.policy.named_trainable_parameters(),
                                                             strict=True))
    moment_devices = sorted({v["exp_avg"].device.type for v in fresh.optimizer.state.values()})
    return {"state_tensors_off_cpu": off_cpu, "adapter_restored_exactly": exact,
            "moments_on": moment_devices, "version": fresh.version, "file_mb": size_mb,
            "state_s": state_s, "save_s": save_s, "load_s": load_s}


# ----- the run ------------------------------------------------------------------------------------
def _peak_tflops(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check: --device cuda but torch sees no CUDA device (use --device cpu --tiny)")
    if args.device == "cpu":
        torch.set_num_threads(1)
    name, peak = _peak_tflops(args.device)
    results: dict = {"device": name, "bf16_peak_tflops": peak, "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d"), "model": "tiny:sd" if args.tiny else "SD 1.5 architecture",
                     "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    started = time.perf_counter()
    save = (lambda: _save(results, args.out))  # noqa: E731 - after each part, so a timeout keeps what ran
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from actors.tiny import build_tiny_sd

            pretrained = str(build_tiny_sd(Path(tmp) / "tiny-sd"))
        else:
            pretrained = str(build_sd15(Path(tmp), device=args.device))
        results["build_s"] = time.perf_counter() - started
        results["sampling"], trajectory = measure_sampling(args, pretrained)
        save()
        results["training"], learner = measure_training(args, pretrained, trajectory)
        if peak:
            results["sampling"]["mfu"] = results["sampling"]["achieved_tflops"] / peak
            results["training"]["mfu"] = results["training"]["achieved_tflops"] / peak
        save()
        results["reward"] = unit_costs.measure_reward(
            device=args.device, dtype=getattr(torch, training_dtype(args.precision)), tiny=args.tiny,
            batch=args.reward_batch, resolution=args.resolution)
        results["unit_costs"] = unit_costs.derive_unit_costs(results)
        results["unit_costs_large_batch"] = unit_costs.derive_unit_costs(results, large_batch=True)
        save()
        results["collective"] = unit_costs.measure_collective(device=args.device, numel=int(
            sum(p.numel() for _, p in learner.policy.named_trainable_parameters())))
        results["checkpoint"] = measure_checkpoint(args, pretrained, learner)
        save()
        del learner, trajectory
        _free()
        results["precision"] = measure_precision(args, pretrained)
    results["ray_imported"] = "ray" in sys.modules  # the check must run without Ray
    results["total_s"] = time.perf_counter() - started
    save()
    return results


def _save(results: dict, out: str | None) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "device_check.json").write_text(json.dumps(results, indent=1))
        for key in ("unit_costs", "unit_costs_large_batch"):
            if key in results:
                (Path(out) / f"{key}.json").write_text(json.dumps(results[key], indent=1) + "\n")


def table(results: dict) -> str:
    s, t, p, c = results["sampling"], results["training"], results["precision"], results["checkpoint"]
    r, g = results["reward"], results["collective"]
    mfu = (lambda d: f"{100 * d['mfu']:.1f}%" if "mfu" in d else "n/a")  # noqa: E731
    rows = [
        ("device", f"{results['device']} (bf16 peak {results['bf16_peak_tflops']} TFLOP/s)"),
        ("model", f"{results['model']}, {results['settings']['resolution']} px, {results['settings']['steps']} DDIM "
                  f"steps, CFG, precision {results['settings']['precision']}"),
        ("sampling", f"{s['images_per_s']:.3f} images/s (batch {s['batch']}), {s['tflop_per_image']:.3g} TFLOP/image, "
                     f"MFU {mfu(s)}"),
        ("sampling, larger batch", f"{s['large_batch']['images_per_s']:.3f} images/s (batch "
                                   f"{s['large_batch']['batch']}), {s['large_batch']['achieved_tflops']:.0f} TFLOP/s"),
        ("training", f"{t['pairs_per_s']:.2f} pairs/s ({t['pairs']:.0f} pairs, {t['optimizer_steps']:.0f} steps), "
                     f"{t['tflop_per_pair']:.3g} TFLOP/pair, MFU {mfu(t)}"),
        ("reward tower", f"{r['tower']}: {1e3 * r['image_s']:.2f} ms/image (batch {r['batch']}, "
                         f"{r['gflop_per_image']:.0f} GFLOP/image with preprocessing)"),
        ("learner-group collective", f"{g['backend']}, world 1: join {g['join_s']:.2f} s, all-reduce of "
                                     f"{g['numel']} floats {1e3 * g['all_reduce_s']:.3f} ms, sum correct "
                                     f"{g['sum_correct']}, closed {g['closed']}"),
        ("first-step |rho-1|, same precision", ", ".join(f"{k}: {v:.2e}" for k, v in
                                                        p["first_step_ratio_dev_same_precision"].items())),
        ("first-step |rho-1|, fp32 samplers", ", ".join(f"{k}: {v:.2e}" for k, v in
                                                       p["first_step_ratio_dev_fp32_sampler"].items())),
        ("LoRA-gradient cosine to fp32", ", ".join(f"{k}: {v:.4f}" for k, v in p["grad_cosine_to_fp32"].items())),
        ("checkpoint", f"state on CPU: {not c['state_tensors_off_cpu']}, restored exactly: "
                       f"{c['adapter_restored_exactly']}, moments on {c['moments_on']}, {c['file_mb']:.1f} MB, save "
                       f"{c['save_s']:.2f} s, load {c['load_s']:.2f} s"),
        ("total", f"{results['total_s']:.0f} s (model build {results['build_s']:.0f} s)"),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny random pipeline instead of SD 1.5's architecture")
    parser.add_argument("--out", default=None, help="directory for device_check.json")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps, default 50 (6 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="sampling batch, default 8 (4 with --tiny)")
    parser.add_argument("--batch-large", type=int, default=None, help="second sampling batch, default 32 (8 with --tiny)")
    parser.add_argument("--reward-batch", type=int, default=None, help="reward tower batch, default 64 (8 with --tiny)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None,
                        help="samplers' and learner's precision for the throughput runs (default bf16 on CUDA)")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="training micro-batch in (sample, timestep) pairs (lower it on an 80 GB GPU if it runs out)")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.steps = args.steps or (6 if args.tiny else 50)
    args.batch = args.batch or (4 if args.tiny else 8)
    args.batch_large = args.batch_large or (8 if args.tiny else 32)
    args.reward_batch = args.reward_batch or (8 if args.tiny else 64)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "no")
    results = run(args)
    text = table(results)
    print(text, flush=True)
    if args.out:
        (Path(args.out) / "device_check.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
