"""The DDIM log-prob step against diffusers' DDIMScheduler.step and the Gaussian closed form."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from actors.ddim import ddim_mean_std, ddim_step_with_logprob


def _scheduler(prediction_type: str, steps: int = 10, **kwargs) -> DDIMScheduler:
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        steps_offset=1, clip_sample=False, prediction_type=prediction_type, **kwargs,
    )
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sample_equals_diffusers_step_given_the_same_noise(prediction_type, eta):
    sched = _scheduler(prediction_type)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=gen)
    output = torch.randn(3, 4, 8, 8, generator=gen)
    for t in sched.timesteps:  # every step, including the last one (t' < 0)
        ours, _ = ddim_step_with_logprob(sched, output, t, sample, eta=eta,
                                         generator=torch.Generator().manual_seed(int(t)))
        ref = sched.step(output, t, sample, eta=eta, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_clip_sample_matches_diffusers():
    sched = _scheduler("epsilon", clip_sample_range=1.0)
    sched.register_to_config(clip_sample=True)
    gen = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 4, 8, 8, generator=gen) * 3, torch.randn(2, 4, 8, 8, generator=gen)
    t = sched.timesteps[3]
    ours, _ = ddim_step_with_logprob(sched, output, t, sample, generator=torch.Generator().manual_seed(5))
    ref = sched.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_equals_the_gaussian_closed_form(prediction_type):
    sched = _scheduler(prediction_type)
    gen = torch.Generator().manual_seed(2)
    sample, output = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = int(sched.timesteps[4])
    prev, log_prob = ddim_step_with_logprob(sched, output, t, sample, generator=gen)
    assert log_prob.shape == (4,)

    # Independent reference: the DDIM paper's formulas written out with python floats.
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = float(sched.alphas_cumprod[t])
    a_prev = float(sched.alphas_cumprod[t - step])
    if prediction_type == "epsilon":
        eps = output
    else:
        eps = math.sqrt(a_t) * output + math.sqrt(1 - a_t) * sample
    x0 = (sample - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    expected = torch.distributions.Normal(mean, sigma).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_last_step_uses_alphas_cumprod_0_so_sigma_is_positive():
    sched = _scheduler("epsilon")
    last = int(sched.timesteps[-1])
    _, std = ddim_mean_std(sched, torch.zeros(1, 4, 2, 2), last, torch.zeros(1, 4, 2, 2))
    a_t, a_prev = float(sched.alphas_cumprod[last]), float(sched.alphas_cumprod[0])
    assert float(std) == pytest.approx(math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), rel=1e-5)
    assert float(std) > 0


def test_given_prev_sample_is_returned_unchanged_with_its_log_prob():
    sched = _scheduler("epsilon")
    gen = torch.Generator().manual_seed(3)
    sample, output = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = sched.timesteps[2]
    prev, log_prob = ddim_step_with_logprob(sched, output, t, sample, generator=gen)
    again, log_prob_again = ddim_step_with_logprob(sched, output, t, sample, prev_sample=prev)
    assert again is prev
    torch.testing.assert_close(log_prob_again, log_prob)
    # A different model output gives a different (lower, here) likelihood of the same transition.
    _, other = ddim_step_with_logprob(sched, output + 0.5, t, sample, prev_sample=prev)
    assert (other < log_prob).all()


def test_per_sample_timesteps_equal_scalar_steps():
    sched = _scheduler("v_prediction")
    gen = torch.Generator().manual_seed(4)
    sample, output, prev = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    ts = torch.stack([sched.timesteps[0], sched.timesteps[5], sched.timesteps[-1]])
    _, batched = ddim_step_with_logprob(sched, output, ts, sample, prev_sample=prev)
    for i, t in enumerate(ts):
        _, single = ddim_step_with_logprob(sched, output[i : i + 1], int(t), sample[i : i + 1], prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)


def test_eta_zero_is_rejected():
    sched = _scheduler("epsilon")
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(sched, torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.zeros(1, 4, 2, 2), eta=0.0)


# Schedules whose timesteps contain t = 0 have σ_t = 0 at the last step (NaN log-prob): refused.
SPACINGS = [("leading", 1, True), ("leading", 0, False), ("trailing", 0, True), ("trailing", 1, True),
            ("linspace", 0, False), ("linspace", 1, False)]


@pytest.mark.parametrize("spacing,offset,accepted", SPACINGS)
@pytest.mark.parametrize("steps", [10, 50])
def test_every_spacing_matches_diffusers_with_finite_log_probs_or_is_refused(spacing, offset, accepted, steps):
    from actors.ddim import check_ddim_schedule

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                          steps_offset=offset, clip_sample=False, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert accepted == bool((sched.timesteps > 0).all())  # the hand-derived rule: t = 0 in the schedule
    if not accepted:
        with pytest.raises(ValueError, match=rf"sigma_t = 0 at step {steps - 1} \(t = 0.*timestep_spacing="
                                             rf"'{spacing}', steps_offset={offset}.*sampling.timestep_spacing=trailing"):
            check_ddim_schedule(sched, eta=1.0)
        return
    check_ddim_schedule(sched, eta=1.0)
    gen = torch.Generator().manual_seed(3)
    sample, output = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for t in sched.timesteps:
        ours, log_prob = ddim_step_with_logprob(sched, output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        ref = sched.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(log_prob).all(), (spacing, offset, int(t))


def test_a_refused_schedule_is_a_config_error_before_ray_starts(tiny_sd, tmp_path):
    from actors.policy import Policy
    from cluster.config import ConfigError, load_config
    from cluster.preflight import check_scheduler
    from cluster.specs import default_policy_spec

    config = load_config(None, ["prompts.train=[a cat]", "sampling.timestep_spacing=linspace",
                                f"policy.pretrained={tiny_sd}"])
    with pytest.raises(ConfigError, match=r"policy.pretrained = .* sampling.num_steps = 20: .*'linspace'"):
        check_scheduler(config, pretrained=tiny_sd)
    config.sampling.timestep_spacing = "trailing"
    check_scheduler(config, pretrained=tiny_sd)
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        Policy(default_policy_spec(pretrained=tiny_sd, num_steps=4, timestep_spacing="linspace"))
    trailing = Policy(default_policy_spec(pretrained=tiny_sd, num_steps=4, timestep_spacing="trailing"))
    assert trailing.scheduler.config.timestep_spacing == "trailing"
    assert trailing.scheduler.timesteps.tolist() == [999, 749, 499, 249]
