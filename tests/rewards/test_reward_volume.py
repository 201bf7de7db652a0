import math

import pytest
import torch
import torch.nn.functional as F

from rewards.volume import gram_volume


def test_two_modalities_give_sqrt_one_minus_cos_squared():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    cos = F.cosine_similarity(a, b, dim=-1)
    vol = gram_volume(torch.stack([a, b], dim=1))
    assert vol.shape == (16,)
    torch.testing.assert_close(vol, torch.sqrt(1 - cos**2), atol=1e-5, rtol=1e-5)


def test_orthonormal_triplet_has_volume_one():
    eye = torch.eye(5)[:3]  # 3 orthonormal vectors in R^5
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    rotated = (q @ eye.T).T  # still orthonormal
    vol = gram_volume(torch.stack([eye, rotated]))
    torch.testing.assert_close(vol, torch.ones(2), atol=1e-5, rtol=0)


def test_identical_vectors_give_zero():
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gram_volume(torch.stack([v, v], dim=1)), torch.zeros(3))
    assert torch.equal(gram_volume(torch.stack([v, 2 * v, v], dim=1)), torch.zeros(3))


def test_scale_invariance():
    emb = torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(3))
    scales = torch.tensor([0.01, 3.0, 250.0]).view(1, 3, 1)
    torch.testing.assert_close(gram_volume(emb * scales), gram_volume(emb), atol=1e-5, rtol=1e-5)


def test_hand_computed_three_vectors():
    # e1, (e1 + e2)/sqrt2, (e1 + e3)/sqrt2 -> G = [[1, c, c], [c, 1, 1/2], [c, 1/2, 1]], c = 1/sqrt2;
    # det G = 1 + 2·c·c·(1/2) - c² - c² - 1/4 = 1 + 1/2 - 1/2 - 1/2 - 1/4 = 1/4, so Vol = 1/2.
    v = torch.tensor([[[1.0, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.float64)
    torch.testing.assert_close(gram_volume(v), torch.tensor([0.5], dtype=torch.float64))


def test_k_below_two_and_bad_rank_raise():
    with pytest.raises(ValueError, match=r"k >= 2.*\(4, 1, 8\)"):
        gram_volume(torch.randn(4, 1, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        gram_volume(torch.randn(4, 8))


def test_dtypes_and_gradients():
    emb = torch.randn(3, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert gram_volume(emb.float()).dtype == torch.float32
    assert gram_volume(emb).dtype == torch.float64
    torch.autograd.gradcheck(gram_volume, (emb.requires_grad_(),))
    # Degenerate items give zero gradient, never NaN.
    v = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    degenerate = torch.stack([v, v], dim=1).requires_grad_()
    gram_volume(degenerate).sum().backward()
    assert torch.isfinite(degenerate.grad).all()


def test_volume_in_unit_interval():
    emb = torch.randn(64, 4, 5, generator=torch.Generator().manual_seed(6))
    vol = gram_volume(emb)
    assert (vol >= 0).all() and (vol <= 1 + 1e-6).all()
    assert math.isclose(float(gram_volume(torch.eye(2).unsqueeze(0))), 1.0)
