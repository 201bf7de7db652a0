"""One metrics row per epoch: rewards, the learner's statistics, timings, counters; the console line.

Names are namespaced (``train/``, ``reward/``, ``time/``, ``eval/``, ``sampler/``, ``b2/``, ``dpo/``,
``dfusion/``; the table is in README.md) and TensorBoard groups them by prefix. The learner's
statistics arrive namespaced and are forwarded as they come (a new learner metric needs no change
here); counts are integers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.config import Config
from learner.bpt import BptSchedule


def epoch_row(epoch: int, *, scores: list, stats: dict, applied: list[dict], config: Config,
              schedule: BptSchedule | None, num_samplers: int, gamma: float) -> dict:
    """The row of one epoch from its ScoredBatch, the learner's (already namespaced) stats and the
    samplers' broadcast acks (empty when nothing was published)."""
    total = np.concatenate([s.total for s in scores])
    finite = total[np.isfinite(total)]
    row = {
        "epoch": epoch,
        "train/policy_version": int(stats.get("train/policy_version", epoch + 1)),
        "sampler/policy_version": int(min(s.policy_version for s in scores)),
        "reward/mean": float(finite.mean()) if finite.size else float("nan"),
        "reward/std": float(finite.std()) if finite.size else float("nan"),
        "reward/n_scored": int(total.size),
    }
    for name in scores[0].components:
        row[f"reward/{name}"] = float(np.nanmean(np.concatenate([s.components[name] for s in scores])))
    if scores[0].volume is not None:
        row["reward/volume"] = float(np.nanmean(np.concatenate([s.volume for s in scores])))
    row["reward/volume_gamma"] = gamma
    row["reward/retries"] = int(sum(sum((s.retries or {}).values()) for s in scores))
    row["time/sample_s"] = float(sum(s.sample_s for s in scores)) / num_samplers
    row["time/reward_s"] = float(sum(s.reward_wall_s for s in scores))
    for name in scores[0].latency_s:
        row[f"time/latency_{name}_s"] = float(np.mean([s.latency_s[name] for s in scores]))
    row.update(stats)
    for key in ("train/nonfinite_trajectories", "train/optimizer_steps", "train/skipped_steps",
                "train/skipped_steps_in_row", "reward/nonfinite", "train/stale_refused"):
        row.setdefault(key, 0)
    if schedule is not None:
        stage = schedule.stage(epoch)
        row["b2/stage"] = stage
        row["b2/train_interval"] = list(schedule.interval(stage))  # [first, last) denoising-step indices
        row["b2/branch_step"] = schedule.branch_step(stage) if config.b2.branching else None
        row.setdefault("b2/n_selected", 0)
    # Broadcast cost: packing + hashing on the learner, then verify + copy on the slowest sampler.
    row["time/apply_weights_s"] = max((a["apply_s"] for a in applied), default=0.0)
    row["time/broadcast_s"] = (row.get("time/publish_s", 0.0) if applied else 0.0) + row["time/apply_weights_s"]
    return row


def run_counters(rows: list[dict], *, sampler_restarts: int, resampled_batches: int) -> dict:
    """Totals over the run's rows so far (kept in checkpoints)."""
    def total(key: str) -> int:
        return int(sum(r.get(key, 0) or 0 for r in rows))

    return {"sampler_restarts_total": sampler_restarts, "resampled_batches_total": resampled_batches,
            "stale_refused_total": total("train/stale_refused"), "nonfinite_rewards_total": total("reward/nonfinite"),
            "nonfinite_trajectories_total": total("train/nonfinite_trajectories"),
            "skipped_steps_total": total("train/skipped_steps")}


def log_captions(run_dir: Path, epoch: int, scores: list) -> None:
    """Captions of the first scored batch of each epoch (captioning rewards only) -> captions.jsonl."""
    first = scores[0]
    if not first.captions:
        return
    with (run_dir / "captions.jsonl").open("a") as f:
        for caption, reward in zip(first.captions, first.total, strict=False):
            f.write(json.dumps({"epoch": epoch, "caption": caption,
                                "reward": float(reward) if np.isfinite(reward) else None}) + "\n")


# The algorithm's own loss statistics: each printed only where the epoch's row has it (PPO/PG report the
# KL and clipping, DPO its pair accuracy and margin), so no line shows a "nan" for a quantity not computed.
ALGORITHM_FIELDS = (("train/kl", "kl", ".2e"), ("train/approx_kl", "approx_kl", ".2e"),
                    ("train/clipfrac", "clipfrac", ".2f"), ("dpo/acc", "dpo_acc", ".2f"),
                    ("dpo/margin", "dpo_margin", ".2e"))


def summary_line(row: dict) -> str:
    """The console line of one epoch."""
    parts = [f"epoch {row['epoch']:>3}", f"v{row['train/policy_version']}", f"reward {row['reward/mean']:.4f}"
             f" ± {row['reward/std']:.4f}"]
    if "train/loss" in row:
        parts.append(f"loss {row['train/loss']:.3e}")
    parts += [f"{label} {row[key]:{spec}}" for key, label, spec in ALGORITHM_FIELDS if key in row]
    parts.append(f"{row['time/epoch_s']:.1f}s")
    if "eval/reward_mean" in row:
        parts.append(f"eval {row['eval/reward_mean']:.4f}")
    return "  ".join(parts)


def progress_postfix(row: dict) -> dict[str, str]:
    """The progress bar's postfix: the epoch's mean reward and the first of the algorithm's statistics."""
    postfix = {"reward": f"{row['reward/mean']:.3f}"}
    for key, label, spec in ALGORITHM_FIELDS:
        if key in row:
            postfix[label] = f"{row[key]:{spec}}"
            break
    return postfix


def report_epoch(progress, row: dict, *, log) -> None:
    """Advances the progress bar by one epoch, with ``progress_postfix(row)``, and logs ``summary_line(row)``."""
    progress.update(1)
    progress.set_postfix(progress_postfix(row))
    log(summary_line(row))


def progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="epochs", unit="epoch", disable=not enabled, leave=True)
