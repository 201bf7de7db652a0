"""A synthetic preference set for offline Diffusion-DPO: smooth colour fields preferred over noise.

A learnable preference for tests and the CPU demo (DPO should lower the policy's denoising error on
smooth images relative to noise images), in the JSONL format ``gard dpo`` reads.

    python tools/synthetic_preferences.py runs/prefs --n-pairs 32 --prompts "a cat" "a dog" --size 64
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-frequency color field: a random 3x3 color grid, bilinearly upsampled -> uint8 [S, S, 3]."""
    from PIL import Image

    grid = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))


def _noise_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """High-frequency noise: i.i.d. uniform pixels -> uint8 [S, S, 3]."""
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_synthetic_preferences(
    out_dir: str | Path, *, n_pairs: int, prompts: Sequence[str], size: int = 64, seed: int = 0
) -> Path:
    """Writes a generated preference set to ``out_dir`` and returns its ``pairs.jsonl``.

    Pair i (prompt ``prompts[i % len(prompts)]``): chosen = a smooth color field, rejected = per-pixel
    noise; ``chosen/0000.png``, ``rejected/0000.png``, ... with paths relative to the JSONL file.
    A learnable preference for tests and the CPU demo (DPO should lower the policy's denoising error
    on smooth images relative to noise images).
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs={n_pairs!r} must be >= 1")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts={list(prompts)!r}: expected at least one non-empty string")
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "chosen").mkdir(parents=True, exist_ok=True)
    (out_dir / "rejected").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_pairs, size]))
    lines = []
    for i in range(n_pairs):
        chosen, rejected = f"chosen/{i:04d}.png", f"rejected/{i:04d}.png"
        Image.fromarray(_smooth_image(rng, size)).save(out_dir / chosen)
        Image.fromarray(_noise_image(rng, size)).save(out_dir / rejected)
        lines.append(json.dumps({"prompt": prompts[i % len(prompts)], "chosen": chosen, "rejected": rejected}))
    path = out_dir / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-pairs", type=int, default=32)
    parser.add_argument("--prompts", nargs="+", default=["a cat", "a dog"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_synthetic_preferences(args.out_dir, n_pairs=args.n_pairs, prompts=args.prompts, size=args.size,
                                       seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
