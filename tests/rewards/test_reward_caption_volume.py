"""The k = 3 GARD volume with the caption's CLIP text embedding as the third modality."""

from __future__ import annotations

import numpy as np
import torch

from rewards.base import RewardOutput
from rewards.combine import CAPTION, caption_embedding_source, combine_rewards
from rewards.registry import build_reward
from rewards.volume import gram_volume


def test_caption_modality_gives_the_three_vector_gram_volume(clip_options, images, prompts):
    clip = build_reward("clip_score", **clip_options)
    clip_out = clip(images, prompts)
    captions = ["a cat on a sofa", "a red car", "two cats", "mountains"]
    llava_out = RewardOutput(scores=np.full(4, 0.5, np.float32), captions=captions)
    outputs = {"llava_bertscore": llava_out, "clip_score": clip_out}
    target, got_captions = caption_embedding_source(outputs, embedders={"clip_score"})
    assert target == "clip_score" and got_captions == captions
    outputs["clip_score"].embeddings[CAPTION] = clip.embed_texts(captions)
    combined = combine_rewards(outputs, weights={"llava_bertscore": 1.0, "clip_score": 1.0}, gamma=0.5,
                               volume_modalities=("text", "image", "caption"))
    stacked = torch.from_numpy(np.stack([clip_out.embeddings["text"], clip_out.embeddings["image"],
                                         clip.embed_texts(captions)], axis=1)).double()
    expected_volume = gram_volume(stacked).numpy()
    np.testing.assert_allclose(combined.volume, expected_volume, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(combined.total, 0.5 + clip_out.scores - 0.5 * expected_volume, rtol=1e-4, atol=1e-5)
    # No captioning reward -> no caption source.
    assert caption_embedding_source({"clip_score": clip_out}, embedders={"clip_score"}) is None
