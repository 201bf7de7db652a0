"""The learner's numerics: fp16 loss scaling, non-finite guards, CPU checkpoint state, the first-step
importance ratio, and adapters that must bind and act (the GPU failure modes, reproduced on CPU)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from actors.policy import AdapterBindingError, Policy, PolicySpec
from actors.sampler import Sampler
from actors.weights import NonFiniteWeightsError, buffer_checksum, pack_adapter
from cluster.specs import default_learner_spec, default_policy_spec
from learner.learner import Learner
from learner.precision import ratio_warning
from learner.spec import LearnerSpec
from learner.state import tensors_not_on_cpu

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


@pytest.fixture(scope="module")
def policy_spec(cat_dog_policy_spec) -> PolicySpec:
    return cat_dog_policy_spec  # the shared tiny-pipeline spec (tests/learner/conftest.py)


@pytest.fixture(scope="module")
def traj(policy_spec):
    return Sampler(spec=policy_spec).sample(prompts=PROMPTS, seed=0)[0]


def _spec(**kw) -> LearnerSpec:
    base = dict(algorithm="pg", learning_rate=1e-2, advantage="batch", updates_per_epoch=1, micro_batch_size=8,
                adam_weight_decay=0.0)
    return default_learner_spec(**{**base, **kw})


def _adapter(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in learner.policy.named_trainable_parameters()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


REWARDS = np.array([1.0, 0.0, 0.5, -1.0], np.float32)


# ----- mixed precision --------------------------------------------------------------------------
def test_fp16_loss_scaling_recovers_the_fp32_gradient_at_256px(tiny_sd):
    """Defect 1: a policy-gradient micro-batch weighted as 4 of a 320-pair step, 256 px. In fp16 without
    loss scaling most gradient entries flush to zero; with the GradScaler the gradient is the fp32 one."""
    spec = default_policy_spec(pretrained=tiny_sd, num_steps=10, resolution=256, guidance_scale=5.0)
    trajectory = Sampler(spec=spec).sample(prompts=["a cat", "a dog"], seed=0)[0]
    pairs = np.array([[0, 2], [1, 5], [0, 8], [1, 9]])
    advantages = np.array([1.0, -1.0], np.float32)
    probe = dict(trajectory=trajectory, advantages=advantages, pairs=pairs, weight=4 / 320)
    reference = Learner(policy_spec=spec, spec=_spec()).probe_gradient(**probe)
    fp16 = Learner(policy_spec=spec, spec=_spec(mixed_precision="fp16"))
    assert fp16.policy.dtype == torch.float16 and fp16.stepper.loss_scale == 2.0**16
    assert all(p.dtype == torch.float32 for _, p in fp16.policy.named_trainable_parameters())
    scaled = fp16.probe_gradient(**probe)
    fp16.stepper.scaler = torch.amp.GradScaler("cpu", enabled=False)  # the defect: no loss scaling
    unscaled = fp16.probe_gradient(**probe)

    def cosine(g):
        return float(torch.nn.functional.cosine_similarity(reference, g, dim=0))

    assert (reference != 0).float().mean() > 0.3
    assert cosine(scaled) >= 0.99, cosine(scaled)
    assert cosine(unscaled) < 0.5, cosine(unscaled)  # the case really is in fp16's subnormal range


def test_bf16_and_fp16_training_keep_fp32_adapter_and_optimizer_state(policy_spec, traj):
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        learner = Learner(policy_spec=policy_spec, spec=_spec(mixed_precision=mode))
        assert learner.policy.dtype == dtype and learner.sampler_dtype == "float32"
        stats = learner.update(trajectories=[traj], rewards=[REWARDS], epoch=0)
        assert stats["train/optimizer_steps"] == 1 and stats["train/skipped_steps"] == 0 and learner.version == 1
        for param in learner.optimizer.param_groups[0]["params"]:
            assert param.dtype == torch.float32
            assert learner.optimizer.state[param]["exp_avg"].dtype == torch.float32
        assert stats["train/loss_scale"] == (2.0**16 if mode == "fp16" else 1.0)


# ----- non-finite guards ------------------------------------------------------------------------
def test_nonfinite_latents_or_log_probs_are_dropped_and_counted(policy_spec, traj):
    latents, log_probs = traj.latents.copy(), traj.log_probs.copy()
    latents[1, 2, 0, 3, 3] = np.nan
    log_probs[2, 1] = -np.inf
    poisoned = dataclasses.replace(traj, latents=latents, log_probs=log_probs)
    learner = Learner(policy_spec=policy_spec, spec=_spec())
    stats = learner.update(trajectories=[poisoned], rewards=[REWARDS], epoch=0)
    assert stats["train/nonfinite_trajectories"] == 2 and stats["train/n_samples"] == 2 and stats["train/n_pairs"] == 2 * 4
    assert learner.version == 1 and all(torch.isfinite(p).all() for p in _adapter(learner))

    # A batch that is entirely non-finite trains nothing, keeps the version, and counts as a skip.
    before = _adapter(learner)
    all_nan = dataclasses.replace(traj, latents=np.full_like(traj.latents, np.nan), policy_version=1)
    stats = learner.update(trajectories=[all_nan], rewards=[REWARDS], epoch=1)
    assert stats["train/nonfinite_trajectories"] == 4 and stats["train/n_pairs"] == 0 and stats["train/skipped_steps_in_row"] == 1
    assert learner.version == 1
    _assert_same(before, _adapter(learner))


def test_a_nonfinite_loss_skips_the_step_and_skips_are_counted_in_a_row(policy_spec, traj):
    """Finite inputs whose log-prob overflows float32 (latents of 1e30): the step is skipped, the
    adapter, the optimizer and the version stay as they were; a clean update resets the count."""
    latents = traj.latents.copy()
    latents[0] *= 1e30
    overflowing = dataclasses.replace(traj, latents=latents)
    assert overflowing.finite_rows().all()
    learner = Learner(policy_spec=policy_spec, spec=_spec())
    before = _adapter(learner)
    for epoch in range(2):
        stats = learner.update(trajectories=[overflowing], rewards=[REWARDS], epoch=epoch)
        assert stats["train/skipped_steps"] == 1 and stats["train/optimizer_steps"] == 0 and stats["train/n_pairs"] == 0
        assert stats["train/skipped_steps_in_row"] == epoch + 1
    assert learner.version == 0 and not learner.optimizer.state
    _assert_same(before, _adapter(learner))
    stats = learner.update(trajectories=[traj], rewards=[REWARDS], epoch=2)
    assert stats["train/optimizer_steps"] == 1 and stats["train/skipped_steps_in_row"] == 0 and learner.version == 1


def test_nonfinite_adapters_are_neither_published_nor_applied(policy_spec):
    sampler = Sampler(spec=policy_spec)
    named = sampler.policy.named_trainable_parameters()
    packet = pack_adapter(named, version=1)
    bad = packet.buffer.copy()
    bad[5] = np.nan
    forged = dataclasses.replace(packet, buffer=bad, checksum=buffer_checksum(bad))  # checksum matches
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(NonFiniteWeightsError, match="1 of .* values are NaN or inf"):
        sampler.set_weights(packet=forged)
    assert sampler.policy_version == 0
    _assert_same(before, [p.detach() for _, p in named])
    with torch.no_grad():
        named[-1][1][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=f"first in {named[-1][0]}.*refusing to publish"):
        pack_adapter(named, version=2)


# ----- device-safe checkpoint state ------------------------------------------------------------
def test_checkpoint_state_is_cpu_snapshot_and_round_trips(policy_spec, traj):
    learner = Learner(policy_spec=policy_spec, spec=_spec(mixed_precision="fp16"))
    learner.update(trajectories=[traj], rewards=[REWARDS], epoch=0)
    state = learner.state_dict()
    assert tensors_not_on_cpu(state) == []
    assert state["precision"]["scaler"]["scale"] == 2.0**16 and state["precision"]["steps_taken"] == 1
    moments = {k: v["exp_avg"].clone() for k, v in state["optimizer"]["state"].items()}
    current = dataclasses.replace(traj, policy_version=1)
    learner.update(trajectories=[current], rewards=[REWARDS], epoch=1)
    for k, v in state["optimizer"]["state"].items():  # a snapshot: later steps do not change it
        torch.testing.assert_close(v["exp_avg"], moments[k], rtol=0, atol=0)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True, map_location="cpu")
    resumed = Learner(policy_spec=policy_spec, spec=_spec(mixed_precision="fp16"))
    resumed.load_state_dict(state=loaded)
    assert resumed.stepper.steps_taken == 1 and resumed.stepper.loss_scale == 2.0**16
    stats = resumed.update(trajectories=[current], rewards=[REWARDS], epoch=1)
    assert stats["train/policy_version"] == learner.version == 2
    _assert_same(_adapter(learner), _adapter(resumed))


def test_tensors_not_on_cpu_names_the_offending_paths():
    tree = {"a": torch.zeros(1), "b": [torch.zeros(1, device="meta")], "c": {"d": 3}}
    assert tensors_not_on_cpu(tree) == ["b.0 (meta)"]


# ----- the first-step importance ratio ---------------------------------------------------------
def test_first_step_ratio_is_one_on_policy_and_flags_a_mismatch(policy_spec, traj):
    sync = Learner(policy_spec=policy_spec, spec=_spec())
    stats = sync.update(trajectories=[traj], rewards=[REWARDS], epoch=0)
    assert 0 <= stats["train/onpolicy_ratio_dev"] < 1e-4, stats["train/onpolicy_ratio_dev"]
    assert ratio_warning(deviation=stats["train/onpolicy_ratio_dev"], threshold=1e-4, sampler_dtype="float32",
                         mixed_precision="no") is None

    # Pipelined: the next batch was sampled one version behind; the learner measures it under the
    # adapter that drew it (kept from the previous update), so the ratio is 1 again.
    piped = Learner(policy_spec=policy_spec, spec=_spec(max_staleness=1))
    piped.update(trajectories=[traj], rewards=[REWARDS], epoch=0)
    second = Sampler(spec=policy_spec).sample(prompts=PROMPTS, seed=1)[0]  # version 0, learner at 1
    stats = piped.update(trajectories=[second], rewards=[REWARDS], epoch=1)
    assert stats["train/onpolicy_ratio_dev"] < 1e-4 and piped.version == 2

    # A sampler whose adapter differs from the one its trajectories are stamped with.
    drifted = Sampler(spec=policy_spec)
    with torch.no_grad():
        for _, p in drifted.policy.named_trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    wrong = drifted.sample(prompts=PROMPTS, seed=2)[0]
    stats = Learner(policy_spec=policy_spec, spec=_spec()).update(trajectories=[wrong], rewards=[REWARDS], epoch=0)
    assert stats["train/onpolicy_ratio_dev"] > 1e-2
    message = ratio_warning(deviation=stats["train/onpolicy_ratio_dev"], threshold=1e-4, sampler_dtype="float16",
                            mixed_precision="bf16")
    assert "exceeds the clip range" in message and "policy.dtype=float16" in message


# ----- adapters must bind and act ---------------------------------------------------------------
def test_a_lora_target_that_matches_no_module_is_refused(tiny_sd):
    spec = default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64)
    counts = Policy(spec).verify_adapters()
    assert set(counts) == {"unet:to_q", "unet:to_k", "unet:to_v", "unet:to_out.0"} and min(counts.values()) >= 1
    typo = dataclasses.replace(spec, lora_targets=("to_q", "to_vv"))
    with pytest.raises(AdapterBindingError, match=r"policy.lora_targets: target 'to_vv' matches no module"):
        Learner(policy_spec=typo, spec=_spec())
    with pytest.raises(AdapterBindingError, match=r"policy.lora_targets=\['nothing'\] match no module of the unet"):
        Policy(dataclasses.replace(spec, lora_targets=("nothing",)))
    text = dataclasses.replace(spec, train_targets=("text_encoder",), text_encoder_lora_targets=("q_proj", "qq_proj"))
    with pytest.raises(AdapterBindingError, match=r"policy.text_encoder_lora_targets: target 'qq_proj'"):
        Policy(text).verify_adapters()


def test_an_adapter_that_cannot_change_the_output_is_refused(tiny_sd):
    """An adapter that is attached but inert (here its LoRA scaling is zeroed on every to_k layer, as a
    lora_alpha of 0 would) must not pass as trainable."""
    policy = Policy(default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64, lora_targets=("to_q", "to_k")))
    for name, module in policy.unet.named_modules():
        if name.endswith("to_k") and hasattr(module, "scaling"):
            module.scaling["default"] = 0.0
    with pytest.raises(AdapterBindingError, match=r"target 'to_k' .* does not change the model's output"):
        policy.verify_adapters()
