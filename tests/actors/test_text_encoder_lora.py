"""TexForce (Chen et al., ECCV 2024): a LoRA on the CLIP text encoder, trained through the policy's log-probs,
broadcast to samplers like the UNet's, exported and re-imported in diffusers format."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.policy import PolicySpec
from actors.sampler import Sampler
from cluster.specs import default_learner_spec, default_policy_spec
from learner.learner import Learner
from learner.spec import LearnerSpec

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]
TEXT = ("text_encoder",)
BOTH = ("unet", "text_encoder")


def _spec(tiny_sd, targets, **kw) -> PolicySpec:
    return default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64, guidance_scale=3.0, train_targets=targets,
                      text_encoder_lora_rank=4, text_encoder_lora_alpha=8.0, **kw)


def _learner_spec(**kw) -> LearnerSpec:
    base = default_learner_spec(algorithm="pg", learning_rate=5e-2, updates_per_epoch=1, micro_batch_size=8,
                       stat_min_count=1, stat_buffer_size=8, max_grad_norm=10.0)
    return dataclasses.replace(base, **kw)


def _perturb(policy, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in policy.named_trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_text_encoder_adapter_layout_and_reference(tiny_sd):
    sampler = Sampler(spec=_spec(tiny_sd, TEXT))
    policy = sampler.policy
    names = [n for n, _ in policy.named_trainable_parameters()]
    assert names and all(n.startswith("text_encoder.") for n in names)
    # q, k, v and out projections of every layer carry A and B.
    layers = policy.text_encoder.config.num_hidden_layers
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert sum(f".{proj}.lora_" in n for n in names) == 2 * layers
    assert not any(p.requires_grad for n, p in policy.unet.named_parameters())
    with torch.no_grad():
        base = policy.encode_prompts(["a cat"])
        _perturb(policy, seed=0)
        adapted = policy.encode_prompts(["a cat"])
        with policy.reference():
            reference = policy.encode_prompts(["a cat"])
    torch.testing.assert_close(reference, base)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the prompt embeddings


def test_text_encoder_lora_gets_gradients_through_log_probs_and_changes_embeddings(tiny_sd):
    spec = _spec(tiny_sd, TEXT, negative_prompt="blurry")
    traj, _ = Sampler(spec=spec).sample(prompts=PROMPTS, seed=0)
    learner = Learner(policy_spec=spec, spec=_learner_spec())
    policy = learner.policy
    with torch.no_grad():
        before = policy.encode_prompts(["a cat", "blurry"]).clone()

    # The gradient of one transition's log-prob w.r.t. the text encoder's LoRA: B starts at 0, so
    # ∂/∂B = (∂/∂W) Aᵀ is nonzero while ∂/∂A = Bᵀ(∂/∂W) is exactly zero.
    from learner.transitions import TransitionBatch, transition_log_prob

    data = TransitionBatch.from_trajectory(policy, traj)
    log_prob = transition_log_prob(policy, data, torch.tensor([0, 2]), torch.tensor([1, 1]))[0]
    log_prob.sum().backward()
    grads = {n: p.grad for n, p in policy.named_trainable_parameters()}
    b_norm = sum(float(g.norm()) for n, g in grads.items() if "lora_B" in n and g is not None)
    a_norm = sum(float(g.norm()) for n, g in grads.items() if "lora_A" in n and g is not None)
    assert b_norm > 0 and a_norm == 0.0
    learner.optimizer.zero_grad(set_to_none=True)

    stats = learner.update(trajectories=[traj], rewards=[np.array([1.0, -1.0, 0.5, -0.5], np.float32)], epoch=0)
    assert stats["train/n_pairs"] > 0 and stats["train/policy_version"] == 1
    with torch.no_grad():
        after = policy.encode_prompts(["a cat", "blurry"])
    assert (after - before).abs().amax(dim=(1, 2)).min() > 0  # prompt and negative prompt both moved


def test_negative_prompt_embeddings_are_trained_too(tiny_sd):
    """With CFG the unconditional branch uses the negative prompt through the same adapted encoder."""
    spec = _spec(tiny_sd, TEXT, negative_prompt="blurry")
    learner = Learner(policy_spec=spec, spec=_learner_spec())
    policy = learner.policy
    negative = policy.negative_embeds(2)
    negative.sum().backward()
    assert sum(float(p.grad.norm()) for n, p in policy.named_trainable_parameters()
               if "lora_B" in n and p.grad is not None) > 0


@pytest.mark.parametrize("targets", [TEXT, BOTH], ids=["text_encoder", "unet+text_encoder"])
def test_short_run_export_reproduces_the_policy_in_a_fresh_diffusers_pipeline(tiny_sd, tmp_path, targets):
    from diffusers import StableDiffusionPipeline

    from rewards.jpeg import jpeg_size_kb

    spec = _spec(tiny_sd, targets, lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
    sampler = Sampler(spec=spec)
    learner = Learner(policy_spec=spec, spec=_learner_spec(learning_rate=0.2))
    for epoch in range(3):  # a short online run: sample, reward, update, broadcast
        traj, images = sampler.sample(prompts=PROMPTS, seed=epoch)
        learner.update(trajectories=[traj], rewards=[-jpeg_size_kb(images.images)], epoch=epoch)
        assert sampler.set_weights(packet=learner.publish())["version"] == epoch + 1
    for (name, p), (name2, q) in zip(sampler.policy.named_trainable_parameters(),
                                     learner.policy.named_trainable_parameters(), strict=True):
        assert name == name2 and torch.equal(p, q)  # the broadcast carried every adapter, text encoder too
    files = learner.export_lora()
    (tmp_path / "lora").mkdir()
    for fname, data in files.items():
        (tmp_path / "lora" / fname).write_bytes(data)
    _, ours = sampler.sample(prompts=["a cat", "a dog"], seed=11)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.register_to_config(set_alpha_to_one=False)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, eta=1.0, height=64, width=64, output_type="np")
    base = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(11), **kwargs).images
    pipe.load_lora_weights(tmp_path / "lora")
    n_text = sum(1 for n, _ in pipe.text_encoder.named_parameters() if "lora" in n)
    n_unet = sum(1 for n, _ in pipe.unet.named_parameters() if "lora" in n)
    ours_names = [n for n, _ in learner.policy.named_trainable_parameters()]
    assert n_text == sum(n.startswith("text_encoder.") for n in ours_names) > 0
    assert n_unet == sum(n.startswith("unet.") for n in ours_names)
    theirs = (pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(11), **kwargs).images * 255).round()
    assert np.abs(theirs.astype(int) - ours.images.astype(int)).max() <= 1
    assert np.abs((base * 255).round() - ours.images).mean() > 1  # training really changed the images


def test_run_starts_from_an_existing_adapter(tiny_sd, tmp_path):
    first = Learner(policy_spec=_spec(tiny_sd, BOTH), spec=_learner_spec())
    _perturb(first.policy, seed=3)
    first.save_lora(directory=str(tmp_path / "prev"))
    resumed = Learner(policy_spec=_spec(tiny_sd, BOTH), spec=_learner_spec(), init_adapter=str(tmp_path / "prev"))
    for (n1, p1), (n2, p2) in zip(first.policy.named_trainable_parameters(),
                                  resumed.policy.named_trainable_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    # A sampler that receives the first broadcast samples exactly what the starting adapter gives.
    sampler = Sampler(spec=_spec(tiny_sd, BOTH))
    sampler.set_weights(packet=resumed.publish())
    ref = Sampler(spec=_spec(tiny_sd, BOTH))
    ref.policy.load_lora(tmp_path / "prev")
    a, _ = sampler.sample(prompts=["a cat"], seed=5)
    b, _ = ref.sample(prompts=["a cat"], seed=5)
    np.testing.assert_array_equal(a.latents, b.latents)


def test_mismatched_init_adapter_is_refused_with_the_reason(tiny_sd, tmp_path):
    Learner(policy_spec=_spec(tiny_sd, TEXT), spec=_learner_spec()).save_lora(directory=str(tmp_path / "text"))
    with pytest.raises(ValueError, match=r"missing keys \['unet\."):
        Learner(policy_spec=_spec(tiny_sd, BOTH), spec=_learner_spec(), init_adapter=str(tmp_path / "text"))
    with pytest.raises(ValueError, match=r"has shape .*different lora rank"):
        Learner(policy_spec=dataclasses.replace(_spec(tiny_sd, TEXT), text_encoder_lora_rank=2),
                spec=_learner_spec(), init_adapter=str(tmp_path / "text"))
    with pytest.raises(ValueError, match="does not exist"):
        Learner(policy_spec=_spec(tiny_sd, TEXT), spec=_learner_spec(), init_adapter=str(tmp_path / "nothing"))


def test_train_targets_are_validated(tiny_sd):
    with pytest.raises(ValueError, match=r"policy.train_targets=\['vae'\]"):
        default_policy_spec(pretrained=tiny_sd, train_targets=("vae",))
