"""Tiny open_clip models with random weights, for tests and the CPU demo (no download).

The config: embed_dim 32, 32 px images, 2-layer towers; ~1.7M params, a few ms per batch of 8
(measured on a CPU). open_clip 3.3 names a registered config by its file stem, which is why
the file is written as ``<directory>/<name>.json`` and ``name`` is what to pass as ``model``.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def tiny_clip_config_path(path: str | Path, name: str = "gard-tiny-clip") -> Path:
    """Where ``write_tiny_clip_config(path, name)`` writes: ``path`` itself if it ends in .json, else
    ``path/<name>.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / f"{name}.json"


def write_tiny_clip_config(path: str | Path, name: str = "gard-tiny-clip") -> str:
    """Writes the tiny open_clip model-config JSON and returns the model name to pass as ``model``.

    path: a directory (the file is ``path/<name>.json``) or a ``.json`` file path, whose stem must
    then equal ``name`` because that stem is the name open_clip registers.
    """
    file = tiny_clip_config_path(path, name)
    if file.stem != name:
        raise ValueError(
            f"open_clip names a config by its file stem: {str(file)!r} would register "
            f"{file.stem!r}, not name={name!r}"
        )
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    return name


def tiny_clip_score_options(path: str | Path, name: str = "gard-tiny-clip", *, seed: int = 0) -> dict:
    """Writes the tiny config and returns ``clip_score`` options for a random-weight tiny CLIP."""
    model = write_tiny_clip_config(path, name)
    return {
        "model": model,
        "pretrained": None,
        "model_config": str(tiny_clip_config_path(path, name)),
        "seed": seed,
    }


def tiny_aesthetic_options(path: str | Path, name: str = "gard-tiny-clip", *, seed: int = 0) -> dict:
    """Writes the tiny config and returns ``aesthetic`` options (tiny CLIP, random 32-d head)."""
    model = write_tiny_clip_config(path, name)
    return {
        "clip_model": model,
        "clip_pretrained": None,
        "model_config": str(tiny_clip_config_path(path, name)),
        "seed": seed,
    }


def shapes_clip_options() -> dict:
    """``clip_score`` options for the shapes world's trained reward model (``testbed/weights/shapes-clip``,
    an open_clip checkpoint), after checking its manifest; a missing or edited file is an error that names
    the rebuild command."""
    from testbed.build.manifest import SHAPES_CLIP_WEIGHTS, check_manifest
    from testbed.build.reward_clip import MODEL_NAME, WEIGHTS_FILE

    check_manifest(SHAPES_CLIP_WEIGHTS)
    return {"model": MODEL_NAME, "pretrained": str(SHAPES_CLIP_WEIGHTS / WEIGHTS_FILE),
            "model_config": str(SHAPES_CLIP_WEIGHTS / f"{MODEL_NAME}.json")}
