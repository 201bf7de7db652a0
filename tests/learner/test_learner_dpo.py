"""Diffusion-DPO losses: hand-derived values, the sign of the gradient, stability, Wallace et al.'s
pseudo-code, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from learner.dpo import diffusion_dpo_loss, per_sample_mse, trajectory_dpo_loss


def _softplus(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x})."""
    return math.log1p(math.exp(-x))


def test_trajectory_dpo_equal_inputs_give_log_2():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    loss, stats = trajectory_dpo_loss(x, x, x, x, beta=3.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["implicit_acc"].item() == 0.0 and stats["reward_margin"].item() == 0.0


def test_trajectory_dpo_hand_derived_value():
    # Pair 0: winner gains Σ_t (0.5 + 1.5) = 2 over the reference, loser 0 -> h = β·2 = 1.
    # Pair 1: winner gains 0, loser gains Σ_t (1 + 1 + 2) = 4 -> h = β·(0 - 4) = -2.  (β = 0.5)
    logp_w = torch.tensor([[0.5, 1.5, 0.0], [1.0, 1.0, 1.0]])
    ref_w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp_l = torch.tensor([[-1.0, 2.0, 0.0], [2.0, 1.0, 3.0]])
    ref_l = torch.tensor([[-1.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    loss, stats = trajectory_dpo_loss(logp_w, ref_w, logp_l, ref_l, beta=0.5)
    assert loss.item() == pytest.approx((_softplus(1.0) + _softplus(-2.0)) / 2, rel=1e-6)
    assert stats["implicit_acc"].item() == 0.5
    assert stats["reward_margin"].item() == pytest.approx(-0.5)
    # Already-summed [P] inputs give the same loss.
    summed, _ = trajectory_dpo_loss(logp_w.sum(1), ref_w.sum(1), logp_l.sum(1), ref_l.sum(1), beta=0.5)
    assert summed.item() == pytest.approx(loss.item())


def test_raising_the_preferred_log_prob_lowers_the_loss():
    gen = torch.Generator().manual_seed(1)
    logp_w = torch.randn(3, 4, generator=gen).requires_grad_(True)
    logp_l = torch.randn(3, 4, generator=gen).requires_grad_(True)
    ref_w, ref_l = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    beta = 0.7
    loss, _ = trajectory_dpo_loss(logp_w, ref_w, logp_l, ref_l, beta=beta)
    loss.backward()
    assert (logp_w.grad < 0).all() and (logp_l.grad > 0).all()
    # dL/dlogp_w[p, t] = -β σ(-h_p) / P, the same for every t of a pair.
    h = beta * ((logp_w - ref_w) - (logp_l - ref_l)).sum(1).detach()
    expected = (-beta * torch.sigmoid(-h) / 3).unsqueeze(1).expand(3, 4)
    torch.testing.assert_close(logp_w.grad, expected)
    torch.testing.assert_close(logp_l.grad, -expected)
    # A step along -grad lowers the loss.
    with torch.no_grad():
        stepped, _ = trajectory_dpo_loss(logp_w - 0.1 * logp_w.grad, ref_w, logp_l, ref_l, beta=beta)
    assert stepped.item() < loss.item()


def test_losses_stay_finite_for_huge_margins():
    big = torch.tensor([[1e4]])
    zero = torch.zeros(1, 1)
    loss, _ = trajectory_dpo_loss(big, zero, zero, zero, beta=1.0)
    assert loss.item() == 0.0
    loss, _ = trajectory_dpo_loss(zero, zero, big, zero, beta=1.0)
    assert loss.item() == pytest.approx(1e4)
    loss, _ = diffusion_dpo_loss(
        torch.tensor([1e5]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0
    )
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(1e5)


def test_diffusion_dpo_hand_derived_value_and_stats():
    # w_diff = 1 - 2 = -1, l_diff = 3 - 1 = 2, inside = -β(-1 - 2) = 3β.
    one = lambda v: torch.tensor([v])  # noqa: E731
    loss, stats = diffusion_dpo_loss(one(1.0), one(3.0), one(2.0), one(1.0), beta=1.0)
    assert loss.item() == pytest.approx(_softplus(3.0), rel=1e-6)
    assert stats["implicit_acc"].item() == 1.0 and stats["reward_margin"].item() == pytest.approx(3.0)
    loss, stats = diffusion_dpo_loss(one(1.0), one(3.0), one(2.0), one(1.0), beta=0.25)
    assert loss.item() == pytest.approx(_softplus(0.75), rel=1e-6)
    e = torch.rand(5)
    loss, stats = diffusion_dpo_loss(e, e, e, e, beta=5.0)
    assert loss.item() == pytest.approx(math.log(2)) and stats["implicit_acc"].item() == 0.0


def test_diffusion_dpo_lowering_the_winner_error_lowers_the_loss():
    gen = torch.Generator().manual_seed(2)
    model_w = torch.rand(4, generator=gen).requires_grad_(True)
    model_l = torch.rand(4, generator=gen).requires_grad_(True)
    loss, _ = diffusion_dpo_loss(
        model_w, model_l, torch.rand(4, generator=gen), torch.rand(4, generator=gen), beta=2.0
    )
    loss.backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()


def test_diffusion_dpo_matches_seed_003_pseudo_code():
    """Wallace et al.'s snippet, line for line (errors as .norm().pow(2)), for a batch of pairs."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    preds = {k: noise + 0.3 * torch.randn(3, 4, 8, 8, generator=gen) for k in ("mw", "ml", "rw", "rl")}
    beta = 0.01
    expected = []
    for i in range(3):
        model_w_err = (preds["mw"][i] - noise[i]).norm().pow(2)
        model_l_err = (preds["ml"][i] - noise[i]).norm().pow(2)
        ref_w_err = (preds["rw"][i] - noise[i]).norm().pow(2)
        ref_l_err = (preds["rl"][i] - noise[i]).norm().pow(2)
        w_diff = model_w_err - ref_w_err
        l_diff = model_l_err - ref_l_err
        inside_term = -1 * beta * (w_diff - l_diff)
        expected.append(-1 * torch.log(torch.sigmoid(inside_term)))
    sums = {k: (v - noise).pow(2).sum(dim=(1, 2, 3)) for k, v in preds.items()}
    loss, _ = diffusion_dpo_loss(sums["mw"], sums["ml"], sums["rw"], sums["rl"], beta=beta)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    # With per-sample mean errors, the authors' script (inside = -½ β_s (...)) is beta = β_s / 2.
    mse = {k: per_sample_mse(v, noise) for k, v in preds.items()}
    torch.testing.assert_close(mse["mw"], sums["mw"] / (4 * 8 * 8))
    beta_script = 5000.0
    script_inside = -0.5 * beta_script * ((mse["mw"] - mse["rw"]) - (mse["ml"] - mse["rl"]))
    ours, _ = diffusion_dpo_loss(mse["mw"], mse["ml"], mse["rw"], mse["rl"], beta=beta_script / 2)
    torch.testing.assert_close(ours, -torch.nn.functional.logsigmoid(script_inside).mean())


@pytest.mark.parametrize("fn", [diffusion_dpo_loss, trajectory_dpo_loss])
def test_invalid_inputs_are_refused(fn):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"beta=0 is invalid.*> 0"):
        fn(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match="must share one shape"):
        fn(x, x, torch.zeros(2), x, beta=1.0)
    cube = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match="got shape"):
        fn(cube, cube, cube, cube, beta=1.0)


def test_the_denoising_target_is_eps_or_the_velocity_by_prediction_type():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from learner.dpo import denoising_target

    x0, eps, t = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0), torch.tensor([0, 999])
    eps_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    assert torch.equal(denoising_target(eps_scheduler, x0, eps, t), eps)
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    abar = v_scheduler.alphas_cumprod[t].reshape(2, 1, 1, 1)
    expected = abar.sqrt() * -1.0 - (1 - abar).sqrt() * 2.0  # v = √ᾱ ε − √(1 − ᾱ) x0
    assert torch.allclose(denoising_target(v_scheduler, x0, eps, t), expected)
    with pytest.raises(ValueError, match="prediction_type='sample'.*'epsilon' or 'v_prediction'"):
        denoising_target(SimpleNamespace(config=SimpleNamespace(prediction_type="sample")), x0, eps, t)
