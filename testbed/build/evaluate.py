"""Measures a shapes-world pipeline with the ground-truth judge: images for fixed prompts and seeds, the
judge's verdicts, accuracy per caption family with standard errors, and a shuffled-caption chance level.

Chance is measured, not assumed: the same images judged against the captions of other prompts of the
same family (a fixed derangement), which is how often an image that ignores its prompt would pass.

``python -m testbed.build.evaluate --pipeline DIR [--lora RUN/lora] [--n 200] [--steps 20] [--cfg 3] [--eta 1]``
evaluates on the generator's fixed evaluation scenes; with ``--prompts NAME=FILE`` (repeatable) and
``--per-prompt K`` it evaluates each named prompt set instead, K images per prompt.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from testbed.build.common import eval_scenes
from testbed.judge import judge
from testbed.world import FAMILIES


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int, steps: int = 20, guidance: float = 3.0, eta: float = 1.0,
             batch_size: int = 50) -> np.ndarray:
    """uint8 [N, 32, 32, 3] images, prompt i drawn with its own generator seeded ``seed + i`` (so a
    prompt's image does not depend on the batch it falls in)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=generators,
                   output_type="np").images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def _derangement(n: int, seed: int) -> np.ndarray:
    """A fixed permutation with no fixed point (a cyclic shift of a random order)."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=int)
    out[order] = np.roll(order, 1)
    return out


def accuracy_table(images: np.ndarray, captions: list[str], families: list[str], *, seed: int = 0) -> dict:
    """Per family (and overall): n, judge accuracy and its standard error sqrt(p(1-p)/n), the binding
    accuracy, and the shuffled-caption chance level."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, family in enumerate(families):
        groups[family].append(i)
    groups["all"] = list(range(len(captions)))
    table = {}
    for family, idx in groups.items():
        verdicts = [judge(images[i], captions[i]) for i in idx]
        shuffled = [idx[j] for j in _derangement(len(idx), seed)] if len(idx) > 1 else idx
        chance = [judge(images[i], captions[j]).correct for i, j in zip(idx, shuffled, strict=True)]
        p = float(np.mean([v.correct for v in verdicts]))
        table[family] = {
            "n": len(idx),
            "correct": p,
            "se": math.sqrt(p * (1 - p) / len(idx)),
            "binding": float(np.mean([v.binding for v in verdicts])),
            "chance_shuffled": float(np.mean(chance)),
        }
    return table


def evaluate_pipeline(pipe, *, n: int = 200, seed: int = 0, steps: int = 20, guidance: float = 3.0,
                      eta: float = 1.0, family: str | None = None) -> dict:
    """Accuracy tables on ``n`` seen and ``n`` held-out fixed prompts (evaluation scenes' captions)."""
    report = {}
    for held_out in (False, True):
        scenes = eval_scenes(n, held_out=held_out, family=family, offset=100_000)
        captions = [s.caption for s in scenes]
        images = generate(pipe, captions, seed=seed, steps=steps, guidance=guidance, eta=eta)
        report["held_out" if held_out else "seen"] = accuracy_table(images, captions, [s.family for s in scenes])
    return report


def evaluate_prompt_sets(pipe, sets: dict[str, list[str]], *, per_prompt: int, seed: int = 0, steps: int = 20,
                         guidance: float = 3.0, eta: float = 1.0) -> dict:
    """Accuracy tables of named prompt sets, ``per_prompt`` images per prompt (image j of prompt i drawn
    with seed ``seed + i * per_prompt + j``, so a set's images do not depend on the other sets)."""
    from testbed.judge import parse_caption

    report = {}
    for name, prompts in sets.items():
        captions = [p for p in prompts for _ in range(per_prompt)]
        images = generate(pipe, captions, seed=seed, steps=steps, guidance=guidance, eta=eta)
        report[name] = accuracy_table(images, captions, [parse_caption(c).family for c in captions])
    return report


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(prog="python -m testbed.build.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, type=Path)
    parser.add_argument("--lora", type=Path, help="a diffusers LoRA directory to load (a run's lora/)")
    parser.add_argument("--prompts", action="append", default=[], metavar="NAME=FILE",
                        help="a named prompt set (one prompt per line); repeatable")
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt of --prompts sets")
    parser.add_argument("--n", type=int, default=200, help="prompts per split (seen, held-out)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.lora is not None:
        pipe.load_lora_weights(args.lora)
    if args.prompts:
        sets = {}
        for item in args.prompts:
            name, sep, file = item.partition("=")
            if not sep or not name:
                parser.error(f"--prompts {item!r}: expected NAME=FILE")
            sets[name] = [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
        report = evaluate_prompt_sets(pipe, sets, per_prompt=args.per_prompt, seed=args.seed, steps=args.steps,
                                      guidance=args.cfg, eta=args.eta)
    else:
        report = evaluate_pipeline(pipe, n=args.n, seed=args.seed, steps=args.steps, guidance=args.cfg,
                                   eta=args.eta, family=args.family)
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
