"""Hard-negative captions: a caption of the shapes world with one attribute swapped (pure, no torch).

A hard negative differs from the true caption in exactly one way, so a contrastive model must read that
attribute to tell them apart (the "hard negatives" of NegCLIP, Yuksekgonul et al. 2023, §5):
    colour    one object's colour replaced by another colour
    shape     one object's shape replaced by another shape
    count     single <-> two, two <-> three (single and count families)
    relation  the relation replaced by its opposite (relation family)
"""

from __future__ import annotations

import numpy as np

from testbed.judge import CaptionSpec, parse_caption
from testbed.world import COLORS, HELD_OUT, SHAPES, caption_for

SWAPS = ("colour", "shape", "count", "relation")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _caption(spec: CaptionSpec, kinds: list[tuple[str, str]], *, count: int | None = None,
             relation: str | None = None) -> str:
    n = len(spec.kinds) if count is None else count
    if spec.family == "relation":
        return caption_for("relation", kinds, relation=relation or spec.relation)
    return caption_for("single" if n == 1 else "count", kinds[:1], count=n)


def swap(caption: str, kind: str, rng: np.random.Generator, *, allow_held_out: bool = False) -> str | None:
    """``caption`` with one attribute of type ``kind`` (one of ``SWAPS``) changed; None where the swap does
    not apply to the caption's family, or (unless ``allow_held_out``) would name a held-out kind."""
    spec = parse_caption(caption)
    kinds = [spec.kinds[0]] if spec.family != "relation" else list(spec.kinds)
    if kind == "count":
        if spec.family == "relation":
            return None
        n = len(spec.kinds)
        return _caption(spec, kinds, count={1: 2, 2: int(rng.choice([1, 3])), 3: 2}[n])
    if kind == "relation":
        return None if spec.family != "relation" else _caption(spec, kinds, relation=OPPOSITE[spec.relation])
    if kind not in ("colour", "shape"):
        raise ValueError(f"unknown swap {kind!r}; valid swaps: {list(SWAPS)}")
    for _ in range(20):
        i = int(rng.integers(len(kinds)))
        colour, shape = kinds[i]
        options = [c for c in COLORS if c != colour] if kind == "colour" else [s for s in SHAPES if s != shape]
        new = options[int(rng.integers(len(options)))]
        changed = list(kinds)
        changed[i] = (new, shape) if kind == "colour" else (colour, new)
        if spec.family == "relation" and changed[0] == changed[1]:
            continue  # "a red circle left of a red circle" is not in the grammar's distribution
        if allow_held_out or not any(k in HELD_OUT for k in changed):
            return _caption(spec, changed)
    return None


def hard_negatives(caption: str, rng: np.random.Generator, *, allow_held_out: bool = False) -> dict[str, str]:
    """The applicable swaps of ``caption``: {swap type: negative caption}."""
    out = {}
    for kind in SWAPS:
        negative = swap(caption, kind, rng, allow_held_out=allow_held_out)
        if negative is not None and negative != caption:
            out[kind] = negative
    return out


def candidate_texts(captions: list[str], rng: np.random.Generator, *, allow_held_out: bool
                    ) -> tuple[list[str], list[int]]:
    """The distinct texts of a contrastive batch (its captions and their hard negatives, in first-seen
    order) and, per caption, the index of its own text: (texts [T], targets [B])."""
    texts: dict[str, int] = {}
    for caption in captions:
        texts.setdefault(caption, len(texts))
        for negative in hard_negatives(caption, rng, allow_held_out=allow_held_out).values():
            texts.setdefault(negative, len(texts))
    return list(texts), [texts[c] for c in captions]


def pairwise_wins(image_emb, captions: list[str], encode_texts, rng: np.random.Generator
                  ) -> tuple[dict[str, float], dict[str, int]]:
    """(accuracy, count) per swap type: how often an image's embedding is closer to its true caption than
    to that caption with one attribute swapped. image_emb: unit-norm [N, D] (torch); encode_texts: a
    function from texts to unit-norm embeddings [T, D]."""
    wins: dict[str, list[bool]] = {k: [] for k in SWAPS}
    for i, caption in enumerate(captions):
        negatives = hard_negatives(caption, rng, allow_held_out=True)
        if not negatives:
            continue
        sims = image_emb[i] @ encode_texts([caption, *negatives.values()]).T
        for j, kind in enumerate(negatives, start=1):
            wins[kind].append(bool(sims[0] > sims[j]))
    return {k: float(np.mean(v)) for k, v in wins.items() if v}, {k: len(v) for k, v in wins.items() if v}
