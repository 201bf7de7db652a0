"""Data-parallel learner ranks without Ray: two gloo processes train the same epoch as one learner.

The ranks split every optimizer step's (sample, timestep) pairs and sum gradients before clipping, so
after an epoch their adapter and AdamW state equal a single learner's on the same pairs (up to float
summation order), the logged means match, and the two ranks are bit-identical to each other. A rank
whose weights were changed behind the group's back is caught by the state comparison.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from cluster.specs import default_learner_spec, default_policy_spec
from learner.bpt import BptSchedule
from learner.distributed import LearnerDivergedError, RankGroup, check_digests, free_port
from learner.learner import Learner

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]
# Float summation order matters through AdamW: its first step is lr·g/(|g| + eps), so an entry whose
# gradient cancels to ~eps moves by up to lr·δg/eps for a rounding difference δg. Two sources of δg here:
# CPU kernels' results depend on the batch shape (~1e-8), and the ranks may add the same terms in another
# order. "ppo_kl", "texforce_pg", "b2_ppo" and "denoising_dpo" use micro-batches that are the same on one learner and on
# two ranks, added in the same order: they match to 1e-6. In "dpo" each rank adds its winner and loser
# shares before the ranks are summed (one learner: all winner terms first): an entry of ~6e-8 then
# differs by ~5e-10 and its first step by ~1e-5 (measured; 2.3e-5 once, in a fresh environment on a busy
# machine: the ranks' all-reduce may add their halves in either order), hence 1e-2·lr, still a
# hundredth of one step's move. "ppo_uneven" splits
# differently (one learner 3 + 3 + 2, each rank 3 + 1). AdamW's moments (the gradients) are compared to
# 1e-4 of their scale in every case.
SPECS = {
    # PPO with a trained KL term: 16 pairs in 2 steps of 8; one learner 4 + 4, each rank 4.
    "ppo_kl": dict(algorithm="ppo", kl_beta=0.5, clip_range=0.5, learning_rate=1e-2, advantage="batch",
                   updates_per_epoch=2, micro_batch_size=4),
    # PPO stopped by target_kl: the first step is on-policy (approx_kl 0) and applied, the second step's
    # approx_kl (after a step at lr 1e-2, ~1e-4) exceeds 1e-9 on the ranks' merged mean, so both ranks drop it.
    "ppo_target_kl": dict(algorithm="ppo", clip_range=0.5, learning_rate=1e-2, advantage="batch", updates_per_epoch=2,
                          micro_batch_size=4, target_kl=1e-9),
    # Online DPO on the best and worst sample of each prompt: 2 pairs, one per step; each rank sums and
    # backpropagates half of a pair's 4 + 4 transitions (one learner 2 + 2 per side, each rank 2).
    "dpo": dict(algorithm="dpo", learning_rate=1e-2, updates_per_epoch=2, micro_batch_size=2, dpo_beta=20.0),
    "ppo_uneven": dict(algorithm="ppo", kl_beta=0.5, clip_range=0.5, learning_rate=1e-2, advantage="batch",
                       updates_per_epoch=2, micro_batch_size=3),
    # TexForce: REINFORCE + KL on UNet and text-encoder adapters (prompts re-encoded with gradients).
    "texforce_pg": dict(algorithm="pg", kl_beta=0.5, learning_rate=1e-2, advantage="batch", updates_per_epoch=2,
                        micro_batch_size=4),
    # B²-DiffuRL: stage 0 trains steps [2, 4) of the selected best/worst sample of each prompt (8 pairs).
    "b2_ppo": dict(algorithm="ppo", clip_range=0.5, learning_rate=1e-2, updates_per_epoch=2, micro_batch_size=2,
                   bpt=BptSchedule(num_steps=4, tau_start=2, tau_end=4, num_stages=3, epochs_per_stage=1),
                   b2_threshold=0.5),
    # Diffusion-DPO in its denoising form: 2 ranked pairs x 2 (t, ε) draws, one pair per step, a draw per rank.
    "denoising_dpo": dict(algorithm="diffusion_dpo", learning_rate=1e-2, updates_per_epoch=2, micro_batch_size=1,
                          dpo_noise_draws=2, dpo_denoise_beta=500.0),
    # Reward-weighted regression: the 8 samples' exponential weights x 2 draws, split over the ranks.
    "rwr": dict(algorithm="rwr", rwr_weighting="exponential", learning_rate=1e-2, updates_per_epoch=2,
                micro_batch_size=3, rwr_noise_draws=2),
}
POLICY = {"texforce_pg": dict(train_targets=("unet", "text_encoder"))}
ADAPTER_ATOL = {"ppo_kl": 1e-6, "ppo_target_kl": 1e-6, "dpo": 1e-4, "ppo_uneven": 1e-4, "texforce_pg": 1e-6, "b2_ppo": 1e-6,
                "denoising_dpo": 1e-6, "rwr": 1e-4}
# The logged means, (rel, abs): DPO's margin after the first step is a small difference (~1e-2) that
# follows the adapter's last digits; with uneven micro-batches the PPO loss (~5e-4, a mean of terms ~1
# whose advantages sum to zero) follows the kernels' batch-shape differences.
STATS_TOL = {"ppo_kl": (1e-4, 1e-9), "ppo_target_kl": (1e-4, 1e-9), "dpo": (1e-3, 1e-9), "ppo_uneven": (1e-4, 1e-6), "texforce_pg": (1e-4, 1e-9),
             "b2_ppo": (1e-4, 1e-9), "denoising_dpo": (1e-4, 1e-9), "rwr": (1e-4, 1e-9)}
PPO_STATS = ("train/loss", "train/pg_loss", "train/kl", "train/approx_kl", "train/clipfrac", "train/ratio",
             "train/grad_norm", "train/advantage_abs_mean")
STAT_KEYS = {"ppo_kl": PPO_STATS,
             "ppo_target_kl": tuple(k for k in PPO_STATS if k != "train/kl") + ("train/approx_kl_at_stop",), "ppo_uneven": PPO_STATS, "texforce_pg": PPO_STATS,
             # No KL term: train/kl only monitors the first micro-batch of each step (of each rank's share).
             "b2_ppo": tuple(k for k in PPO_STATS if k != "train/kl") + ("b2/n_selected",),
             "dpo": ("dpo/loss", "dpo/acc", "dpo/margin", "train/grad_norm"),
             "denoising_dpo": ("dpo/loss", "dpo/acc", "dpo/margin", "train/grad_norm"),
             "rwr": ("rwr/loss", "train/grad_norm", "rwr/n_weighted")}


def _learner(pretrained: str, name: str) -> Learner:
    policy = default_policy_spec(pretrained=pretrained, num_steps=4, resolution=64, guidance_scale=3.0,
                                 **POLICY.get(name, {}))
    return Learner(policy_spec=policy, spec=default_learner_spec(**SPECS[name]))


def _result(learner: Learner, stats: dict) -> dict:
    state = learner.state_dict()
    return {"adapter": state["adapter"], "optimizer": state["optimizer"]["state"], "stats": stats,
            "version": learner.version, "digest": learner.state_digest()}


def _rank_main(rank: int, world_size: int, port: int, pretrained: str, data: str, out: str,
               names: list[str]) -> None:
    """One rank: each scenario of ``names`` trains one epoch in the group; then the state comparison, with
    rank 1's weights perturbed. Results (or the error) are written to ``out/rank{rank}.pt``."""
    torch.set_num_threads(1)
    result: dict = {}
    try:
        trajectory, rewards = pickle.loads(Path(data).read_bytes())
        group = RankGroup.join(host="127.0.0.1", port=port, rank=rank, world_size=world_size, backend="gloo",
                               timeout_s=120)
        for name in names:
            learner = _learner(pretrained, name)
            learner.join_group(group)
            stats = learner.update(trajectories=[trajectory], rewards=[rewards], epoch=0)
            result[name] = _result(learner, stats)
        learner.check_replicas(epoch=1)  # identical: no error
        if rank == 1:
            with torch.no_grad():
                learner.policy.named_trainable_parameters()[0][1].add_(1e-3)
        try:
            learner.check_replicas(epoch=7)
        except LearnerDivergedError as err:
            result["diverged"] = str(err)
        group.close()
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails with it
        result["error"] = f"{type(err).__name__}: {err}"
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _train_scenarios(names: list[str], *, pretrained: str, out: Path) -> dict:
    """The single learner's result per scenario (in this process) and both ranks' (two processes)."""
    policy = default_policy_spec(pretrained=pretrained, num_steps=4, resolution=64, guidance_scale=3.0)
    trajectory, _ = Sampler(spec=policy).sample(prompts=PROMPTS, seed=0)
    rewards = np.array([1.0, 0.0, 0.3, 0.9], dtype=np.float32)
    data = out / "batch.pkl"
    data.write_bytes(pickle.dumps((trajectory, rewards)))
    # The ranks fork from a server that has imported the learner's modules once (a spawned child would
    # import torch and diffusers again, several seconds each).
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "diffusers", "peft", "learner.learner"])
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(rank, 2, port, pretrained, str(data), str(out), names))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    single = {}
    for name in names:  # while the ranks train
        learner = _learner(pretrained, name)
        single[name] = _result(learner, learner.update(trajectories=[trajectory], rewards=[rewards], epoch=0))
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0, f"rank process exited with {proc.exitcode}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert "error" not in rank, rank["error"]
    return {"single": single, "ranks": ranks}


