import numpy as np
import pytest
import torch

from rewards.aesthetic import Aesthetic, AestheticMLP
from rewards.clip_score import ClipScore

LINEAR_SIZES = [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]
CONSTANTS = [(0.01, 0.1), (0.002, -0.05), (0.01, 0.2), (-0.03, 0.0), (0.5, 1.0)]  # (weight, bias)


def constant_head(dim: int = 32) -> AestheticMLP:
    head = AestheticMLP(dim).eval()
    linears = [m for m in head.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (w, b) in zip(linears, CONSTANTS, strict=True):
            linear.weight.fill_(w)
            linear.bias.fill_(b)
    return head


def constant_head_by_hand(x: np.ndarray) -> np.ndarray:
    """All units of a layer are equal: h_next = w · fan_in · h + b, starting from w0 · Σx + b0."""
    h = CONSTANTS[0][0] * x.sum(axis=-1) + CONSTANTS[0][1]
    for (w, b), fan_in in zip(CONSTANTS[1:], [1024, 128, 64, 16], strict=True):
        h = w * fan_in * h + b
    return h


def test_parameter_names_match_laion_checkpoint():
    names = [(n, tuple(p.shape)) for n, p in AestheticMLP(32).named_parameters()]
    expected = []
    for idx, (out_dim, in_dim) in zip([0, 2, 4, 6, 7], LINEAR_SIZES, strict=True):
        expected += [(f"layers.{idx}.weight", (out_dim, in_dim)), (f"layers.{idx}.bias", (out_dim,))]
    assert names == expected
    assert AestheticMLP().layers[0].in_features == 768


def test_constant_weights_by_hand():
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    x = np.vstack([x / np.linalg.norm(x), np.full((1, 32), 32**-0.5, dtype=np.float32)])
    with torch.no_grad():
        out = constant_head()(torch.from_numpy(x)).squeeze(-1).numpy()
    # Second row: Σx = sqrt(32); h0 = 0.01·5.657 + 0.1 = 0.15657, h1 = 2.048·h0 - 0.05, ...
    np.testing.assert_allclose(out, constant_head_by_hand(x), rtol=1e-5)


def test_reward_uses_head_file_on_unit_norm_image_embedding(tmp_path, aesthetic_options, images, prompts):
    path = tmp_path / "head.pth"
    torch.save(constant_head().state_dict(), path)
    out = Aesthetic(**aesthetic_options, head_path=str(path))(images, prompts)
    emb = out.embeddings["image"]
    assert set(out.embeddings) == {"image"} and emb.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.scores, constant_head_by_hand(emb.astype(np.float64)), rtol=1e-4)
    # Same CLIP + seed as clip_score: the shared encoder gives the same image embedding.
    clip = ClipScore(
        model=aesthetic_options["clip_model"], pretrained=None, model_config=aesthetic_options["model_config"]
    )
    np.testing.assert_allclose(emb, clip(images, prompts).embeddings["image"], atol=1e-6)


def test_head_path_reproduces_a_saved_head(tmp_path, aesthetic_options, images, prompts):
    original = Aesthetic(**{**aesthetic_options, "seed": 3})
    path = tmp_path / "head.pth"
    torch.save(original.head.state_dict(), path)
    loaded = Aesthetic(**aesthetic_options, head_path=str(path))  # seed 0 CLIP, seed 3 head
    reference = Aesthetic(**aesthetic_options)  # seed 0 CLIP, seed 0 head
    with torch.no_grad():
        expected = original.head(torch.from_numpy(reference(images, prompts).embeddings["image"]))
    np.testing.assert_allclose(loaded(images, prompts).scores, expected.squeeze(-1).numpy(), atol=1e-6)
    assert not np.allclose(loaded(images, prompts).scores, reference(images, prompts).scores)


def test_random_head_is_seeded(aesthetic_options, images, prompts):
    a = Aesthetic(**aesthetic_options)(images, prompts).scores
    np.testing.assert_array_equal(a, Aesthetic(**aesthetic_options)(images, prompts).scores)


def test_head_dim_mismatch_names_both_dims_and_file(tmp_path, aesthetic_options):
    path = tmp_path / "l14_head.pth"
    torch.save(AestheticMLP(768).state_dict(), path)
    with pytest.raises(ValueError, match=r"l14_head\.pth.*768-d.*32 dims"):
        Aesthetic(**aesthetic_options, head_path=str(path))


def test_head_file_without_mlp_keys(tmp_path, aesthetic_options):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"other\.pth.*layers\.0\.weight"):
        Aesthetic(**aesthetic_options, head_path=str(path))
