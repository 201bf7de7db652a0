"""D-Fusion pairs for online DPO (``dpo.pair_source: dfusion``): which samples to fuse on which sampler,
and the epoch's D-Fusion metrics.

Per prompt of the epoch, its worst and its best sample (finite rewards, best > worst) form a pair; the
fused sample (the best one's content inside the prompt tokens' attention mask, re-denoised from the
worst one's noise: D-Fusion, ICML 2025; ``actors/dfusion.py``) is preferred over the worst one. Pairs
are split evenly over the samplers, and each sampler is sent only the trajectory batches it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.selection import preference_pairs


@dataclass
class FusionTask:
    """One sampler's share: ``sources`` indexes the epoch's batches it needs; poor/good are
    (index into sources, row) per pair, in the same order."""

    sampler: int
    sources: list[int]
    poor: list[tuple[int, int]]
    good: list[tuple[int, int]]


@dataclass
class DFusionLaunch:
    """References to one epoch's D-Fusion calls, in pair order."""

    pairs: list  # ObjectRef[TrajectoryPairs]: chosen = fused, rejected = the prompt's worst sample
    scores: list  # ObjectRef[ScoredBatch] of the fused images (monitoring only)
    stats: list  # ObjectRef[dict]: mask_fraction per pair, unet_calls, dfusion_s
    poor_rewards: np.ndarray  # float32 [P]
    good_rewards: np.ndarray  # float32 [P]


def fusion_tasks(batch_prompts: list[list[str]], total: np.ndarray, *, num_samplers: int
                 ) -> tuple[list[FusionTask], np.ndarray, np.ndarray]:
    """(tasks, worst rewards [P], best rewards [P]) for an epoch whose batch b holds the samples
    ``batch_prompts[b]`` (in order) with rewards ``total`` (concatenated over batches)."""
    prompts = [p for batch in batch_prompts for p in batch]
    if len(prompts) != total.size:
        raise RuntimeError(f"{len(prompts)} prompts but {total.size} rewards in the epoch")
    groups = np.unique(prompts, return_inverse=True)[1]
    best, worst = preference_pairs(groups, total)
    where = [(b, row) for b, batch in enumerate(batch_prompts) for row in range(len(batch))]  # (batch, row)
    tasks = []
    if best.size:
        for k, chunk in enumerate(np.array_split(np.arange(best.size), min(num_samplers, best.size))):
            used = sorted({where[i][0] for i in np.concatenate([best[chunk], worst[chunk]])})
            local = {b: j for j, b in enumerate(used)}
            tasks.append(FusionTask(sampler=k, sources=used,
                                    poor=[(local[where[i][0]], where[i][1]) for i in worst[chunk]],
                                    good=[(local[where[i][0]], where[i][1]) for i in best[chunk]]))
    return tasks, total[worst], total[best]


def dfusion_row(fusion: DFusionLaunch, *, stats: list[dict], fused: np.ndarray | None) -> dict:
    """Per-epoch D-Fusion metrics: pair count, mean mask fraction, rewards of fused / worst / best."""
    row = {"dfusion/n_pairs": int(fusion.poor_rewards.size)}
    if not fusion.pairs:
        return row
    row.update({
        "dfusion/mask_fraction": float(np.mean([f for s in stats for f in s["mask_fraction"]])),
        "dfusion/reward_mean": float(np.nanmean(fused)),
        "dfusion/poor_reward_mean": float(np.mean(fusion.poor_rewards)),
        "dfusion/good_reward_mean": float(np.mean(fusion.good_rewards)),
        "dfusion/reward_gain": float(np.nanmean(fused - fusion.poor_rewards)),
        "time/dfusion_s": float(max(s["dfusion_s"] for s in stats)),
    })
    return row


def launch_dfusion(config, current, scores: list, *, samplers: list, reward_stage, gamma: float) -> DFusionLaunch:
    """Queues the epoch's D-Fusion calls and, as a metric only, the scoring of the fused images (fused ≻
    worst is D-Fusion's construction, not a reward comparison). ``current`` is the epoch's
    ``EpochBatch``, ``scores`` its ScoredBatches. A call is deterministic, so Ray may rerun it on a
    restarted sampler; until the next broadcast that sampler holds the initial adapter, and the learner
    refuses its pairs as stale (counted)."""
    from cluster.config import dfusion_spec

    spec = dfusion_spec(config)
    total = np.concatenate([s.total for s in scores]).astype(np.float32)
    tasks, poor_rewards, good_rewards = fusion_tasks(current.prompts, total, num_samplers=len(samplers))
    pair_refs, score_refs, stat_refs = [], [], []
    for task in tasks:
        pairs_ref, images_ref, stats_ref = samplers[task.sampler].dfusion.options(
            num_returns=3, max_task_retries=2).remote(
            sources=[current.jobs[b].trajectory for b in task.sources], poor=task.poor, good=task.good, spec=spec)
        pair_refs.append(pairs_ref)
        stat_refs.append(stats_ref)
        score_refs.append(reward_stage.score.remote(batch=images_ref, gamma=gamma))
    return DFusionLaunch(pairs=pair_refs, scores=score_refs, stats=stat_refs, poor_rewards=poor_rewards,
                         good_rewards=good_rewards)
