"""The device check's scale-out measurements: a reward tower's throughput, the learner group's collective
on the accelerator, and the unit costs ``gard plan`` reads, derived from what the check measured.

Kept apart from ``device_check.py`` (sampling, training, precision, checkpoint) because these feed the cost
model (``cluster/cost_model.py``), not the training path. Like the rest of the check: no Ray, no hub.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

# The reward tower whose cost the cost model charges per image: CLIP ViT-L/14 at 224 px (the image tower
# of the CLIP score, of the LAION aesthetic head's encoder and of a LLaVA-1.5 captioner's vision side).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, image_size=224, projection_dim=768)
VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                patch_size=8, image_size=32, projection_dim=16)
OPENAI_MEAN, OPENAI_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)

# What the check cannot measure on one device, kept from the FLOP-count costs (benchmarks/costs/).
ALLREDUCE_PER_DOUBLING_S = 0.0005  # a LoRA-sized gradient between nodes: ~50 GB/s, latency-bound tree
PUBLISH_BYTES_PER_S = 1e9  # one object-store transfer of the packed adapter to a sampler's node
DRIVER_S = 0.05  # the driver's own time per epoch, measured flat for 2-8 samplers on the CPU machine


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_reward(*, device: str, dtype: torch.dtype, tiny: bool, batch: int, resolution: int,
                   repeats: int = 5) -> dict:
    """Seconds per image of gard's CLIP preprocessing (``rewards.clip_encoder.preprocess_images``) and a
    CLIP image tower forward (ViT-L/14, random weights) on uint8 sampler-sized images [batch, res, res, 3]."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rewards.clip_encoder import preprocess_images

    torch.manual_seed(0)
    config = CLIPVisionConfig(**(VIT_TINY if tiny else VIT_L14), hidden_act="quick_gelu")
    tower = CLIPVisionModelWithProjection(config).to(device=device, dtype=dtype).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(batch, resolution, resolution, 3), dtype=np.uint8)

    def score() -> torch.Tensor:
        pixels = preprocess_images(images, size=config.image_size, mean=OPENAI_MEAN, std=OPENAI_STD, device=device)
        embeds = tower(pixel_values=pixels.to(dtype)).image_embeds
        return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()

    with torch.no_grad():
        score()  # warm-up
        with FlopCounterMode(display=False) as counter:
            score()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = score()
        _sync(device)
        seconds = (time.perf_counter() - start) / repeats
    parameters = sum(p.numel() for p in tower.parameters())
    return {"tower": "tiny ViT" if tiny else "CLIP ViT-L/14", "parameters": parameters, "batch": batch,
            "seconds_per_batch": seconds, "image_s": seconds / batch,
            "gflop_per_image": counter.get_total_flops() / batch / 1e9, "finite": bool(torch.isfinite(out).all())}


def measure_collective(*, device: str, numel: int, repeats: int = 20, timeout_s: float = 60.0) -> dict:
    """The learner group's rendezvous and bounded all-reduce on this device's backend (NCCL on CUDA).

    One device holds one rank (NCCL refuses two ranks on one GPU), so this is a group of one: it proves
    the join, the timed wait and the teardown on the real backend; its time is a floor (no link crossed),
    not the multi-device all-reduce the cost model charges.
    """
    import datetime

    import torch.distributed as dist

    from learner.distributed import RankGroup, backend_for, free_port

    backend = backend_for(device)
    start = time.perf_counter()
    group = RankGroup.join(host="127.0.0.1", port=free_port(), rank=0, world_size=1, backend=backend,
                           timeout_s=timeout_s, device=torch.device(device, 0) if device == "cuda" else None)
    join_s = time.perf_counter() - start
    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True).wait(timeout)  # warm-up (communicator set-up)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True).wait(timeout)
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    correct = bool(torch.all(buffer == 1.0))  # a sum over one rank leaves the values as they were
    group.close()
    if dist.is_initialized():  # RankGroup.close leaves a group of one alone (it never opens one in a run)
        dist.destroy_process_group()
    return {"backend": backend, "world_size": 1, "numel": numel, "join_s": join_s, "all_reduce_s": seconds,
            "sum_correct": correct, "closed": not dist.is_initialized()}


def derive_unit_costs(results: dict, *, large_batch: bool = False) -> dict:
    """The ``gard plan --costs`` JSON from the check's results: measured where one device can measure it,
    the FLOP-count assumptions (stated in ``assumptions``) where it cannot.

    Sampling is priced at the check's ``--batch`` (the presets' ``policy.batch_size``), or at its
    ``--batch-large`` with ``large_batch`` (what a sampler with a larger batch would get)."""
    sampling, training = results["sampling"], results["training"]
    large = sampling["large_batch"] if large_batch else sampling
    transition_s = large["seconds"] / (large["batch"] * results["settings"]["steps"])
    pair_s = 1.0 / training["pairs_per_s"]
    reward = results.get("reward")
    publish_s = training["publish_s"] + training["adapter_mb"] * 2**20 / PUBLISH_BYTES_PER_S
    costs = {
        "source": f"measured by benchmarks/gpu/device_check.py on {results['device']} ({results['date']})",
        "machine": results["device"],
        "date": results["date"],
        "assumptions": [
            f"{results['model']} with random weights, {results['settings']['resolution']} px, "
            f"{results['settings']['steps']} DDIM steps, CFG 7.5, precision {results['settings']['precision']}, "
            f"LoRA rank {results['settings']['lora_rank']}",
            f"sample_transition_s: sampling {large['batch']} images (text encoding and VAE decode included) "
            f"over their {large['batch'] * results['settings']['steps']} transitions",
            f"train_pair_s: one PPO update of {training['pairs']:.0f} pairs (micro-batch "
            f"{results['settings']['micro_batch']}), plus one guided no-grad forward per pair for the KL's "
            f"reference model (priced as a sampled transition: {transition_s * 1e3:.2f} ms)",
            (f"reward_image_s: {reward['tower']} forward with gard's CLIP preprocessing, batch {reward['batch']}"
             if reward else "reward_image_s: not measured (0)"),
            f"allreduce_s: {ALLREDUCE_PER_DOUBLING_S * 1e3:g} ms per doubling of the learner ranks (not "
            f"measurable on one device; LoRA-sized gradient, latency-bound)",
            f"publish_s: packing the {training['adapter_mb']:.1f} MB adapter (measured, "
            f"{training['publish_s'] * 1e3:.1f} ms) plus one transfer at {PUBLISH_BYTES_PER_S / 1e9:g} GB/s "
            f"(assumed)",
            f"driver_s: {DRIVER_S:g} s per epoch (measured flat for 2-8 samplers on the CPU machine)",
        ],
        "sample_transition_s": transition_s,
        "train_pair_s": pair_s + transition_s,
        "reward_image_s": reward["image_s"] if reward else 0.0,
        "allreduce_s": ALLREDUCE_PER_DOUBLING_S,
        "publish_s": publish_s,
        "driver_s": DRIVER_S,
    }
    bad = {k: v for k, v in costs.items() if isinstance(v, float) and not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"derived unit costs are not finite non-negative seconds: {bad}")
    return costs
