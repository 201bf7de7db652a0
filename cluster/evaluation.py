"""The fixed evaluation set: which batches to sample (prompt sets x images per prompt, fixed seeds), the
result of one evaluation with its ``eval/`` metrics, and its outputs: a grid PNG whose cells carry
their prompt and reward, each image's set, prompt, rewards and caption as JSON, and the same grid to
the metric sinks (TensorBoard, W&B)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.seeding import eval_seed
from cluster.config import Config
from cluster.eval_metrics import eval_metrics
from cluster.grids import save_grid
from cluster.metrics import MetricsWriter
from cluster.samplers import BatchJob


@dataclass
class EvalResult:
    """One evaluation of N images. metrics: every ``eval/`` value of the row (``cluster/eval_metrics.py``
    and the training rewards' ``eval/reward_mean``, ``eval/<reward>``)."""

    mean: float
    images: np.ndarray  # uint8 [N, H, W, 3]
    components: dict[str, float]  # eval/<reward> -> mean
    prompts: list[str]
    scores: np.ndarray  # float32 [N], the training reward
    captions: list[str] | None
    sets: list[str] = field(default_factory=list)  # [N], each image's prompt set
    gold_scores: dict[str, np.ndarray] = field(default_factory=dict)  # evaluation reward -> float32 [N]
    metrics: dict[str, float] = field(default_factory=dict)


def eval_items(config: Config) -> list[tuple[str, str]]:
    """(set, prompt) of every evaluation image, in sampling order: each set's prompts, each repeated
    ``evaluation.images_per_prompt`` times."""
    e = config.evaluation
    return [(name, p) for name, prompts in e.prompts.items() for p in prompts for _ in range(e.images_per_prompt)]


def evaluation_due(config: Config, *, epoch: int) -> bool:
    """Whether the run evaluates after ``epoch`` (0-based): after every ``evaluation.every`` epochs (0: none
    in between) and after the last one. The evaluation before the first update comes on top."""
    every = config.evaluation.every
    return epoch + 1 == config.epochs or bool(every and (epoch + 1) % every == 0)


def eval_candidates(config: Config) -> list[str]:
    """Every distinct evaluation prompt (all sets pooled): what Recall@1 retrieves each image's prompt from."""
    return list(dict.fromkeys(p for _, p in eval_items(config)))


def eval_jobs(config: Config, *, num_samplers: int) -> list[BatchJob]:
    """The evaluation batches, the same at every evaluation: chunks of ``evaluation.batch_size`` prompts
    (0: ``sampling.batch_size``) spread over the samplers, each with its fixed seed (no volume shaping:
    gamma 0)."""
    prompts = [p for _, p in eval_items(config)]
    size = config.evaluation.batch_size or config.sampling.batch_size
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    seed = config.evaluation.seed
    return [BatchJob(worker=k % num_samplers, prompts=chunk, gamma=0.0, seed=eval_seed(seed, chunk=k))
            for k, chunk in enumerate(chunks)]


def _prompt_groups(reward: str | None, prompts: list[str]) -> list[str] | None:
    """Each prompt's group under the gold reward (its class's ``groups(prompts)``), or None if it has none."""
    if reward is None:
        return None
    from rewards.registry import REWARDS

    groups = getattr(REWARDS[reward], "groups", None)  # optional, like check_options
    return None if groups is None else list(groups(prompts))


def eval_result(config: Config, jobs: list[BatchJob], scores: list, image_batches: list,
                gold: list[dict] | None = None) -> EvalResult:
    """One evaluation from its jobs, their ScoredBatch, their ImageBatches and the reward stage's gold
    results (``RewardStage.evaluate``; None without gold or recall rewards), all in job order."""
    total = np.concatenate([s.total for s in scores])
    components = {f"eval/{name}": float(np.nanmean(np.concatenate([s.components[name] for s in scores])))
                  for name in scores[0].components}
    captions = [c for s in scores for c in (s.captions or [])] or None
    images = np.concatenate([b.images for b in image_batches])
    prompts = [p for job in jobs for p in job.prompts]
    sets = [s for s, _ in eval_items(config)]
    gold_scores = {name: np.concatenate([g["scores"][name] for g in gold]) for name in gold[0]["scores"]} if gold else {}
    hits = np.concatenate([g["recall_hit"] for g in gold]) if gold and gold[0]["recall_hit"] is not None else None
    e = config.evaluation
    gold_parts = [g["checks"].get(e.gold) for g in gold or []]  # {check: [b]} per batch, or None
    gold_checks = ({name: np.concatenate([parts[name] for parts in gold_parts]) for name in gold_parts[0]}
                   if gold_parts and all(gold_parts) else None)
    metrics = {"eval/reward_mean": float(np.nanmean(total)), **components}
    metrics.update(eval_metrics(sets=sets, prompts=prompts, images=images, train_total=total, scores=gold_scores,
                                gold=e.gold, groups=_prompt_groups(e.gold, prompts), gold_checks=gold_checks,
                                recall_hits=hits,
                                with_diversity=e.images_per_prompt >= 2))
    return EvalResult(mean=metrics["eval/reward_mean"], images=images, components=components, prompts=prompts,
                      scores=total, captions=captions, sets=sets, gold_scores=gold_scores, metrics=metrics)


EVAL_IMAGES = "eval/samples"  # the image tag of the evaluation grids (TensorBoard, W&B)


def save_eval(result: EvalResult, *, run_dir: Path, updates: int, writer: MetricsWriter | None = None,
              stem: Path | None = None) -> Path:
    """``samples/eval_epochNNNN.png`` (the labelled grid; NNNN = ``updates``, the updates applied before
    the evaluation, 0 = the base model) and ``.json`` (set, prompt, reward, gold rewards and caption of
    every image), or ``stem`` + ``.png``/``.json`` when given; the grid also goes to ``writer``'s sinks as
    ``eval/samples`` at step ``updates``. Returns the PNG's path."""
    stem = stem or run_dir / "samples" / f"eval_epoch{updates:04d}"
    grid = save_grid(result.images, stem.with_suffix(".png"), labels=result.prompts, scores=result.scores)
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731 - JSON has no NaN
    items = [{"prompt": p, "reward": finite(r)} for p, r in zip(result.prompts, result.scores, strict=True)]
    for i, item in enumerate(items):
        if result.sets:
            item["set"] = result.sets[i]
        if result.gold_scores:
            item["gold"] = {name: finite(values[i]) for name, values in result.gold_scores.items()}
    for item, caption in zip(items, result.captions or [], strict=False):
        item["caption"] = caption
    stem.with_suffix(".json").write_text(json.dumps(items, indent=1))
    if writer is not None:
        prompts = list(dict.fromkeys(result.prompts))  # the cells carry every prompt; the caption lists a few
        listed = "; ".join(prompts[:8]) + (f"; and {len(prompts) - 8} more" if len(prompts) > 8 else "")
        caption = (f"after {updates} update{'' if updates == 1 else 's'}: eval reward {result.mean:.4g} over {len(result.prompts)} samples of "
                   f"{len(prompts)} prompts ({listed})")
        writer.log_images(EVAL_IMAGES, [grid], captions=[caption], step=updates)
    return stem.with_suffix(".png")
