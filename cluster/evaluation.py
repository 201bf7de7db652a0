"""The fixed evaluation set: which batches to sample (prompts x images per prompt, fixed seeds), the
result of one evaluation, and its outputs: a grid PNG whose cells carry their prompt and reward, the
prompts, rewards and captions as JSON, and the same grid to the metric sinks (TensorBoard, W&B)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.seeding import eval_seed
from cluster.config import Config
from cluster.grids import save_grid
from cluster.metrics import MetricsWriter
from cluster.samplers import BatchJob


@dataclass
class EvalResult:
    mean: float
    images: np.ndarray  # uint8 [N, H, W, 3]
    components: dict[str, float]  # eval/<reward> -> mean
    prompts: list[str]
    scores: np.ndarray  # float32 [N]
    captions: list[str] | None


def eval_jobs(config: Config, *, num_samplers: int) -> list[BatchJob]:
    """The evaluation batches, the same at every evaluation: chunks of ``sampling.batch_size`` prompts
    spread over the samplers, each with its fixed seed (no volume shaping: gamma 0)."""
    prompts = [p for p in config.prompts.eval for _ in range(config.prompts.eval_images_per_prompt)]
    size = config.sampling.batch_size
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    return [BatchJob(worker=k % num_samplers, prompts=chunk, gamma=0.0, seed=eval_seed(config.prompts.eval_seed, chunk=k))
            for k, chunk in enumerate(chunks)]


def eval_result(jobs: list[BatchJob], scores: list, image_batches: list) -> EvalResult:
    """One evaluation from its jobs, their ScoredBatch and their ImageBatches (in job order)."""
    total = np.concatenate([s.total for s in scores])
    components = {f"eval/{name}": float(np.nanmean(np.concatenate([s.components[name] for s in scores])))
                  for name in scores[0].components}
    captions = [c for s in scores for c in (s.captions or [])] or None
    return EvalResult(mean=float(np.nanmean(total)), images=np.concatenate([b.images for b in image_batches]),
                      components=components, prompts=[p for job in jobs for p in job.prompts], scores=total,
                      captions=captions)


EVAL_IMAGES = "eval/samples"  # the image tag of the evaluation grids (TensorBoard, W&B)


def save_eval(result: EvalResult, *, run_dir: Path, updates: int, writer: MetricsWriter | None = None) -> Path:
    """``samples/eval_epochNNNN.png`` (the labelled grid; NNNN = ``updates``, the updates applied before
    the evaluation, 0 = the base model) and ``.json`` (prompt, reward and caption of every image); the
    grid also goes to ``writer``'s sinks as ``eval/samples`` at step ``updates``. Returns the PNG's path."""
    stem = run_dir / "samples" / f"eval_epoch{updates:04d}"
    grid = save_grid(result.images, stem.with_suffix(".png"), labels=result.prompts, scores=result.scores)
    items = [{"prompt": p, "reward": None if not np.isfinite(r) else float(r)}
             for p, r in zip(result.prompts, result.scores, strict=True)]
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
