"""The shapes world's ground-truth judge as a reward (``testbed.judge``): a gold evaluator, or an oracle
training reward.

mode "correct": 1 when the image shows exactly the caption's objects (and its relation), else 0.
mode "partial": the mean of the applicable checks (binding, count, and relation in that family), a
denser signal for training, but a lenient one: binding asks only that each described kind be present and
count only that the number of objects be right, so a yellow circle beside a yellow square scores 1 for
"two yellow squares".
mode "overlap": the multiset overlap of the detected kinds with the described ones, |found ∩ wanted| /
|found ∪ wanted| (averaged with the relation check in that family): dense like "partial", and 1 exactly
when the image is correct, so a policy cannot collect full credit on an image the judge rejects.
A prompt outside the world's grammar or an image that is not 32×32 RGB is a ValueError naming it, never a
silent zero.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput, check_batch

MODES = ("correct", "partial", "overlap")
# Each verdict's parts, returned beside the score whatever the mode (``RewardOutput.checks``; the evaluation
# reports their rates as ``eval/gold_<set>/checks/<check>``): which check keeps an image from full credit.
CHECKS = ("binding", "count", "relation", "overlap")


class ShapesJudge:
    """Score_i = the judge's verdict on (image_i, prompt_i)."""

    name = "shapes_judge"

    def __init__(self, *, mode: str = "correct") -> None:
        self.check_options(mode=mode)
        self.mode = mode

    @classmethod
    def check_options(cls, *, mode: str = "correct") -> None:
        if mode not in MODES:
            raise ValueError(f"shapes_judge: mode must be one of {list(MODES)}, got {mode!r}")

    @staticmethod
    def groups(prompts: list[str]) -> list[str]:
        """Each prompt's caption family ("single", "count", "relation"): the evaluation reports the gold
        mean per family (``eval/gold_<set>/<family>``), where a policy's failures differ most."""
        from testbed.judge import parse_caption

        return [parse_caption(p).family for p in prompts]

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        from testbed.judge import judge, kind_overlap, parse_caption

        check_batch(images, prompts)
        specs = [parse_caption(p) for p in prompts]  # every prompt checked before any image is judged
        correct = np.empty(len(prompts), dtype=np.float32)
        checks = {name: np.full(len(prompts), np.nan, dtype=np.float32) for name in CHECKS}
        for i, (image, spec) in enumerate(zip(images, specs, strict=True)):
            verdict = judge(image, spec)
            correct[i] = verdict.correct
            checks["binding"][i], checks["count"][i] = verdict.binding, verdict.count
            checks["overlap"][i] = kind_overlap(verdict, spec)
            if verdict.relation is not None:
                checks["relation"][i] = verdict.relation
        # The dense modes average their checks where they apply (relation: NaN outside that family).
        parts = {"partial": ("binding", "count", "relation"), "overlap": ("overlap", "relation")}.get(self.mode)
        scores = correct if parts is None else np.nanmean(np.stack([checks[c] for c in parts]), axis=0)
        return RewardOutput(scores=scores, checks=checks)
