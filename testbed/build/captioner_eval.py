"""Measures the shapes world's captioner against the ground truth, per caption family and for seen vs
held-out kinds, on clean renders and on degraded ones (every image blurred and noisy, as
``reward_clip.degrade`` does to half of the training images).

Per image, with greedy decoding (transformers ``generate``):
- ``exact``: the caption equals the ground-truth caption word for word;
- ``exact_either_order``: ... or a relation's mirror image ("a blue square right of a red circle" for "a red
  circle left of a blue square"; the generator names the two objects in random order, so a captioner
  cannot know which order the ground truth used);
- ``judge``: the judge parses the caption and finds it true of the image (``judge(image, caption).correct``;
  a relation may be said either way round, "a red circle left of a blue square" or "a blue square right of
  a red circle");
- ``unparseable``: the caption is outside the grammar (counted wrong under ``judge``);
- ``judge_truth``: the judge's verdict on the ground-truth caption, the ceiling of ``judge`` on those
  images (below 1 on degraded renders only if the degradation fooled the judge itself).

``python -m testbed.build.captioner_eval [--weights DIR] [--n 100] [--vllm 16] [--report FILE]`` measures
a shipped captioner (the repository's by default); ``--vllm K`` also captions K fixed clean renders with a
vLLM engine through ``llava_bertscore`` (float32 from the fp16 files) and counts the captions identical
to transformers' greedy ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from testbed.build.common import eval_scenes
from testbed.build.reward_clip import degrade
from testbed.judge import judge, parse_caption
from testbed.world import FAMILIES, caption_for, render

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
EVAL_OFFSET = 80_000  # the captioner's evaluation scenes: apart from the other models' evaluation sets
DEGRADE_SEED = 4242


def mirrored(caption: str) -> str:
    """The same statement with the objects in the other order (a relation caption); others unchanged."""
    spec = parse_caption(caption)
    if spec.relation is None:
        return caption
    (ca, sa), (cb, sb) = spec.kinds
    return caption_for("relation", [(cb, sb), (ca, sa)], relation=OPPOSITE[spec.relation])


def score_captions(images: np.ndarray, captions: list[str], truths: list[str]) -> dict:
    """The measures of the module docstring for uint8 images [N, 32, 32, 3], N generated captions and N
    ground-truth captions; rates in [0, 1], plus up to three (truth, caption) examples of misses."""
    exact = either = judged = unparseable = truth_ok = 0
    misses = []
    for image, caption, truth in zip(images, captions, truths, strict=True):
        exact += caption == truth
        either += caption in (truth, mirrored(truth))
        truth_ok += judge(image, truth).correct
        try:
            spec = parse_caption(caption)
        except ValueError:
            unparseable += 1
            spec = None
        ok = spec is not None and judge(image, spec).correct
        judged += ok
        if not ok and len(misses) < 3:
            misses.append([truth, caption])
    n = len(captions)
    return {"n": n, "exact": round(exact / n, 4), "exact_either_order": round(either / n, 4), "judge": round(judged / n, 4),
            "unparseable": round(unparseable / n, 4), "judge_truth": round(truth_ok / n, 4), "misses": misses}


def eval_images(n: int, *, held_out: bool, family: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(clean uint8 [n, 32, 32, 3], degraded uint8 [n, 32, 32, 3], n true captions) of fixed scenes."""
    scenes = eval_scenes(n, held_out=held_out, family=family, offset=EVAL_OFFSET)
    clean = np.stack([render(s) for s in scenes])
    rng = np.random.default_rng([DEGRADE_SEED, int(held_out), FAMILIES.index(family)])
    return clean, degrade(clean, rng, every=1), [s.caption for s in scenes]


def _pooled(parts: list[dict]) -> dict:
    n = sum(p["n"] for p in parts)
    pooled = {k: round(sum(p[k] * p["n"] for p in parts) / n, 4) for k in ("exact", "exact_either_order", "judge",
                                                                          "unparseable", "judge_truth")}
    return {"n": n, **pooled}


