import numpy as np
import pytest

from rewards.base import RewardOutput
from rewards.combine import combine_rewards

# Hand-made table, B = 3. The text embedding is e1; the image is e1, e2, (0.6, 0.8):
# cos = 1, 0, 0.6, so Vol = sqrt(1 - cos²) = 0, 1, 0.8.
TEXT = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
IMAGE = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)


def table(jpeg=(-1.0, -2.0, -3.0)) -> dict[str, RewardOutput]:
    return {
        "jpeg_compressibility": RewardOutput(scores=np.array(jpeg, dtype=np.float32)),
        "clip_score": RewardOutput(
            scores=np.array([0.5, 0.2, 0.1], dtype=np.float32), embeddings={"text": TEXT, "image": IMAGE}
        ),
    }


WEIGHTS = {"jpeg_compressibility": 0.1, "clip_score": 2.0}


def test_weighted_sum_minus_gamma_volume():
    out = combine_rewards(table(), weights=WEIGHTS, gamma=0.5)
    # 0.1·r_jpeg + 2·r_clip - 0.5·Vol
    np.testing.assert_allclose(out.total, [-0.1 + 1.0 - 0.0, -0.2 + 0.4 - 0.5, -0.3 + 0.2 - 0.4], atol=1e-6)
    np.testing.assert_allclose(out.volume, [0.0, 1.0, 0.8], atol=1e-6)
    assert out.total.dtype == np.float32 and out.volume.dtype == np.float32
    # Components are the raw scores, not weighted.
    np.testing.assert_array_equal(out.components["jpeg_compressibility"], [-1.0, -2.0, -3.0])
    np.testing.assert_array_equal(out.components["clip_score"], np.float32([0.5, 0.2, 0.1]))


def test_volume_logged_without_gamma():
    out = combine_rewards(table(), weights=WEIGHTS)
    np.testing.assert_allclose(out.total, [0.9, 0.2, -0.1], atol=1e-6)
    np.testing.assert_allclose(out.volume, [0.0, 1.0, 0.8], atol=1e-6)


def test_nan_component_makes_item_total_nan():
    out = combine_rewards(table(jpeg=(-1.0, np.nan, -3.0)), weights=WEIGHTS, gamma=0.5)
    assert np.isnan(out.total[1])
    np.testing.assert_allclose(out.total[[0, 2]], [0.9, -0.5], atol=1e-6)
    # Even a zero weight does not hide the failure.
    out = combine_rewards(table(jpeg=(-1.0, np.nan, -3.0)), weights={**WEIGHTS, "jpeg_compressibility": 0.0})
    assert np.isnan(out.total[1]) and np.isfinite(out.total[[0, 2]]).all()


def test_missing_modality():
    outputs = {
        "jpeg_compressibility": RewardOutput(scores=np.zeros(3)),
        "aesthetic": RewardOutput(scores=np.ones(3), embeddings={"image": IMAGE}),
    }
    weights = {"jpeg_compressibility": 1.0, "aesthetic": 1.0}
    out = combine_rewards(outputs, weights=weights)  # gamma = 0: no volume, no error
    assert out.volume is None
    np.testing.assert_array_equal(out.total, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\['text', 'image'\].*'aesthetic': \['image'\]"):
        combine_rewards(outputs, weights=weights, gamma=0.1)


def test_volume_comes_from_first_output_with_all_modalities():
    outputs = {
        "aesthetic": RewardOutput(scores=np.zeros(3), embeddings={"image": TEXT}),
        "clip_score": table()["clip_score"],
        "other": RewardOutput(scores=np.zeros(3), embeddings={"text": TEXT, "image": TEXT}),
    }
    out = combine_rewards(outputs, weights=dict.fromkeys(outputs, 1.0), gamma=1.0)
    np.testing.assert_allclose(out.volume, [0.0, 1.0, 0.8], atol=1e-6)


def test_three_modalities():
    caption = np.array([[0.0, 0.0, 1.0]] * 3, dtype=np.float32)
    pad = np.zeros((3, 1), dtype=np.float32)
    embeddings = {"text": np.hstack([TEXT, pad]), "image": np.hstack([IMAGE, pad]), "caption": caption}
    outputs = {"clip_score": RewardOutput(scores=np.zeros(3), embeddings=embeddings)}
    out = combine_rewards(
        outputs, weights={"clip_score": 1.0}, gamma=1.0, volume_modalities=("text", "image", "caption")
    )
    # The caption is orthogonal to both, so the 3-volume equals the text-image 2-volume.
    np.testing.assert_allclose(out.volume, [0.0, 1.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(out.total, -out.volume, atol=1e-6)


def test_weight_key_mismatch_names_both_sides():
    with pytest.raises(ValueError, match=r"missing weights for \['jpeg_compressibility'\].*\['aesthetic'\]"):
        combine_rewards(table(), weights={"clip_score": 1.0, "aesthetic": 1.0})


def test_other_input_errors():
    with pytest.raises(ValueError, match="gamma"):
        combine_rewards(table(), weights=WEIGHTS, gamma=-1.0)
    outputs = {"a": RewardOutput(scores=np.zeros(3)), "b": RewardOutput(scores=np.zeros(2))}
    with pytest.raises(ValueError, match="batch size"):
        combine_rewards(outputs, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards({}, weights={})
