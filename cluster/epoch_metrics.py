"""One metrics row per epoch: rewards, the learner's statistics, timings, counters; the console line.

The learner's statistics are forwarded as they come (a new learner metric needs no change here);
counts are written as integers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster.config import Config
from learner.bpt import BptSchedule

# Learner statistics that count things (written as integers); every other statistic is a float.
COUNT_STATS = ("stale_refused", "nonfinite_rewards", "nonfinite_trajectories", "optimizer_steps", "skipped_steps",
               "skipped_steps_in_row", "n_pairs", "n_samples", "n_selected", "n_dpo_pairs", "bpt_stage",
               "train_first_step", "train_last_step")


def epoch_row(epoch: int, *, scores: list, stats: dict, applied: list[dict], config: Config,
              schedule: BptSchedule | None, num_samplers: int, gamma: float) -> dict:
    """The row of one epoch from its ScoredImages, the learner's stats and the samplers' broadcast acks
    (empty when nothing was published)."""
    total = np.concatenate([s.total for s in scores])
    finite = total[np.isfinite(total)]
    row = {
        "epoch": epoch,
        "policy_version": int(stats.get("version", epoch + 1)),
        "reward_mean": float(finite.mean()) if finite.size else float("nan"),
        "reward_std": float(finite.std()) if finite.size else float("nan"),
        "n_samples_scored": int(total.size),
        "sampled_policy_version": int(min(s.policy_version for s in scores)),
    }
    for name in scores[0].components:
        values = np.concatenate([s.components[name] for s in scores])
        row[f"reward_{name}"] = float(np.nanmean(values))
    if scores[0].volume is not None:
        row["volume_mean"] = float(np.nanmean(np.concatenate([s.volume for s in scores])))
    row["gamma"] = gamma
    row["sample_s"] = float(sum(s.sample_s for s in scores)) / num_samplers
    row["reward_s"] = float(sum(s.reward_wall_s for s in scores))
    for name in scores[0].reward_latency_s:
        row[f"latency_{name}_s"] = float(np.mean([s.reward_latency_s[name] for s in scores]))
    row["reward_retries"] = int(sum(sum((s.retries or {}).values()) for s in scores))
    for key, value in stats.items():
        if key != "version":
            row[key] = int(value) if key in COUNT_STATS else value
    for key in ("nonfinite_trajectories", "optimizer_steps", "skipped_steps", "skipped_steps_in_row"):
        row.setdefault(key, 0)
    if schedule is not None:
        stage = schedule.stage(epoch)
        row["bpt_stage"] = stage
        row["train_interval"] = list(schedule.interval(stage))  # [first, last) denoising-step indices
        row["branch_step"] = schedule.branch_step(stage) if config.b2.branching else None
        row.setdefault("n_selected", 0)
    # Broadcast cost: packing + hashing on the learner, then verify + copy on the slowest sampler.
    row["apply_weights_s"] = max((a["apply_s"] for a in applied), default=0.0)
    row["broadcast_s"] = (row.get("publish_s", 0.0) if applied else 0.0) + row["apply_weights_s"]
    return row


def run_counters(rows: list[dict], *, sampler_restarts: int, resampled_batches: int) -> dict:
    """Totals over the run's rows so far (kept in checkpoints)."""
    def total(key: str) -> int:
        return int(sum(r.get(key, 0) or 0 for r in rows))

    return {"sampler_restarts_total": sampler_restarts, "resampled_batches_total": resampled_batches,
            "stale_refused_total": total("stale_refused"), "nonfinite_rewards_total": total("nonfinite_rewards"),
            "nonfinite_trajectories_total": total("nonfinite_trajectories"),
            "skipped_steps_total": total("skipped_steps")}


def log_captions(run_dir: Path, epoch: int, scores: list) -> None:
    """Captions of the first scored batch of each epoch (captioning rewards only) -> captions.jsonl."""
    first = scores[0]
    if not first.captions:
        return
    with (run_dir / "captions.jsonl").open("a") as f:
        for caption, reward in zip(first.captions, first.total, strict=False):
            f.write(json.dumps({"epoch": epoch, "caption": caption,
                                "reward": float(reward) if np.isfinite(reward) else None}) + "\n")


def summary_line(row: dict) -> str:
    """The console line of one epoch."""
    parts = [f"epoch {row['epoch']:>3}", f"v{row['policy_version']}", f"reward {row['reward_mean']:.4f}"
             f" ± {row['reward_std']:.4f}", f"loss {row.get('loss', float('nan')):.3e}",
             f"kl {row.get('kl', float('nan')):.2e}", f"approx_kl {row.get('approx_kl', float('nan')):.2e}",
             f"clipfrac {row.get('clipfrac', float('nan')):.2f}", f"{row['epoch_s']:.1f}s"]
    if "eval_reward_mean" in row:
        parts.append(f"eval {row['eval_reward_mean']:.4f}")
    return "  ".join(parts)


def progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="epochs", unit="epoch", disable=not enabled, leave=True)
