"""Seeds derived from (seed, epoch, worker, batch), never from process history (DESIGN.md §2, §5).

A restarted or resumed process therefore samples exactly what the original would have.
"""

from __future__ import annotations

import numpy as np

_PROMPTS, _NOISE, _EVAL = 1, 2, 3  # streams, so prompt choice and noise never share a generator


def batch_seed(seed: int, *, epoch: int, worker: int, batch: int) -> int:
    """The torch generator seed of one sampler batch."""
    return int(np.random.SeedSequence([seed, _NOISE, epoch, worker, batch]).generate_state(1, np.uint64)[0] >> 1)


def batch_prompts(prompts: list[str], *, size: int, seed: int, epoch: int, worker: int, batch: int) -> list[str]:
    """``size`` prompts drawn uniformly with replacement for one sampler batch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROMPTS, epoch, worker, batch]))
    return [prompts[i] for i in rng.integers(0, len(prompts), size=size)]


def eval_seed(seed: int, *, chunk: int) -> int:
    """The fixed seed of one evaluation chunk (the same at every evaluation)."""
    return int(np.random.SeedSequence([seed, _EVAL, chunk]).generate_state(1, np.uint64)[0] >> 1)
