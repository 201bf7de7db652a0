"""Checkpoints without Ray: the learner's state round trip (continuing from it is bit-exact), atomic
writes, partial directories ignored, keep-last pruning, and the incompatible-config refusal."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from actors.policy import PolicySpec
from actors.sampler import Sampler
from cluster.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    write_checkpoint,
)
from cluster.config import Config, ConfigError
from learner.learner import Learner, LearnerSpec

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


@pytest.fixture(scope="module")
def policy_spec(tiny_sd) -> PolicySpec:
    return PolicySpec(pretrained=tiny_sd, num_steps=4, resolution=64, guidance_scale=3.0)


@pytest.fixture(scope="module")
def batches(policy_spec):
    sampler = Sampler(spec=policy_spec)
    return [sampler.sample(prompts=PROMPTS, seed=seed)[0] for seed in (0, 1)]


def _learner(policy_spec) -> Learner:
    spec = LearnerSpec(learning_rate=1e-2, clip_range=0.2, updates_per_epoch=2, micro_batch_size=8,
                       stat_buffer_size=4, stat_min_count=2, kl_beta=0.1)
    return Learner(policy_spec=policy_spec, spec=spec)


def _write(run_dir, epoch: int, *, learner_state=None, keep_last: int = 5):
    return write_checkpoint(run_dir, epoch=epoch, learner_state=learner_state or {"version": epoch},
                            lora_files={"pytorch_lora_weights.safetensors": b"x" * 10}, driver_state={"rng": None},
                            metrics=[{"epoch": e} for e in range(epoch)], config=Config().to_dict(),
                            info={"policy_version": epoch}, keep_last=keep_last)


def test_learner_state_round_trip_continues_bit_for_bit(policy_spec, batches, tmp_path):
    rewards = [np.array([1.0, 2.0, 0.5, 3.0], dtype=np.float32), np.array([0.0, 1.0, 2.0, 4.0], dtype=np.float32)]
    # The batches carry version 0; with max_staleness 0 the learner would refuse the second after its
    # first update, so each is restamped with the version the learner has when it trains on it.
    first, second = (dataclasses.replace(batches[i], policy_version=i) for i in (0, 1))
    original = _learner(policy_spec)
    original.update(trajectories=[first], rewards=[rewards[0]], epoch=0)
    lora = {"pytorch_lora_weights.safetensors": original.export_lora()["pytorch_lora_weights.safetensors"]}
    path = write_checkpoint(tmp_path, epoch=1, learner_state=original.state_dict(), lora_files=lora,
                            driver_state={"rng": None}, metrics=[{"epoch": 0}], config=Config().to_dict(),
                            info={"policy_version": original.version}, keep_last=2)
    assert path.name == "epoch-000001" and latest_checkpoint(tmp_path) == path
    checkpoint = load_checkpoint(path)
    assert checkpoint.epoch == 1 and checkpoint.meta["policy_version"] == 1 and checkpoint.metrics == [{"epoch": 0}]

    resumed = _learner(policy_spec)
    assert resumed.load_state_dict(state=checkpoint.learner_state) == 1
    for (name, a), (_, b) in zip(original._named_params, resumed._named_params, strict=True):
        assert torch.equal(a, b), name
    assert resumed.state.stat_tracker.state_dict() == original.state.stat_tracker.state_dict()
    # One more update on both: the same stats and the same adapter, bit for bit (AdamW moments restored).
    stats_a = original.update(trajectories=[second], rewards=[rewards[1]], epoch=1)
    stats_b = resumed.update(trajectories=[second], rewards=[rewards[1]], epoch=1)
    assert stats_a["train/loss"] == stats_b["train/loss"] and stats_a["train/n_pairs"] == stats_b["train/n_pairs"] > 0
    for (name, a), (_, b) in zip(original._named_params, resumed._named_params, strict=True):
        assert torch.equal(a, b), name

    # The adapter inside is diffusers format and loads into a pipeline.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(policy_spec.pretrained, local_files_only=True)
    pipe.load_lora_weights(path / "lora")


def test_mismatched_adapter_in_a_checkpoint_is_refused(policy_spec):
    learner = _learner(policy_spec)
    state = learner.state_dict()
    name = next(iter(state["adapter"]))
    state["adapter"][name] = torch.zeros(3, 3)
    from actors.weights import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="shape differences"):
        learner.load_state_dict(state=state)


def test_partial_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    for epoch in (1, 2, 3):
        _write(tmp_path, epoch, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000002", "epoch-000003"]
    # A write that crashed before its rename, a newer directory without meta.json, and one whose file
    # was truncated after the fact: none of them is picked up.
    shutil.copytree(root / "epoch-000003", root / ".tmp-epoch-000009-1-2")
    shutil.copytree(root / "epoch-000003", root / "epoch-000007")
    (root / "epoch-000007" / "meta.json").unlink()
    shutil.copytree(root / "epoch-000003", root / "epoch-000008")
    (root / "epoch-000008" / "learner.pt").write_bytes(b"trunc")
    assert latest_checkpoint(tmp_path) == root / "epoch-000003"
    with pytest.raises(FileNotFoundError, match="not a complete gard checkpoint"):
        load_checkpoint(root / "epoch-000007")
    # The next write removes the leftover of the crashed one.
    _write(tmp_path, 4, keep_last=2)
    assert not (root / ".tmp-epoch-000009-1-2").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000003", "epoch-000004"]
    meta = json.loads((root / "epoch-000004" / "meta.json").read_text())
    assert meta["epoch"] == 4 and meta["files"]["lora/pytorch_lora_weights.safetensors"] == 10


@pytest.mark.parametrize(("damaged", "reason"), [
    ('{"epoch": 1,', r"Expecting property name enclosed in double quotes at column 13"),
    ('"0123456789"', r"a JSON str, not an object"),
])
def test_a_damaged_metrics_line_is_refused_naming_the_file_and_the_line(tmp_path, damaged, reason):
    path = _write(tmp_path, 3)
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"epoch": 1}' and len(damaged) == len(lines[1])  # the same size: meta.json still agrees
    (path / "metrics.jsonl").write_text("\n".join([lines[0], damaged, lines[2]]) + "\n")
    assert latest_checkpoint(tmp_path) == path

    with pytest.raises(ConfigError, match=rf"^checkpoint '{path}' is damaged: line 2 of metrics.jsonl is not a "
                                          rf"metrics row \({reason}\): "):
        load_checkpoint(path)

def test_incompatible_config_is_refused_naming_the_fields(tmp_path):
    checkpoint = load_checkpoint(_write(tmp_path, 2))
    current = Config()
    current.epochs, current.logging.eval_every, current.cluster.call_timeout_s = 50, 3, 5.0  # may change
    check_compatible(checkpoint, current.to_dict())
    current.train.learning_rate, current.seed = 0.5, 7
    current.rewards = {"jpeg_compressibility": {"weight": 2.0}}
    with pytest.raises(ConfigError) as err:
        check_compatible(checkpoint, current.to_dict())
    message = str(err.value)
    for part in ("seed: 0 -> 7", "train.learning_rate: 0.0003 -> 0.5", "rewards.jpeg_compressibility.weight: 1.0 -> 2.0"):
        assert part in message, message
    assert "epochs" not in message.split("only")[0]
