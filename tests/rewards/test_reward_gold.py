"""The reward stage's gold scoring, in-process (the class the driver makes a Ray actor): scores equal the
rewards' own, Recall@1 retrieves from the candidates, and nothing is built before the first evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from actors.trajectory import ImageBatch
from rewards.clip_score import ClipScore
from rewards.gold import recall_hits
from rewards.jpeg import JpegIncompressibility
from rewards.stage import RewardStage


def test_the_stage_scores_gold_rewards_and_recall_built_on_first_use(clip_options, images, prompts):
    stage = RewardStage(specs={"jpeg_compressibility": {}}, weights={"jpeg_compressibility": 1.0},
                        volume_modalities=("text", "image"), eval_specs={"jpeg_incompressibility": {"quality": 90}},
                        recall=("clip_score", clip_options))
    assert stage._gold is None  # runs without evaluation pay nothing until an evaluation comes
    candidates = list(dict.fromkeys(prompts)) + ["a blue boat"]
    batch = ImageBatch(images=images, prompts=prompts, policy_version=0, sample_s=0.0)
    out = stage.evaluate(batch=batch, candidates=candidates)
    assert set(out) == {"scores", "checks", "recall_hit"} and set(out["scores"]) == {"jpeg_incompressibility"}
    assert out["checks"] == {}  # JPEG size has no parts to report
    np.testing.assert_array_equal(out["scores"]["jpeg_incompressibility"],
                                  JpegIncompressibility(quality=90)(images, prompts).scores)
    assert out["scores"]["jpeg_incompressibility"].dtype == np.float32
    clip = ClipScore(**clip_options)
    image_emb = clip(images, prompts).embeddings["image"]
    targets = np.array([candidates.index(p) for p in prompts])
    expected = recall_hits(image_emb, clip.embed_texts(candidates), targets)
    assert out["recall_hit"].dtype == bool and out["recall_hit"].tolist() == expected.tolist()
    # The training scoring is untouched by the gold rewards.
    assert set(stage.score(batch=batch, gamma=0.0).components) == {"jpeg_compressibility"}


def test_recall_is_none_without_a_recall_reward_and_candidates_must_hold_the_prompts(clip_options, images, prompts):
    stage = RewardStage(specs={"jpeg_compressibility": {}}, weights={"jpeg_compressibility": 1.0},
                        volume_modalities=("text", "image"), eval_specs={"clip_score": clip_options},
                        recall=("clip_score", clip_options))
    batch = ImageBatch(images=images, prompts=prompts, policy_version=0, sample_s=0.0)
    with pytest.raises(ValueError, match=r"recall candidates must hold every prompt of the batch; missing "
                                         r"\['mountains at sunset'\]"):
        stage.evaluate(batch=batch, candidates=prompts[:2])
    # clip_score is both a gold reward and the recall reward: one model, its scores are the rewards' own.
    out = stage.evaluate(batch=batch, candidates=list(dict.fromkeys(prompts)))
    np.testing.assert_allclose(out["scores"]["clip_score"], ClipScore(**clip_options)(images, prompts).scores, atol=1e-6)
    plain = RewardStage(specs={"jpeg_compressibility": {}}, weights={"jpeg_compressibility": 1.0},
                        volume_modalities=("text", "image"), eval_specs={"jpeg_incompressibility": {}})
    assert plain.evaluate(batch=batch, candidates=[])["recall_hit"] is None
