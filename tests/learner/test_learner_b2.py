"""The Learner with B²-DiffuRL (interval-only training, contrastive selection) and online DPO."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.policy import PolicySpec
from actors.sampler import Sampler
from cluster.specs import default_learner_spec, default_policy_spec
from learner.bpt import BptSchedule
from learner.learner import Learner
from learner.spec import LearnerSpec

T = 6
SCHEDULE = BptSchedule(num_steps=T, tau_start=2, tau_end=6, num_stages=5, epochs_per_stage=1)


@pytest.fixture(scope="module")
def policy_spec(tiny_sd) -> PolicySpec:
    return default_policy_spec(pretrained=tiny_sd, num_steps=T, resolution=64, guidance_scale=3.0)


@pytest.fixture(scope="module")
def branches(policy_spec):
    sampler = Sampler(spec=policy_spec)
    # Stage 0 trains the last 2 steps: branch at step 4.
    traj, _ = sampler.sample_branches(prompts=["a cat", "a dog"], seed=0, n_branch=4, branch_step=4)
    return traj


def _spec(**kw) -> LearnerSpec:
    base = dict(algorithm="ppo", learning_rate=1e-2, clip_range=0.5, updates_per_epoch=1, micro_batch_size=8,
                adam_weight_decay=0.0, bpt=SCHEDULE, b2_threshold=0.5, b2_history_epochs=8)
    return default_learner_spec(**{**base, **kw})


def _record_unet_timesteps(learner: Learner) -> list[int]:
    seen: list[int] = []

    def hook(_module, args, kwargs):
        timesteps = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.extend(int(t) for t in torch.as_tensor(timesteps).reshape(-1))

    learner.policy.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


REWARDS = np.array([0.0, 1.0, 0.2, 0.4,    # cat group: best leaf 1, worst leaf 0
                    5.0, 5.1, 4.0, 5.0],   # dog group: best leaf 5, worst leaf 6
                   dtype=np.float32)


@pytest.mark.parametrize("algorithm", ["ppo", "pg", "dpo"])
def test_only_the_stage_interval_is_trained(policy_spec, branches, algorithm):
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm=algorithm))
    seen = _record_unet_timesteps(learner)
    stats = learner.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    interval = set(int(t) for t in branches.timesteps[4:6])  # stage 0: steps [4, 6)
    assert seen and set(seen) <= interval, (sorted(set(seen)), interval)
    assert stats["b2/stage"] == 0 and (stats["b2/first_step"], stats["b2/last_step"]) == (4, 6)
    assert stats["train/n_pairs"] > 0 and learner.version == 1


def test_gradients_are_zero_outside_the_interval(policy_spec, branches):
    """d loss / d x_t through the policy log-probs is zero for steps the learner does not train."""
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg"))
    seen = _record_unet_timesteps(learner)
    learner.update(trajectories=[branches], rewards=[REWARDS], epoch=2)  # stage 2: tau 4, steps [2, 6)
    assert set(seen) == set(int(t) for t in branches.timesteps[2:6])
    assert not set(seen) & set(int(t) for t in branches.timesteps[:2])


def test_contrastive_selection_on_a_hand_made_table(policy_spec, branches):
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg"))
    stats = learner.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    # Per-prompt z over the current stage: cat [0, 1, .2, .4] -> best leaf 1 (z > .5), worst leaf 0
    # (z < -.5); dog [5, 5.1, 4, 5] -> best leaf 5 (z = .61), worst leaf 6 (z = -1.48). 4 selected.
    assert stats["b2/n_selected"] == 4 and stats["b2/n_positive"] == 2 and stats["b2/n_negative"] == 2
    assert stats["train/n_pairs"] == 4 * 2  # selected leaves x the 2 interval steps
    tight = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg", b2_threshold=1.4))
    stats = tight.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    assert stats["b2/n_selected"] == 1  # only the dog group's worst leaf clears |z| >= 1.4
    assert (stats["b2/n_positive"], stats["b2/n_negative"]) == (0, 1)
    # An asymmetric pair of thresholds (the release's PosThreshold / NegThreshold): best leaves only.
    positives = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg", b2_neg_threshold=-10.0))
    stats = positives.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    assert (stats["b2/n_positive"], stats["b2/n_negative"]) == (2, 0)


def test_selection_all_trains_every_leaf_with_its_group_relative_advantage(policy_spec, branches):
    """b2.selection = all with train.advantage = per_group (DanceGRPO's groups): all 8 leaves are trained,
    each with its reward standardized within its branch group, and no z-score history is kept. By hand:
    cat [0, 1, .2, .4]: mean .4, std sqrt(.14); dog [5, 5.1, 4, 5]: mean 4.775, std sqrt(.201875)."""
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg", b2_selection="all",
                                                          advantage="per_group"))
    stats = learner.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    assert stats["train/n_pairs"] == 8 * 2 and "b2/n_selected" not in stats  # every leaf x the 2 interval steps
    cat = np.abs(np.array([0.0, 1.0, 0.2, 0.4]) - 0.4).sum() / np.sqrt(0.14)
    dog = np.abs(np.array([5.0, 5.1, 4.0, 5.0]) - 4.775).sum() / np.sqrt(0.201875)
    assert stats["train/advantage_abs_mean"] == pytest.approx((cat + dog) / 8, rel=1e-4)
    assert learner.state.zscores.epochs == [] and learner.version == 1


def test_the_z_score_window_keeps_sliding_after_the_schedule_s_last_stage(policy_spec, branches):
    """Epochs 5-7 all lie in the last stage (4); the history is keyed by epoch, so with H = 1 the z-scores
    of epoch 7 see epochs 6 and 7 only. Both hold the hand-made table shifted by +10, which gives the
    table's own selection (4 leaves); a window still holding epoch 5's unshifted rewards would put every
    shifted leaf above its prompt's mean (z > +0.8) and keep only the 2 best leaves."""
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="pg", b2_history_epochs=1))
    for epoch, shift in ((5, 0.0), (6, 10.0), (7, 10.0)):
        current = dataclasses.replace(branches, policy_version=learner.version)
        stats = learner.update(trajectories=[current], rewards=[REWARDS + shift], epoch=epoch)
        assert stats["b2/stage"] == SCHEDULE.num_stages - 1
    assert learner.state.zscores.epochs == [6, 7]
    assert stats["b2/n_selected"] == 4


def test_online_dpo_starts_at_log2_and_raises_the_preferred_margin(policy_spec, branches):
    learner = Learner(policy_spec=policy_spec, spec=_spec(algorithm="dpo", dpo_beta=1.0, learning_rate=3e-2))
    first = learner.update(trajectories=[branches], rewards=[REWARDS], epoch=0)
    assert first["dpo/n_pairs"] == 2
    assert first["dpo/loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference before any step
    margins = []
    for _ in range(3):
        current = dataclasses.replace(branches, policy_version=learner.version)
        margins.append(learner.update(trajectories=[current], rewards=[REWARDS], epoch=0)["dpo/margin"])
    assert margins[-1] > 0 and margins[-1] > margins[0]