@torch.no_grad()
def evaluate_captioner(model, processor, *, n: int = 100) -> dict:
    """``{"caption_eval": {condition: {split: {family | "all": measures}}}}`` with condition clean /
    degraded and split seen / held_out, n scenes per family and split (greedy captions)."""
    from testbed.build.captioner import caption_images

    result: dict = {"clean": {}, "degraded": {}}
    for split in ("seen", "held_out"):
        for condition in result:
            result[condition][split] = {}
        for family in FAMILIES:
            clean, degraded, truths = eval_images(n, held_out=split == "held_out", family=family)
            for condition, images in (("clean", clean), ("degraded", degraded)):
                result[condition][split][family] = score_captions(images, caption_images(model, processor, images),
                                                                  truths)
        for condition in result:
            result[condition][split]["all"] = _pooled([result[condition][split][f] for f in FAMILIES])
    return {"caption_eval": result}


def vllm_agreement(directory: Path, model_name: str, *, k: int = 16) -> dict:
    """Captions of k fixed clean renders (families in turn, every other one with a held-out kind) by a
    vLLM engine (``llava_bertscore``'s, float32) and by transformers' greedy ``generate``: how many agree,
    and how many of vLLM's the judge accepts. Call it under ``if __name__ == "__main__"`` (vLLM spawns)."""
    from rewards.registry import build_reward
    from testbed.build.captioner import MAX_NEW_TOKENS, caption_images, load_captioner

    scenes = [eval_scenes(1, held_out=i % 2 == 1, family=FAMILIES[i % 3], offset=EVAL_OFFSET + 50_000 + i)[0]
              for i in range(k)]
    images = np.stack([render(s) for s in scenes])
    model, processor = load_captioner(directory)
    expected = caption_images(model, processor, images)
    reward = build_reward("llava_bertscore", model=model_name, bertscore_model="minilm", dtype="float32",
                          enforce_eager=True, gpu_memory_utilization=0.15, max_tokens=MAX_NEW_TOKENS)
    try:
        got = reward.caption(images)
        scores = reward(images, [s.caption for s in scenes]).scores
    finally:
        reward.close()
    agree = sum(a == b for a, b in zip(got, expected, strict=True))
    judged = score_captions(images, got, [s.caption for s in scenes])["judge"]
    return {"k": k, "agree": agree, "vllm_judge": judged, "bertscore_recall_mean": round(float(np.mean(scores)), 4),
            "disagreements": [[a, b] for a, b in zip(got, expected, strict=True) if a != b][:5]}


def main(argv: list[str] | None = None) -> int:
    from rewards.llava_bertscore import SHAPES_LLAVA
    from testbed.build.captioner import load_captioner
    from testbed.build.manifest import SHAPES_LLAVA_WEIGHTS

    parser = argparse.ArgumentParser(prog="python -m testbed.build.captioner_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=SHAPES_LLAVA_WEIGHTS, help="a shipped captioner directory")
    parser.add_argument("--n", type=int, default=100, help="scenes per family and split")
    parser.add_argument("--vllm", type=int, default=0, help="also compare vLLM's captions on this many images")
    parser.add_argument("--report", type=Path, help="a build's report.json to add the measurements to")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    found: dict = {}
    if args.n > 0:
        found |= evaluate_captioner(*load_captioner(args.weights), n=args.n)
    if args.vllm > 0:
        shipped = args.weights.resolve() == SHAPES_LLAVA_WEIGHTS.resolve()
        found["vllm_agreement"] = vllm_agreement(args.weights, SHAPES_LLAVA if shipped else str(args.weights),
                                                 k=args.vllm)
    print(json.dumps(found, indent=1))
    if args.report is not None:
        report = json.loads(args.report.read_text()) if args.report.exists() else {}
        report.setdefault("captioner", {}).update(found)
        args.report.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"[captioner_eval] added to {args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
