"""End to end on a real local Ray: samplers, reward stage and learner actors, run directory, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from cluster.run import train

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"epoch", "train/policy_version", "reward/mean", "reward/std", "train/loss", "train/kl", "train/approx_kl", "train/clipfrac",
            "time/samples_per_s", "time/epoch_s"}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / "jpeg_demo.yaml", [f"cache_dir={tmp_path / 'cache'}",
                                                        "logging.progress=false", *overrides])


def test_short_pipelined_run_improves_reward_and_writes_the_run_directory(ray_local, tmp_path):
    config = _config(tmp_path, "epochs=16", "cluster.max_staleness=1")
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    rows = _rows(run_dir)
    assert len(rows) == 16 and all(REQUIRED <= set(r) for r in rows)
    assert [r["train/policy_version"] for r in rows] == list(range(1, 17))
    # Pipelining: epoch k+1 was sampled while epoch k trained, one version behind.
    assert [r["sampler/policy_version"] for r in rows] == [0] + list(range(0, 15))
    assert all(r["train/stale_refused"] == 0 and r["reward/nonfinite"] == 0 for r in rows)
    assert all(r["train/nonfinite_trajectories"] == 0 and r["train/skipped_steps"] == 0 and r["train/optimizer_steps"] == 4
               for r in rows)
    # Pipelined samples are measured under the adapter that drew them (kept one version): ρ = 1.
    assert all(r["train/onpolicy_ratio_dev"] < 1e-4 for r in rows), [r["train/onpolicy_ratio_dev"] for r in rows]
    initial, final = rows[0]["eval/reward_mean_initial"], rows[-1]["eval/reward_mean"]
    assert final > initial + 0.02, (initial, final)
    for name in ("config.yaml", "reward_curve.png", "samples/eval_epoch0000.png", "samples/eval_epoch0016.png",
                 "lora/pytorch_lora_weights.safetensors"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # The exported adapter loads into a fresh diffusers pipeline and changes its output.
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "cache" / "tiny-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, height=64, width=64, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(run_dir / "lora")
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 1e-3


def test_synchronous_run_samples_with_the_newest_adapter(ray_local, tmp_path, monkeypatch):
    import cluster.driver
    from cluster.metrics import open_writer, reward_curve_points

    calls = []  # what a further sink (W&B) is handed, in order

    class Recorder:
        def log(self, row, *, step):
            calls.append(("row", step))

        def log_images(self, key, images, *, captions, step):
            calls.append((key, step))

        def close(self):
            pass

    def writer_with_recorder(*args, **kwargs):
        writer = open_writer(*args, **kwargs)
        writer.sinks.append(Recorder())
        return writer

    monkeypatch.setattr(cluster.driver, "open_writer", writer_with_recorder)
    config = _config(tmp_path, "epochs=3", "cluster.max_staleness=0", "sampling.batches_per_sampler=1")
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    rows = _rows(run_dir)
    assert [r["sampler/policy_version"] for r in rows] == [0, 1, 2]
    # The first-step importance ratio is measured every epoch and is 1 when sampler and learner agree.
    assert all(0 <= r["train/onpolicy_ratio_dev"] < 1e-4 for r in rows), [r["train/onpolicy_ratio_dev"] for r in rows]
    assert "eval/reward_mean" in rows[-1] and "eval/reward_mean" not in rows[0]
    assert np.isfinite(rows[0]["eval/reward_mean_initial"])
    # The reward curve starts at the base model: the evaluation before training at x = 0.
    assert reward_curve_points(rows)[1] == [(0, rows[0]["eval/reward_mean_initial"]), (3, rows[-1]["eval/reward_mean"])]

    # Evaluation grids: the base model's, then the one after the last update, each after the rows before
    # its step (steps never go back), and in TensorBoard as one image tag beside the namespaced scalars.
    assert calls == [("eval/samples", 0), ("row", 0), ("row", 1), ("row", 2), ("eval/samples", 3)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["eval/samples"]
    assert [e.step for e in events.Images("eval/samples")] == [0, 3]
    assert {"train/loss", "reward/mean", "time/epoch_s", "eval/reward_mean", "sampler/policy_version"} <= set(
        events.Tags()["scalars"])
    assert all("/" in tag for tag in events.Tags()["scalars"])

    # The adapter names the base model it was trained on, at the end and in the final checkpoint.
    record = json.loads((run_dir / "lora" / "gard_adapter.json").read_text())
    assert record["base_model"] == {"pretrained": "tiny:sd", "resolved": str((tmp_path / "cache" / "tiny-sd").resolve())}
    assert (record["run"], record["epoch"], record["policy_version"]) == ("demo", 3, 3)
    assert record["adapters"] == {"unet": {"rank": config.policy.lora_rank, "alpha": config.policy.lora_alpha,
                                           "targets": config.policy.lora_targets}}
    checkpointed = json.loads((run_dir / "checkpoints" / "epoch-000003" / "lora" / "gard_adapter.json").read_text())
    assert checkpointed == record


def test_b2_run_with_branch_rollouts_and_progressive_intervals(ray_local, tmp_path):
    config = load_config(REPO / "configs" / "b2_demo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "epochs=4", "b2.num_stages=5",
        "b2.epochs_per_stage=1", "sampling.batches_per_sampler=1", "sampling.batch_size=2"])
    rows = _rows(train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None))
    assert [r["b2/stage"] for r in rows] == [0, 1, 2, 3]
    # tau = 6 + floor(5k/5) over 10 steps: intervals [4,10), [3,10), [2,10), [1,10); leaves split there.
    assert [r["b2/train_interval"] for r in rows] == [[4, 10], [3, 10], [2, 10], [1, 10]]
    assert [r["b2/branch_step"] for r in rows] == [4, 3, 2, 1]
    n_leaves = config.cluster.num_samplers * config.sampling.batch_size * config.b2.n_branch
    assert all(r["reward/n_scored"] == n_leaves for r in rows)
    # At most one best and one worst leaf per group are selected; each trains only interval steps.
    n_groups = n_leaves // config.b2.n_branch
    assert all(0 < r["b2/n_selected"] <= 2 * n_groups for r in rows)
    assert all(r["train/n_pairs"] == r["b2/n_selected"] * (10 - r["b2/train_interval"][0]) for r in rows)


# slow: online DPO end to end is also covered by the D-Fusion run of test_cluster_dfusion.py (default suite)
@pytest.mark.slow
def test_online_dpo_run_on_branch_pairs(ray_local, tmp_path):
    config = load_config(REPO / "configs" / "b2_demo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "epochs=2", "train.algorithm=dpo",
        "sampling.batches_per_sampler=1", "sampling.batch_size=2", "train.inner_epochs=2", "dpo.online_beta=50"])
    rows = _rows(train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None))
    n_groups = config.cluster.num_samplers * config.sampling.batch_size
    for row in rows:
        assert row["dpo/n_pairs"] == n_groups  # the best and the worst leaf of every branch group
        assert 0 <= row["dpo/acc"] <= 1 and np.isfinite(row["dpo/margin"])
    # The first step starts at log 2 (policy == reference); the second inner epoch revisits the same pairs
    # after two steps on them, so the epoch's mean loss must be below log 2 and its accuracy above chance.
    assert all(r["dpo/loss"] < np.log(2) - 1e-2 for r in rows) and rows[-1]["dpo/acc"] > 0.5


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_texforce_run_trains_and_exports_the_text_encoder_adapter(ray_local, tmp_path):
    from safetensors.torch import load_file

    config = load_config(REPO / "configs" / "texforce_demo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "epochs=2", "sampling.batches_per_sampler=1",
        "policy.train_targets=[unet,text_encoder]"])
    run_dir = train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    rows = _rows(run_dir)
    assert [r["train/policy_version"] for r in rows] == [1, 2] and all(r["train/n_pairs"] > 0 for r in rows)
    tensors = load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    text_b = [v for k, v in tensors.items() if k.startswith("text_encoder.") and ".lora_B." in k]
    unet_b = [v for k, v in tensors.items() if k.startswith("unet.") and ".lora_B." in k]
    # B starts at zero: both adapters were trained (and both were exported).
    assert text_b and unet_b and max(float(v.abs().max()) for v in text_b) > 0
    assert max(float(v.abs().max()) for v in unet_b) > 0


# slow: a fault-path run of about a minute; tests/learner/test_learner_guarded_step.py covers the skip logic
@pytest.mark.slow
def test_a_run_whose_samplers_overflow_stops_after_max_skipped_steps_with_a_checkpoint(ray_local, tmp_path):
    """float16 samplers on a model whose first convolution overflows fp16 (the float32 learner is fine):
    every trajectory is NaN, nothing is trained or published, and after train.max_skipped_steps epochs
    in a row the run stops with a checkpoint and a message saying why."""
    import pytest
    import torch
    from diffusers import StableDiffusionPipeline

    from actors.tiny import build_tiny_sd
    from cluster.checkpoint import latest_checkpoint, load_checkpoint
    from learner.precision import TrainingStalledError

    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "tiny"), local_files_only=True)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1e6)  # ~1e6 activations: inf in float16, fine in float32
    pipe.save_pretrained(tmp_path / "overflowing")
    config = _config(tmp_path, "epochs=5", f"policy.pretrained={tmp_path / 'overflowing'}", "policy.dtype=float16",
                     "train.max_skipped_steps=2", "sampling.batches_per_sampler=1", "sampling.batch_size=2",
                     "checkpoint.every_epochs=0", "cluster.max_staleness=0")
    messages = []
    with pytest.raises(TrainingStalledError, match=r"2 optimizer steps in a row were skipped .*max_skipped_steps = 2"
                                                   r".*4 non-finite trajectories.*stopped after checkpoint"):
        train(config, output_dir=str(tmp_path / "run"), log=messages.append)
    rows = _rows(tmp_path / "run")
    assert [(r["epoch"], r["train/policy_version"], r["train/nonfinite_trajectories"], r["train/skipped_steps_in_row"]) for r in rows] \
        == [(0, 0, 4, 1), (1, 0, 4, 2)]
    assert all(r["train/n_pairs"] == 0 and r["time/broadcast_s"] == 0 for r in rows)
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert checkpoint.epoch == 2 and checkpoint.meta["policy_version"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint.learner_state["adapter"].values())
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_an_adapter_target_that_binds_to_nothing_stops_the_run_at_start(ray_local, tmp_path):
    import pytest

    from cluster.config import ConfigError
    from cluster.driver import Driver
    from cluster.run import prepare_run_dir

    config = _config(tmp_path, "epochs=1", "policy.lora_targets=[to_q, to_kk]")
    # The preflight finds it in the model's config before Ray starts: nothing is written.
    with pytest.raises(ConfigError, match=r"policy.lora_targets: 'to_kk' matches no Linear/Conv2d layer of the UNet"):
        train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    # The learner's own check (the guard for models the preflight cannot read, e.g. hub ids) says the same.
    with pytest.raises(ConfigError, match=r"the learner could not start: policy.lora_targets: target 'to_kk' "
                                          r"matches no module of the unet"):
        Driver(config, run_dir=prepare_run_dir(config, str(tmp_path / "run")))
    assert not (tmp_path / "run" / "checkpoints").exists()
