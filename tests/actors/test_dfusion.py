"""D-Fusion (actors/dfusion.py, actors/dfusion_attention.py): masks from chosen tokens' cross-attention, self-attention fusion,
the fused trajectory's log-probs, and the Sampler.dfusion actor method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.ddim import ddim_step_with_logprob
from actors.dfusion import DFusionSpec, dfusion
from actors.dfusion_attention import (
    FusionController,
    attention_fusion,
    build_mask,
    content_token_positions,
    fused_self_attention,
    resize_mask,
    token_selection,
)
from actors.sampler import Sampler
from actors.trajectory import TrajectoryPairs, gather_rows
from cluster.specs import default_policy_spec

PROMPTS = ["a red cube on a table"] * 2 + ["a cat on a mat"] * 2
T = 5


@pytest.fixture(scope="module")
def sampler(tiny_sd):
    return Sampler(spec=default_policy_spec(pretrained=tiny_sd, num_steps=T, resolution=64, guidance_scale=5.0, eta=1.0))


@pytest.fixture(scope="module")
def batch(sampler):
    """One sampled batch: rows 0/1 and 2/3 share a prompt; poor = rows 0, 2 and good = rows 1, 3."""
    traj, images = sampler.sample(prompts=PROMPTS, seed=0)
    poor, good = gather_rows([traj], [(0, 0), (0, 2)]), gather_rows([traj], [(0, 1), (0, 3)])
    return traj, images, poor, good


# ----- tokens and masks --------------------------------------------------------------------------
def test_content_tokens_exclude_bos_eos_and_padding(sampler):
    tok = sampler.policy.tokenizer
    ids = tok(["a cat on a mat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[0] == tok.bos_token_id and ids[6] == tok.eos_token_id
    assert content_token_positions(tok, ["a cat on a mat", "a red cube on a table"]) == [[1, 2, 3, 4, 5],
                                                                                          [1, 2, 3, 4, 5, 6]]
    selected = token_selection(tok, ["a cat on a mat", "a red cube on a table"], positions=(2, 6, 40))
    assert selected.shape == (2, 77)
    assert selected[0].nonzero().flatten().tolist() == [2]  # 6 is EOS and 40 padding for the short prompt
    assert selected[1].nonzero().flatten().tolist() == [2, 6]
    assert token_selection(tok, ["a cat"]).nonzero()[:, 1].tolist() == [1, 2]


def test_mask_is_the_union_of_the_chosen_tokens_thresholded_maps():
    maps = torch.full((1, 77, 4, 4), 0.01)
    maps[0, 2, :2, :2] = 0.9  # chosen token: top-left quadrant
    maps[0, 3, 3, 3] = 0.5  # chosen token: one corner pixel
    maps[0, 5, 2:, :2] = 0.9  # NOT chosen: bottom-left quadrant
    maps[0, 0] = 1.0  # BOS takes most attention in real models, and is never chosen
    selected = torch.zeros(1, 77, dtype=torch.bool)
    selected[0, [2, 3]] = True
    mask = build_mask(maps, selected, threshold=0.5)
    expected = torch.zeros(1, 4, 4)
    expected[0, :2, :2] = 1
    expected[0, 3, 3] = 1
    assert torch.equal(mask, expected)
    # Raw probabilities: the corner token (0.5) stays under a 0.6 threshold, the quadrant does not.
    raw = build_mask(maps, selected, threshold=0.6, normalize="none")
    assert raw.sum() == 4 and raw[0, :2, :2].all()
    assert build_mask(maps, torch.zeros_like(selected), threshold=0.0).sum() == 0  # no token chosen: empty
    assert build_mask(maps, selected, threshold=0.0).sum() == 16  # min-max >= 0 everywhere: full
    # Coarser layers take the majority of each block.
    assert torch.equal(resize_mask(expected, (2, 2)), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


def test_fused_self_attention_replaces_keys_and_values_inside_the_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v, k_ref, v_ref = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(5))
    empty = torch.zeros(2, 1, 16, 1)
    assert torch.equal(fused_self_attention(q, k, v, k_ref, v_ref, empty), F.scaled_dot_product_attention(q, k, v))
    full = torch.ones(2, 1, 16, 1)
    torch.testing.assert_close(fused_self_attention(q, k, v, k_ref, v_ref, full),
                               F.scaled_dot_product_attention(q, k_ref, v_ref))
    half = torch.zeros(2, 1, 16, 1)
    half[:, :, :5] = 1
    mixed_k, mixed_v = torch.cat([k_ref[:, :, :5], k[:, :, 5:]], 2), torch.cat([v_ref[:, :, :5], v[:, :, 5:]], 2)
    weights = (q @ mixed_k.transpose(-1, -2) / 8**0.5).softmax(-1)  # queries stay the fused pass's own
    torch.testing.assert_close(fused_self_attention(q, k, v, k_ref, v_ref, half), weights @ mixed_v)


# ----- processors on the real (tiny) UNet --------------------------------------------------------
def _perturb_lora(policy, seed=1):
    """Non-zero LoRA B matrices, so an adapter that silently dropped out would change the output."""
    g = torch.Generator().manual_seed(seed)
    saved = {}
    with torch.no_grad():
        for name, param in policy.named_trainable_parameters():
            if "lora_B" in name:
                saved[name] = param.clone()
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
    return saved


def _restore_lora(policy, saved):
    with torch.no_grad():
        for name, param in policy.named_trainable_parameters():
            if name in saved:
                param.copy_(saved[name])


def test_processors_compute_exactly_the_default_attention_and_keep_lora(sampler, batch):
    policy = sampler.policy
    traj, _, poor, good = batch
    x, x_other = torch.from_numpy(poor.latents[:, 2]), torch.from_numpy(good.latents[:, 2])
    t = policy.scheduler.timesteps[2]
    embeds = policy.encode_prompts(list(poor.prompts))
    saved = _perturb_lora(policy)
    try:
        default = policy.guided_output(x, t, embeds)
        with policy.reference():
            base = policy.guided_output(x, t, embeds)
        assert (default - base).abs().max() > 1e-4  # the adapter matters at this step
        previous = dict(policy.unet.attn_processors)
        ctl = FusionController(latent_hw=(8, 8), selected=token_selection(policy.tokenizer, list(poor.prompts)),
                               spec=DFusionSpec())
        with attention_fusion(policy.unet, ctl):
            assert torch.equal(policy.guided_output(x, t, embeds), default)  # plain: bit for bit, LoRA on
            ctl.record_kv = ctl.record_maps = True
            policy.guided_output(x_other, t, embeds)
            ctl.record_kv = ctl.record_maps = False
            assert ctl.map_count == 4 and set(ctl.kv) == {  # 4 cross layers; self layers of mid + up fused
                "mid_block.attentions.0.transformer_blocks.0.attn1.processor",
                "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
                "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"}
            ctl.mask, ctl.fuse = torch.zeros(2, 8, 8), True
            assert torch.equal(policy.guided_output(x, t, embeds), default)  # empty mask: nothing changes
            ctl.mask = torch.ones(2, 8, 8)
            assert (policy.guided_output(x, t, embeds) - default).abs().max() > 1e-6
            ctl.fuse = False
        assert {k: type(v) for k, v in policy.unet.attn_processors.items()} == \
            {k: type(v) for k, v in previous.items()}  # restored
    finally:
        _restore_lora(policy, saved)


def test_recorded_maps_are_the_cross_attention_of_the_conditional_rows(sampler, batch):
    """Recompute softmax(Q K^T/√d) of every attn2 from its inputs (captured by hooks) by hand."""
    policy = sampler.policy
    _, _, poor, _ = batch
    x, t = torch.from_numpy(poor.latents[:, 1]), policy.scheduler.timesteps[1]
    embeds = policy.encode_prompts(list(poor.prompts))
    captured = []
    hooks = [module.register_forward_pre_hook(lambda m, args, kwargs: captured.append(
        (m, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])), with_kwargs=True)
        for name, module in policy.unet.named_modules() if name.endswith("attn2")]
    ctl = FusionController(latent_hw=(8, 8), selected=token_selection(policy.tokenizer, list(poor.prompts)),
                           spec=DFusionSpec())
    try:
        with attention_fusion(policy.unet, ctl), torch.no_grad():
            ctl.record_maps = True
            policy.guided_output(x, t, embeds)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == 4
    expected = 0
    with torch.no_grad():
        for attn, hidden, context in captured:
            q, k = attn.to_q(hidden[-2:]), attn.to_k(context[-2:])  # conditional rows come last
            q = q.view(2, -1, attn.heads, q.shape[-1] // attn.heads).transpose(1, 2)
            k = k.view(2, -1, attn.heads, k.shape[-1] // attn.heads).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)  # [2, 16, 77]
            side = int(probs.shape[1] ** 0.5)
            maps = probs.transpose(1, 2).reshape(2, 77, side, side)
            expected = expected + F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ctl.mean_maps(), expected / 4)
    assert torch.allclose(ctl.mean_maps().sum(1), torch.ones(2, 8, 8), atol=1e-5)  # a distribution over tokens


# ----- the fused trajectory ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", [DFusionSpec(mask_threshold=1.5), DFusionSpec(token_positions=(40,))],
                         ids=["threshold_above_1", "no_content_token"])
def test_empty_mask_gives_back_the_poorly_aligned_sample_exactly(sampler, batch, spec):
    traj, images, poor, good = batch
    result = dfusion(sampler.policy, poor=poor, good=good, spec=spec)
    assert np.array_equal(result.trajectory.latents, poor.latents)  # every step, bit for bit
    assert np.array_equal(result.images, images.images[[0, 2]])
    assert result.mask_fraction.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(result.trajectory.log_probs, poor.log_probs, atol=1e-5)


def test_fusing_a_sample_with_itself_changes_nothing_even_with_a_full_mask(sampler, batch):
    _, _, poor, _ = batch
    result = dfusion(sampler.policy, poor=poor, good=poor, spec=DFusionSpec(mask_threshold=0.0, fuse_start=0.0))
    assert result.mask_fraction.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(result.trajectory.latents, poor.latents, atol=1e-5)


@pytest.mark.parametrize("mask_steps", ["all", "current"])
def test_fused_log_probs_match_a_recomputation_under_the_plain_policy(sampler, batch, mask_steps):
    policy = sampler.policy
    _, _, poor, good = batch
    spec = DFusionSpec(mask_threshold=0.5, mask_steps=mask_steps, fuse_start=0.0)
    result = dfusion(policy, poor=poor, good=good, spec=spec, policy_version=7)
    fused = result.trajectory
    assert fused.policy_version == 7 and fused.prompts == poor.prompts
    assert np.array_equal(fused.latents[:, 0], poor.latents[:, 0])  # same x_T
    assert np.abs(fused.latents[:, -1] - poor.latents[:, -1]).max() > 1e-3  # the fusion did something
    assert 0 < result.mask_fraction.min() and result.mask_fraction.max() < 1
    assert result.images.dtype == np.uint8 and result.images.shape == (2, 64, 64, 3)
    embeds = policy.encode_prompts(list(fused.prompts))
    with torch.no_grad():
        for i, t in enumerate(policy.scheduler.timesteps):
            x = torch.from_numpy(fused.latents[:, i])
            _, log_prob = ddim_step_with_logprob(policy.scheduler, policy.guided_output(x, t, embeds), t, x,
                                                 eta=policy.spec.eta, prev_sample=torch.from_numpy(fused.latents[:, i + 1]))
            np.testing.assert_allclose(log_prob.numpy(), fused.log_probs[:, i], atol=1e-5, rtol=1e-6)


def test_unfused_steps_follow_the_poorly_aligned_trajectory(sampler, batch):
    _, _, poor, good = batch
    spec = DFusionSpec(mask_threshold=0.5, fuse_start=0.4)  # fused steps 2, 3, 4 of 5
    assert list(spec.fused_steps(T)) == [2, 3, 4]
    fused = dfusion(sampler.policy, poor=poor, good=good, spec=spec).trajectory
    assert np.array_equal(fused.latents[:, :3], poor.latents[:, :3])
    assert not np.array_equal(fused.latents[:, 3], poor.latents[:, 3])


def test_sampler_dfusion_returns_trainable_pairs(sampler, batch):
    traj, _, poor, _ = batch
    pairs, images, stats = sampler.dfusion(sources=[traj], poor=[(0, 0), (0, 2)], good=[(0, 1), (0, 3)],
                                           spec=DFusionSpec(fuse_start=0.0))
    assert isinstance(pairs, TrajectoryPairs) and len(pairs) == 2
    assert np.array_equal(pairs.rejected.latents, poor.latents)
    assert pairs.chosen.latents.shape == poor.latents.shape and pairs.chosen.log_probs.shape == (2, T)
    assert images.images.dtype == np.uint8 and images.prompts == poor.prompts
    assert len(stats["mask_fraction"]) == 2 and stats["unet_calls"] > 0


def test_bad_inputs_are_named(sampler, batch):
    traj, _, poor, good = batch
    with pytest.raises(ValueError, match="same prompt|one prompt"):
        dfusion(sampler.policy, poor=poor, good=gather_rows([traj], [(0, 2), (0, 0)]), spec=DFusionSpec())
    with pytest.raises(ValueError, match="mask_steps"):
        DFusionSpec(mask_steps="sometimes")
    with pytest.raises(ValueError, match="fuse_parts"):
        DFusionSpec(fuse_parts=("encoder",))
    with pytest.raises(ValueError, match="fuse_start"):
        DFusionSpec(fuse_start=0.5, fuse_end=0.5)


def test_learner_trains_explicit_pairs_and_refuses_stale_ones(tiny_sd, sampler, batch):
    from cluster.specs import default_learner_spec
    from learner.learner import Learner

    traj, _, _, _ = batch
    pairs, _, _ = sampler.dfusion(sources=[traj], poor=[(0, 0), (0, 2)], good=[(0, 1), (0, 3)],
                                  spec=DFusionSpec(fuse_start=0.0))
    learner = Learner(policy_spec=sampler.policy.spec, spec=default_learner_spec(algorithm="dpo", dpo_beta=50.0,
                                                                        learning_rate=1e-2, updates_per_epoch=1,
                                                                        inner_epochs=2))
    rewards = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32)
    stats = learner.update(trajectories=[traj], rewards=[rewards], epoch=0, pairs=[pairs])
    assert stats["dpo/n_pairs"] == 2 and stats["train/n_pairs"] == 2 * (2 * 2 * T)  # 2 passes x (chosen + rejected) x T
    assert stats["dpo/loss"] < np.log(2) and learner.version == 1
    fresh_traj = dataclasses.replace(traj, policy_version=1)  # fresh samples, but pairs of version 0 < 1
    stale = learner.update(trajectories=[fresh_traj], rewards=[rewards], epoch=1, pairs=[pairs])
    assert stale["dpo/n_pairs"] == 0 and stale["train/stale_refused"] == 2 * len(pairs) and learner.version == 1
