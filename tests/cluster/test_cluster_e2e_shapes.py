"""End to end on a real local Ray, judged on fixed evaluation seeds and paired against the base model: online
Diffusion-DPO on the reward CLIP makes the shapes pipeline draw what its prompts ask for more often (the
ground-truth judge, which that training never sees, says so); and with the judge itself as the reward it
teaches the pipeline a colour-shape combination its UNet was never trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cluster.config import load_config
from cluster.run import train

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 10


def _verdicts(run_dir: Path, epoch: int) -> list[tuple[str, float]]:
    """(prompt, judge verdict) of each evaluation image after ``epoch`` epochs, in the fixed-seed order."""
    rows = json.loads((run_dir / "samples" / f"eval_epoch{epoch:04d}.json").read_text())
    return [(row["prompt"], row["gold"]["shapes_judge"]) for row in rows]


def _paired_gain(before: list[tuple[str, float]], after: list[tuple[str, float]]) -> tuple[float, float, float]:
    """The base accuracy, and the mean and standard error of the per-image gain, paired by evaluation seed."""
    gains = [a - b for (_, b), (_, a) in zip(before, after, strict=True)]
    mean = sum(gains) / len(gains)
    se = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains))
    return sum(v for _, v in before) / len(before), mean, se


def test_online_dpo_raises_the_judges_accuracy_against_the_base_model(ray_local, tmp_path):
    # The shipped setting (configs/shapes_dpo.yaml), shortened to 10 epochs; the evaluation: its 4
    # training prompts (kinds the pipeline was trained on), 64 fixed-seed images each.
    config = load_config(REPO / "configs" / "shapes_dpo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "logging.tensorboard=false",
        f"epochs={EPOCHS}", f"evaluation.every={EPOCHS}", "evaluation.images_per_prompt=64",
        "evaluation.prompt_files={tune: prompts/shapes_tune.txt}", "evaluation.guard.metric=eval/gold_tune"])
    run_dir = tmp_path / "run"
    train(config, output_dir=str(run_dir))

    before, after = _verdicts(run_dir, 0), _verdicts(run_dir, EPOCHS)
    assert [p for p, _ in before] == [p for p, _ in after] and len(before) == 256  # the same seeds
    # Paired by evaluation seed: the gain and its standard error over the 256 (base, trained) pairs.
    base, mean, se = _paired_gain(before, after)
    assert 0.4 < base < 0.75, base  # the base model gets about 60% of these right (measured 0.58)
    # measured with 32 images per prompt (README): +0.117 ± 0.039 at seed 0, +0.102 and +0.086 at seeds 1, 2
    assert mean > 3 * se and mean > 0.05, (mean, se)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == EPOCHS
    # the run's own metrics agree with the verdicts read back
    assert rows[0]["eval/gold_tune_initial"] == base
    assert abs(rows[-1]["eval/gold_tune"] - (base + mean)) < 1e-9
    # and so does the summary the run ends with (the paired gain and its standard error)
    summary = json.loads((run_dir / "eval_summary.json").read_text())
    assert summary["updates"] == EPOCHS and summary["sets"]["tune"]["n"] == 256
    assert abs(summary["sets"]["tune"]["gain"] - mean) < 1e-9 and abs(summary["sets"]["tune"]["gain_se"] - se) < 1e-9


def test_the_judge_as_reward_teaches_a_combination_the_unet_never_saw(ray_local, tmp_path):
    # "two yellow squares": the UNet never saw a yellow square (a held-out kind), and the base model draws
    # two of them right about one time in ten (the second square comes out orange or red). Online
    # Diffusion-DPO with the judge itself as the reward (the dense `overlap` mode), 20 epochs on that one
    # prompt; evaluated on 192 fixed-seed images of it before and after.
    config = load_config(REPO / "configs" / "shapes_dpo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "logging.tensorboard=false",
        "epochs=20", "evaluation.every=20", "evaluation.images_per_prompt=192",
        "prompts.train=[two yellow squares]", "prompts.train_file=null",
        "rewards={shapes_judge: {weight: 1.0, mode: overlap}}",
        "evaluation.prompt_files={}", "evaluation.prompts={yellow2: [two yellow squares]}",
        "evaluation.guard.metric=eval/gold_yellow2"])
    run_dir = tmp_path / "run"
    train(config, output_dir=str(run_dir))

    before, after = _verdicts(run_dir, 0), _verdicts(run_dir, 20)
    assert len(before) == len(after) == 192
    base, mean, se = _paired_gain(before, after)
    assert base < 0.25, base  # measured 0.104 (and 0.11 on other evaluation seeds)
    # measured: 0.104 -> 0.286, +0.182 ± 0.032 (5.6 paired s.e.); on 64 images of other evaluation seeds after
    # the same training +0.27 ± 0.07, and +0.41 ± 0.07 at training seed 1 (BENCHMARKS)
    assert mean > 3 * se and mean > 0.1, (mean, se)