FAST = ["ppo_kl", "ppo_target_kl", "dpo"]  # the default suite; the other scenarios run with make test-slow


@pytest.fixture(scope="module")
def runs(tiny_sd, tmp_path_factory) -> dict:
    return _train_scenarios(FAST, pretrained=tiny_sd, out=tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def slow_runs(tiny_sd, tmp_path_factory) -> dict:
    return _train_scenarios([n for n in SPECS if n not in FAST], pretrained=tiny_sd,
                            out=tmp_path_factory.mktemp("ranks-slow"))


@pytest.mark.parametrize("name", [
    *FAST, *(pytest.param(n, marks=pytest.mark.slow) for n in SPECS if n not in FAST)])
def test_two_ranks_equal_one_learner_on_the_same_pairs(request, name):
    runs = request.getfixturevalue("runs" if name in FAST else "slow_runs")
    single, ranks = runs["single"][name], [r[name] for r in runs["ranks"]]
    # The two ranks are bit-identical (one all-reduce gives both the same gradient bits).
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert single["version"] == ranks[0]["version"] == 1
    steps = 1 if name == "ppo_target_kl" else 2  # target_kl stops the second step on every rank
    assert single["stats"]["train/optimizer_steps"] == ranks[0]["stats"]["train/optimizer_steps"] == steps
    for key, want in single["adapter"].items():
        torch.testing.assert_close(ranks[0]["adapter"][key], want, rtol=0, atol=ADAPTER_ATOL[name])
    # LoRA B starts at zero: the adapter moved, so the comparison is not between two untouched adapters.
    assert max(float(v.abs().max()) for k, v in single["adapter"].items() if "lora_B" in k) > 1e-3
    for index, want in single["optimizer"].items():
        got = ranks[0]["optimizer"][index]
        assert int(got["step"]) == int(want["step"]) == steps
        for moment in ("exp_avg", "exp_avg_sq"):  # the gradients: equal to 1e-4 of each tensor's scale
            scale = float(want[moment].abs().max())
            assert float((got[moment] - want[moment]).abs().max()) <= 1e-4 * scale + 1e-20, (index, moment)
    # The logged means are those of the single learner.
    for key in STAT_KEYS[name]:
        assert ranks[0]["stats"][key] == pytest.approx(single["stats"][key], rel=STATS_TOL[name][0],
                                                                 abs=STATS_TOL[name][1]), key
    for key in ("train/n_pairs", "train/n_samples", "train/skipped_steps"):
        assert ranks[0]["stats"][key] == single["stats"][key], key
    assert ranks[0]["stats"]["time/allreduce_s"] >= 0 and "time/allreduce_s" not in single["stats"]


def test_a_perturbed_rank_is_caught_naming_the_ranks_and_the_epoch(runs):
    messages = [rank.get("diverged") for rank in runs["ranks"]]
    assert all(messages), messages  # every rank raises, so no rank trains on
    assert messages[0] == messages[1]
    assert "disagree after 7 epoch(s)" in messages[0] and "of rank 1 (" in messages[0] and "rank 0's" in messages[0]


def test_digest_comparison_and_the_work_split():
    check_digests(["ab", "ab", "ab"], epoch=3)
    with pytest.raises(LearnerDivergedError, match=r"after 3 epoch\(s\): .* of rank 1 \(cd\), rank 2 \(ef\) differs"):
        check_digests(["ab", "cd", "ef"], epoch=3)
    items = np.arange(7)
    shares = [RankGroup(rank=r, world_size=3).shard(items) for r in range(3)]
    assert [s.tolist() for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]
    assert RankGroup().shard(items) is items and not RankGroup().active
    with pytest.raises(ValueError, match="rank 2 is not in"):
        RankGroup(rank=2, world_size=2)
