"""`make demo`'s job trained on one accelerator, in one process, judged by the shapes world's ground truth.

The GPU path's proof that it learns, not only that it runs: the same plain classes a `gard train` run
starts as Ray actors (``Sampler``, ``Learner``, ``RewardStage``), the same config
(``configs/shapes_dpo_heldout.yaml``: online Diffusion-DPO on the reward CLIP, 12 prompts with a held-out
colour-shape kind), the same prompt and seed streams (``actors.seeding``), the same fixed evaluation
batches (``cluster.evaluation.eval_jobs``), all on ``--device``. The one difference from the Ray run:
the loop is synchronous (``max_staleness: 0``, sample -> score -> update -> publish), where the demo's
samplers draw epoch k+1 while the learner trains on epoch k; so its numbers are not the demo's numbers.

Reports per evaluation set the judge's accuracy before and after training, the gain paired image by
image with its standard error, the CLIP reward per epoch, and the seconds per epoch; with ``--eval-every N``
also the paired gains after every N epochs (``curve``), on the same evaluation images. The GPU machine
has no Ray, no diffusers and no open_clip: carry their wheels (``benchmarks/gpu/fetch_wheels.sh``).

Usage: python benchmarks/gpu/shapes_on_device.py --device cuda --out OUT [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CONFIG = REPO / "configs" / "shapes_dpo_heldout.yaml"


def paired_gain(before: np.ndarray, after: np.ndarray) -> dict:
    """Mean of ``after - before`` over the same images and its standard error (std / sqrt(n), ddof 1)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"before": float(np.mean(before)), "after": float(np.mean(after)), "gain": float(diff.mean()),
            "se": se, "n": int(len(diff))}


def evaluate(config, sampler, stage) -> dict:
    """The judge's verdict per evaluation image, by set: {set: float [N]} (same images at every call)."""
    from cluster.evaluation import eval_candidates, eval_items, eval_jobs

    sets = np.array([name for name, _ in eval_items(config)])
    verdicts = []
    for job in eval_jobs(config, num_samplers=1):
        _, images = sampler.sample(prompts=job.prompts, seed=job.seed)
        gold = stage.evaluate(batch=images, candidates=eval_candidates(config))
        verdicts.append(gold["scores"][config.evaluation.gold])
    verdicts = np.concatenate(verdicts)
    return {name: verdicts[sets == name] for name in dict.fromkeys(sets)}


def run(args) -> dict:
    from actors.sampler import Sampler
    from actors.seeding import batch_prompts, batch_seed
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import evaluation_specs, learner_spec, policy_spec, resolve_reward_specs
    from learner.learner import Learner
    from rewards.stage import RewardStage

    torch.set_num_threads(1)
    config = load_config(args.config, ["cluster.max_staleness=0", *args.overrides])
    pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
    spec = policy_spec(config, pretrained=pretrained, num_gpus=1 if args.device == "cuda" else 0)
    specs, weights = resolve_reward_specs(config.rewards, cache_dir=config.cache_dir)
    eval_specs, recall = evaluation_specs(config, specs)
    stage = RewardStage(specs=specs, weights=weights, volume_modalities=tuple(config.volume.modalities),
                        eval_specs=eval_specs, recall=recall)
    sampler = Sampler(spec=spec)
    learner = Learner(policy_spec=spec, spec=learner_spec(config))
    s = config.sampling
    started = time.perf_counter()
    before = evaluate(config, sampler, stage)
    eval_s = time.perf_counter() - started
    epochs, curve = [], []

    def save(partial: dict) -> None:  # what ran so far, in case the run is stopped before its last evaluation
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "epochs.json").write_text(json.dumps(
                {"before": {k: v.tolist() for k, v in before.items()}, "epochs": epochs, "curve": curve, **partial}))

    for epoch in range(config.epochs):
        start = time.perf_counter()
        trajectories, rewards = [], []
        for batch in range(s.batches_per_sampler):
            for worker in range(config.cluster.num_samplers):  # the Ray run's prompt and seed streams
                prompts = batch_prompts(config.prompts.train, size=s.batch_size, seed=config.seed, epoch=epoch,
                                        worker=worker, batch=batch)
                trajectory, images = sampler.sample(prompts=prompts,
                                                    seed=batch_seed(config.seed, epoch=epoch, worker=worker,
                                                                    batch=batch))
                trajectories.append(trajectory)
                rewards.append(stage.score(batch=images, gamma=0.0).total)
        stats = learner.update(trajectories=trajectories, rewards=rewards, epoch=epoch)
        sampler.set_weights(packet=learner.publish())
        epochs.append({"epoch": epoch, "reward_mean": float(np.mean(np.concatenate(rewards))),
                       "seconds": time.perf_counter() - start, "policy_version": int(stats["train/policy_version"]),
                       "skipped_steps": int(stats.get("train/skipped_steps", 0))})
        print(f"epoch {epoch}: reward {epochs[-1]['reward_mean']:.4f}, {epochs[-1]['seconds']:.2f} s", flush=True)
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < config.epochs:
            now = evaluate(config, sampler, stage)
            curve.append({"epochs": epoch + 1, "gains": {n: paired_gain(before[n], now[n]) for n in before}})
            print(f"after {epoch + 1} epochs: " + ", ".join(
                f"{n} {g['gain']:+.3f} ± {g['se']:.3f}" for n, g in curve[-1]["gains"].items()), flush=True)
        save({})
    after = evaluate(config, sampler, stage)
    gains = {name: paired_gain(before[name], after[name]) for name in before}
    curve.append({"epochs": config.epochs, "gains": gains})
    save({"done": True})
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO)
            else str(args.config), "overrides": args.overrides, "epochs": epochs, "gains": gains, "curve": curve,
            "eval_s": eval_s, "train_s": float(sum(e["seconds"] for e in epochs)),
            "total_s": time.perf_counter() - started, "ray_imported": "ray" in sys.modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=None, help="directory for shapes_on_device.json")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate after every N epochs (the same images; 0: before and after only)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (as gard train takes them)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("shapes_on_device: --device cuda but torch sees no CUDA device")
    args.config = args.config.resolve()
    result = run(args)
    for name, g in result["gains"].items():
        print(f"{name}: {g['before']:.3f} -> {g['after']:.3f}, gain {g['gain']:+.3f} ± {g['se']:.3f} "
              f"({g['n']} images)")
    print(f"{result['device']}: {result['train_s']:.1f} s for {len(result['epochs'])} epochs, "
          f"evaluation {result['eval_s']:.1f} s, total {result['total_s']:.1f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shapes_on_device.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
