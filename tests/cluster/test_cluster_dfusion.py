"""End to end on a real local Ray: online DPO on D-Fusion pairs (ICML 2025; configs/dfusion_demo.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.config import ConfigError, load_config
from cluster.run import train

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / "dfusion_demo.yaml", [f"cache_dir={tmp_path / 'cache'}",
                                                                "logging.progress=false", *overrides])


def test_online_dpo_run_on_dfusion_pairs(ray_local, tmp_path):
    # One sampler, 8 samples of 4 prompts per epoch: each prompt with two distinct rewards gives a pair.
    config = _config(tmp_path, "epochs=2", "cluster.num_samplers=1", "sampling.num_steps=6",
                     "evaluation.images_per_prompt=1")
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 1 <= row["dfusion/n_pairs"] <= len(config.prompts.train)  # at most one pair per prompt
        assert row["dpo/n_pairs"] == row["dfusion/n_pairs"]  # DPO trained exactly the fused pairs
        assert row["train/n_pairs"] == 2 * row["dpo/n_pairs"] * 6 * config.train.inner_epochs  # both rows x all steps
        assert 0 < row["dfusion/mask_fraction"] <= 1
        assert np.isfinite(row["dfusion/reward_mean"]) and np.isfinite(row["dfusion/reward_gain"])
        assert row["dfusion/good_reward_mean"] > row["dfusion/poor_reward_mean"]
        assert 0 <= row["dpo/acc"] <= 1 and np.isfinite(row["dpo/margin"])
    # The first step sees policy == reference (loss log 2, margin 0); the following steps on the same
    # pairs lower the loss and make the margins positive.
    assert rows[0]["dpo/loss"] < np.log(2) - 1e-3, rows[0]["dpo/loss"]
    assert rows[0]["dpo/acc"] > 0 and rows[0]["dpo/margin"] > 0
    assert [r["train/policy_version"] for r in rows] == [1, 2]
    # The training clip_score also gives the evaluation's Recall@1 (one image per prompt: no diversity).
    assert config.evaluation.recall == "clip_score" and 0 <= rows[-1]["eval/recall_at_1/all"] <= 1
    assert 0 <= rows[0]["eval/recall_at_1/all_initial"] <= 1 and "eval/diversity/all" not in rows[-1]
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_dfusion_pair_source_needs_dpo(tmp_path):
    with pytest.raises(ConfigError, match="train.algorithm"):
        _config(tmp_path, "train.algorithm=ppo")
    with pytest.raises(ConfigError, match=r"one of \['best_worst', 'dfusion'\]"):
        _config(tmp_path, "dpo.pair_source=fused")
