"""The best adapter of a run by an evaluation metric (``evaluation.keep_best``).

After every evaluation that follows an update, the adapter is kept in ``best_lora/`` when its value of
the metric is higher than the one recorded in ``best_lora/best.json`` (none yet: any finite value). Long
online runs can degrade late (on the shapes world PPO collapsed after 20-45 epochs of gains), so the
adapter of the best evaluation is worth keeping beside the last one. The metric should be read on a
validation draw (its own prompts or evaluation seed), not on the images one reports: picking the best of
several evaluations on the reported images overstates the gain.

The new adapter is written to ``best_lora.tmp/`` first and renamed into place, so ``best_lora/`` never
holds a half-written adapter (a crash between the two renames leaves the previous one in ``best_lora.old/``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

BEST_DIR = "best_lora"
RECORD = "best.json"


def best_record(run_dir: Path) -> dict | None:
    """``best_lora/best.json`` ({"metric", "value", "updates"}) or None when no adapter was kept yet."""
    path = Path(run_dir) / BEST_DIR / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def keep_if_best(run_dir: Path, *, metric: str, metrics: dict, updates: int,
                 export: Callable[[Path], object]) -> bool:
    """Writes the adapter (``export(directory)``) and its record to ``best_lora/`` when ``metrics[metric]``
    is finite and above the recorded best; returns whether it did. ``updates``: the updates applied
    before the evaluation (its ``samples/eval_epochNNNN`` number)."""
    if metric not in metrics:
        raise KeyError(f"evaluation.keep_best = {metric!r} is not among this evaluation's metrics "
                       f"{sorted(metrics)}")
    value = float(metrics[metric])
    previous = best_record(run_dir)
    if not math.isfinite(value) or (previous is not None and value <= previous["value"]):
        return False
    run_dir = Path(run_dir)
    staging, final = run_dir / f"{BEST_DIR}.tmp", run_dir / BEST_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    export(staging)
    (staging / RECORD).write_text(json.dumps({"metric": metric, "value": value, "updates": updates}, indent=1))
    old = run_dir / f"{BEST_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return True
