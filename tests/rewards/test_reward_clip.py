import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from rewards.clip_encoder import _needs_quick_gelu, preprocess_images
from rewards.clip_score import ClipScore


def independent_scores(options: dict, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Cosines from a separately created open_clip model with the same seed and hand preprocessing."""
    open_clip.add_model_config(options["model_config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        model = open_clip.create_model(options["model"], pretrained=None).eval()
    cfg = model.visual.preprocess_cfg
    x = (images.astype(np.float32) / 255 - np.array(cfg["mean"])) / np.array(cfg["std"])  # 32 px: no resize
    x = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(open_clip.tokenize(prompts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


def test_scores_equal_independent_open_clip(clip_options, images, prompts):
    out = ClipScore(**clip_options)(images, prompts)
    assert out.scores.dtype == np.float32 and out.scores.shape == (4,)
    np.testing.assert_allclose(out.scores, independent_scores(clip_options, images, prompts), atol=1e-5)


def test_embeddings_unit_norm_and_consistent(clip_options, images, prompts):
    out = ClipScore(**clip_options)(images, prompts)
    assert set(out.embeddings) == {"image", "text"}
    for emb in out.embeddings.values():
        assert emb.dtype == np.float32 and emb.shape == (4, 32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        out.scores, (out.embeddings["image"] * out.embeddings["text"]).sum(1), atol=1e-6
    )
    # The repeated prompt (items 0 and 2) gets the same text embedding.
    np.testing.assert_array_equal(out.embeddings["text"][0], out.embeddings["text"][2])


def test_prompt_order_matters(clip_options, images, prompts):
    reward = ClipScore(**clip_options)
    swapped = [prompts[1], prompts[0], *prompts[2:]]
    a, b = reward(images, prompts), reward(images, swapped)
    assert not np.allclose(a.scores[:2], b.scores[:2])
    np.testing.assert_allclose(a.scores[2:], b.scores[2:], atol=1e-6)
    np.testing.assert_array_equal(a.embeddings["image"], b.embeddings["image"])


def test_random_init_is_seeded_and_leaves_global_rng_alone(clip_options, images, prompts):
    state = torch.get_rng_state()
    a = ClipScore(**clip_options)(images, prompts).scores
    assert torch.equal(state, torch.get_rng_state())
    b = ClipScore(**clip_options)(images, prompts).scores
    c = ClipScore(**{**clip_options, "seed": 1})(images, prompts).scores
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_any_image_size(clip_options, prompts):
    rng = np.random.default_rng(3)
    for shape in [(4, 64, 64, 3), (4, 48, 80, 3)]:
        out = ClipScore(**clip_options)(rng.integers(0, 256, size=shape, dtype=np.uint8), prompts)
        assert out.scores.shape == (4,) and np.isfinite(out.scores).all()


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("shape", [(2, 64, 64), (2, 48, 80), (2, 20, 20)])
def test_preprocessing_matches_open_clip_transform(mode, shape):
    # Smooth images (upsampled noise): the reference PIL path rounds to uint8 after resizing.
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(shape[0], shape[1] // 4, shape[2] // 4, 3), dtype=np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(s).resize(shape[:0:-1], Image.BILINEAR)) for s in small])
    cfg = PreprocessCfg(size=(32, 32), resize_mode=mode)
    transform = image_transform_v2(cfg, is_train=False)
    expected = torch.stack([transform(Image.fromarray(im)) for im in imgs])
    ours = preprocess_images(imgs, size=(32, 32), mean=cfg.mean, std=cfg.std, resize_mode=mode)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    diff = (ours - expected).abs() * torch.tensor(cfg.std).view(1, 3, 1, 1)  # in [0, 1] pixel units
    assert diff.max() < 2 / 255 and diff.mean() < 0.5 / 255


def test_model_config_stem_must_match_model(clip_options):
    with pytest.raises(ValueError, match="file stem"):
        ClipScore(**{**clip_options, "model": "other-name"})
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScore(model="no-such-model", pretrained=None)


def test_quick_gelu_follows_pretrained_tag():
    assert _needs_quick_gelu("ViT-L-14", "openai")  # the aesthetic head's CLIP
    assert not _needs_quick_gelu("ViT-H-14", "laion2b_s32b_b79k")
    assert not _needs_quick_gelu("ViT-L-14", None)
