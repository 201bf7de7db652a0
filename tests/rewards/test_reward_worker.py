import numpy as np
import pytest

from rewards import RewardWorker, build_reward, combine_rewards


def test_worker_equals_combine_of_parts(clip_options, images, prompts):
    specs = {"jpeg_compressibility": {}, "clip_score": clip_options}
    weights = {"jpeg_compressibility": 0.5, "clip_score": 3.0}
    worker = RewardWorker(specs=specs, weights=weights)
    scored = worker.score(images=images, prompts=prompts, gamma=0.7)

    parts = {name: build_reward(name, **options)(images, prompts) for name, options in specs.items()}
    expected = combine_rewards(parts, weights=weights, gamma=0.7)
    np.testing.assert_allclose(scored.total, expected.total, atol=1e-6)
    np.testing.assert_allclose(scored.volume, expected.volume, atol=1e-6)
    assert scored.components.keys() == expected.components.keys()
    for name in specs:
        np.testing.assert_allclose(scored.components[name], expected.components[name], atol=1e-6)
    # By hand: Σ w r - γ · sqrt(1 - cos²), cos being the clip score itself.
    clip = parts["clip_score"].scores
    by_hand = 0.5 * parts["jpeg_compressibility"].scores + 3.0 * clip - 0.7 * np.sqrt(1 - clip**2)
    np.testing.assert_allclose(scored.total, by_hand, atol=1e-5)
    assert scored.total.dtype == np.float32
    assert set(scored.latency_s) == set(specs) and all(t >= 0 for t in scored.latency_s.values())
    assert scored.captions is None and scored.errors == {}


def test_worker_validates_specs_and_inputs(images, prompts):
    with pytest.raises(ValueError, match="same rewards"):
        RewardWorker(specs={"jpeg_compressibility": {}}, weights={"clip_score": 1.0})
    with pytest.raises(ValueError, match="unknown option"):
        RewardWorker(specs={"jpeg_compressibility": {"q": 1}}, weights={"jpeg_compressibility": 1.0})
    worker = RewardWorker(specs={"jpeg_compressibility": {}}, weights={"jpeg_compressibility": 1.0})
    with pytest.raises(ValueError, match="prompts"):
        worker.score(images=images, prompts=prompts[:2])
    with pytest.raises(ValueError, match="needs the embeddings"):
        worker.score(images=images, prompts=prompts, gamma=1.0)
    assert worker.score(images=images, prompts=prompts).volume is None
