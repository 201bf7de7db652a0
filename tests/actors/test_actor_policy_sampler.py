"""The Policy and Sampler in-process on the tiny pipeline: trajectories, log-prob recomputation,
weight broadcast (flat buffer, checksum, layout) and diffusers-format LoRA export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.sampler import Sampler
from actors.weights import AdapterMismatchError, ChecksumError, WeightsPacket, pack_adapter
from cluster.specs import default_policy_spec

PROMPTS = ["a cat", "a dog", "a red car"]


@pytest.fixture(scope="module")
def sampler(tiny_sd) -> Sampler:
    return Sampler(spec=default_policy_spec(pretrained=tiny_sd, num_steps=6, resolution=64), worker_index=0)


def _perturb_adapter(sampler: Sampler, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sampler.policy.named_trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_trajectory_shapes_and_determinism(sampler):
    traj, batch = sampler.sample(prompts=PROMPTS, seed=7)
    assert traj.latents.shape == (3, 7, 4, 8, 8) and traj.latents.dtype == np.float32
    assert traj.log_probs.shape == (3, 6) and np.isfinite(traj.log_probs).all()
    np.testing.assert_array_equal(traj.timesteps, sampler.policy.scheduler.timesteps.numpy())
    assert batch.images.shape == (3, 64, 64, 3) and batch.images.dtype == np.uint8
    assert traj.prompts == PROMPTS and traj.policy_version == 0 and traj.seed == 7
    again, _ = sampler.sample(prompts=PROMPTS, seed=7)
    np.testing.assert_array_equal(again.latents, traj.latents)
    other, _ = sampler.sample(prompts=PROMPTS, seed=8)
    assert not np.allclose(other.latents[:, -1], traj.latents[:, -1])


def test_recomputed_log_prob_of_stored_transitions_equals_stored(sampler):
    traj, _ = sampler.sample(prompts=PROMPTS, seed=3)
    policy = sampler.policy
    embeds = policy.encode_prompts(traj.prompts)
    # All (sample, step) pairs in one batched call with per-pair timesteps, as the learner does.
    i, j = np.meshgrid(np.arange(3), np.arange(6), indexing="ij")
    i, j = torch.from_numpy(i.ravel()), torch.from_numpy(j.ravel())
    latents = torch.from_numpy(traj.latents)
    t = torch.from_numpy(traj.timesteps)[j]
    with torch.no_grad():
        out = policy.guided_output(latents[i, j], t, embeds[i])
        mean, std = ddim_mean_std(policy.scheduler, out, t, latents[i, j], eta=1.0)
        log_prob = gaussian_log_prob(latents[i, j + 1], mean, std)
    np.testing.assert_allclose(log_prob.numpy(), traj.log_probs[i, j], rtol=1e-5, atol=1e-4)


def test_flat_buffer_round_trip_and_checksum(tiny_sd, sampler):
    source = Sampler(spec=default_policy_spec(pretrained=tiny_sd, num_steps=6))
    _perturb_adapter(source, seed=1)
    packet = pack_adapter(source.policy.named_trainable_parameters(), version=3)
    assert packet.buffer.dtype == np.float32 and packet.buffer.ndim == 1
    assert packet.buffer.size == sum(p.numel() for _, p in source.policy.named_trainable_parameters())
    ack = sampler.set_weights(packet=packet)
    assert ack["version"] == 3
    for (name, a), (_, b) in zip(source.policy.named_trainable_parameters(),
                                 sampler.policy.named_trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Same adapter, same seed -> same samples; and trajectories carry the version.
    t1, _ = source.sample(prompts=PROMPTS, seed=0)
    t2, _ = sampler.sample(prompts=PROMPTS, seed=0)
    np.testing.assert_array_equal(t1.latents, t2.latents)
    assert t2.policy_version == 3
    # An older version is ignored.
    old = pack_adapter(source.policy.named_trainable_parameters(), version=1)
    assert sampler.set_weights(packet=old)["version"] == 3


def test_corrupted_broadcast_is_refused_and_leaves_weights_untouched(sampler):
    before = [p.clone() for _, p in sampler.policy.named_trainable_parameters()]
    packet = pack_adapter(sampler.policy.named_trainable_parameters(), version=10)
    corrupted = packet.buffer.copy()
    corrupted[5] += 1.0
    bad = WeightsPacket(version=10, buffer=corrupted, layout=packet.layout, checksum=packet.checksum)
    with pytest.raises(ChecksumError, match="checksum"):
        sampler.set_weights(packet=bad)
    for b, (_, p) in zip(before, sampler.policy.named_trainable_parameters(), strict=True):
        torch.testing.assert_close(b, p)
    assert sampler.policy_version < 10


def test_adapter_with_other_rank_is_refused_naming_the_mismatch(tiny_sd, sampler):
    other = Sampler(spec=default_policy_spec(pretrained=tiny_sd, num_steps=6, lora_rank=2))
    packet = pack_adapter(other.policy.named_trainable_parameters(), version=50)
    with pytest.raises(AdapterMismatchError, match="shape differences .*lora_A"):
        sampler.set_weights(packet=packet)


def test_reference_context_disables_the_adapter(sampler):
    policy = sampler.policy
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = policy.encode_prompts(["a cat"])
    t = policy.scheduler.timesteps[0]
    with torch.no_grad():
        _perturb_adapter(sampler, seed=5, scale=0.5)
        adapted = policy.guided_output(latents, t, embeds)
        with policy.reference():
            reference = policy.guided_output(latents, t, embeds)
        policy.unet.disable_adapters()
        base = policy.guided_output(latents, t, embeds)
        policy.unet.enable_adapters()
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(adapted, reference)


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTION_AND_CONV = (*ATTENTION, "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION_AND_CONV], ids=["attention", "attention+conv"])
def test_exported_lora_reproduces_the_policy_in_a_fresh_diffusers_pipeline(tiny_sd, tmp_path, targets):
    from diffusers import StableDiffusionPipeline

    spec = default_policy_spec(pretrained=tiny_sd, num_steps=5, guidance_scale=4.0, lora_rank=4, lora_alpha=8.0,
                      lora_targets=targets)
    trained = Sampler(spec=spec)
    _perturb_adapter(trained, seed=2, scale=0.4)
    trained.policy.save_lora(tmp_path / "lora")
    _, ours = trained.sample(prompts=["a cat", "a dog"], seed=11)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.register_to_config(set_alpha_to_one=False)
    base = pipe(["a cat", "a dog"], num_inference_steps=5, guidance_scale=4.0, eta=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(11), output_type="np").images
    pipe.load_lora_weights(tmp_path / "lora")
    n_lora = sum(1 for name, _ in pipe.unet.named_parameters() if "lora" in name)
    assert n_lora == len(trained.policy.named_trainable_parameters())  # every adapted layer was loaded
    theirs = pipe(["a cat", "a dog"], num_inference_steps=5, guidance_scale=4.0, eta=1.0, height=64, width=64,
                  generator=torch.Generator().manual_seed(11), output_type="np").images
    theirs_u8 = (theirs * 255).round().astype(np.uint8)
    assert np.abs(theirs_u8.astype(int) - ours.images.astype(int)).max() <= 1
    assert np.abs((base * 255).round() - ours.images).mean() > 5  # the adapter really changed the images
