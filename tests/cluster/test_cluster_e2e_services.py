"""A short training run whose reward is llava_bertscore (tiny LLaVA in a real vLLM engine inside a Serve
replica) + clip_score (tiny open_clip) with the GARD volume term over text, image and the caption's
CLIP text embedding (k = 3), end to end on local Ray Serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from cluster.run import train

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_llava_bertscore_and_clip_with_volume_through_reward_services(ray_local, tmp_path, free_port):
    from ray import serve

    rewards = (
        "{llava_bertscore: {weight: 1.0, model: 'tiny:llava', bertscore_model: minilm, max_tokens: 8,"
        " gpu_memory_utilization: 0.15, dtype: float32, enforce_eager: true, serve: {num_cpus: 0.1}},"
        " clip_score: {weight: 0.5, model: 'tiny:clip', serve: {num_cpus: 0.1}}}"
    )
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "epochs=2", "sampling.batches_per_sampler=1",
        "evaluation.images_per_prompt=1", "reward_service.backend=serve", f"reward_service.http_port={free_port}",
        f"rewards={rewards}", "volume.gamma=0.25", "volume.modalities=[text, image, caption]",
    ])
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in ("reward/llava_bertscore", "reward/clip_score", "reward/volume", "time/latency_llava_bertscore_s"):
            assert np.isfinite(row[key]), (key, row)
        # The trained reward is w1 r_llava + w2 r_clip - gamma Vol, so its mean is the same mix of the means.
        expected = row["reward/llava_bertscore"] + 0.5 * row["reward/clip_score"] - 0.25 * row["reward/volume"]
        assert row["reward/mean"] == pytest.approx(expected, abs=1e-4)
        assert 0 < row["reward/volume"] <= 1 and row["reward/retries"] == 0
    captions = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 2 * config.sampling.batch_size and all(c["caption"] for c in captions)
    final = json.loads((run_dir / "samples" / "eval_epoch0002.json").read_text())
    assert len(final) == len(config.evaluation.prompts["all"]) and all(item["caption"] for item in final)
    # gard train removed the reward applications it started.
    assert not [name for name in serve.status().applications if name.startswith("reward-")]
