"""Does the training reward see what the judge sees? Per prompt, how well the CLIP score ranks the base
pipeline's correct images above its incorrect ones.

For each prompt of the shapes world (seen and held-out sets), N images of the base pipeline
(``configs/shapes_ddpo.yaml``'s policy and sampling, one fixed seed) are scored by the reward CLIP
(``tiny:shapes-clip``) and by the judge. Reported per prompt: the judge's accuracy; the AUC of the CLIP
score for the judge's verdict (the probability that a correct image outscores an incorrect one, ties
count half; undefined when all images agree); and the judge's accuracy on the half of the images with
the highest CLIP score, i.e. what best-of-2 selection by the reward would give. A method that follows
the reward can only raise the gold accuracy of prompts whose AUC is well above 0.5.

Usage: python benchmarks/reward_agreement.py [--images 48] [--seed 11] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def auc(scores: np.ndarray, correct: np.ndarray) -> float:
    """P(score of a correct item > score of an incorrect one), ties counted half; NaN without both kinds."""
    pos, neg = scores[correct], scores[~correct]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from actors.sampler import Sampler
    from actors.tiny import resolve_pretrained
    from cluster.config import load_config
    from cluster.specs import policy_spec
    from rewards.clip_score import ClipScore
    from rewards.shapes_judge import ShapesJudge
    from rewards.tiny import shapes_clip_options

    config = load_config(REPO / "configs" / "shapes_ddpo.yaml", [])
    spec = policy_spec(config, pretrained=resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir),
                       num_gpus=0)
    sampler = Sampler(spec=spec)
    clip, judge = ClipScore(**shapes_clip_options()), ShapesJudge(mode="correct")
    rows = []
    print("| set | prompt | judge accuracy | CLIP AUC | accuracy of the CLIP-best half |\n|---|---|---|---|---|")
    for name in ("seen", "heldout"):
        prompts = (REPO / "configs" / "prompts" / f"shapes_{name}.txt").read_text().split("\n")
        for prompt in filter(None, (p.strip() for p in prompts)):
            _, images = sampler.sample(prompts=[prompt] * args.images, seed=args.seed)
            scores = np.asarray(clip(images.images, images.prompts).scores, dtype=np.float64)
            correct = np.asarray(judge(images.images, images.prompts).scores) > 0.5
            best_half = correct[np.argsort(-scores, kind="stable")[: args.images // 2]]
            row = {"set": name, "prompt": prompt, "accuracy": float(correct.mean()), "auc": auc(scores, correct),
                   "best_half_accuracy": float(best_half.mean())}
            rows.append(row)
            print(f"| {name} | {prompt} | {row['accuracy']:.2f} | {row['auc']:.2f} | {row['best_half_accuracy']:.2f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
