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
    CheckpointError,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    write_checkpoint,
)
from cluster.config import Config, ConfigError
from cluster.reward_config import RewardConfig
from cluster.specs import default_learner_spec, default_policy_spec
from learner.learner import Learner
from rewards.serve_options import ServeOptions

PROMPTS = ["a cat", "a cat", "a dog", "a dog"]


@pytest.fixture(scope="module")
def policy_spec(tiny_sd) -> PolicySpec:
    return default_policy_spec(pretrained=tiny_sd, num_steps=4, resolution=64, guidance_scale=3.0)


@pytest.fixture(scope="module")
def batches(policy_spec):
    sampler = Sampler(spec=policy_spec)
    return [sampler.sample(prompts=PROMPTS, seed=seed)[0] for seed in (0, 1)]


def _learner(policy_spec) -> Learner:
    spec = default_learner_spec(learning_rate=1e-2, clip_range=0.2, updates_per_epoch=2, micro_batch_size=8,
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
    with pytest.raises(CheckpointError, match="not a complete gard checkpoint: no meta.json"):
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
    damage = _unhashed(lambda p: (p / "metrics.jsonl").write_text("\n".join([lines[0], damaged, lines[2]]) + "\n"))
    damage(path)  # a checkpoint that records only sizes: reading the file is what finds the damage
    assert latest_checkpoint(tmp_path) == path

    with pytest.raises(CheckpointError, match=rf"^checkpoint '{path}' is damaged: line 2 of metrics.jsonl is not a "
                                          rf"metrics row \({reason}\): "):
        load_checkpoint(path)


def test_incompatible_config_is_refused_naming_the_fields(tmp_path):
    checkpoint = load_checkpoint(_write(tmp_path, 2))
    current = Config()
    current.epochs, current.evaluation.every, current.cluster.call_timeout_s = 50, 3, 5.0  # may change
    current.rewards["jpeg_compressibility"].serve = ServeOptions(max_replicas=4)  # placement, not what is computed
    check_compatible(checkpoint, current.to_dict())
    current.train.learning_rate, current.seed = 0.5, 7
    current.rewards = {"jpeg_compressibility": RewardConfig(weight=2.0)}
    with pytest.raises(ConfigError) as err:
        check_compatible(checkpoint, current.to_dict())
    message = str(err.value)
    for part in ("seed: 0 -> 7", "train.learning_rate: 0.0003 -> 0.5", "rewards.jpeg_compressibility.weight: 1.0 -> 2.0"):
        assert part in message, message
    assert "epochs" not in message.split("only")[0]


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def _same_size_garbage(name):
    def corrupt(path):
        size = (path / name).stat().st_size
        (path / name).write_bytes(b"\xff" * size)
    return corrupt


def _unhashed(corrupt):
    """The corruption, with meta.json rewritten to match the new sizes and without hashes: what only
    reading the files can find."""
    def apply(path):
        corrupt(path)
        meta = json.loads((path / "meta.json").read_text())
        meta.pop("sha256")
        meta["files"] = {name: (path / name).stat().st_size for name in meta["files"]}
        (path / "meta.json").write_text(json.dumps(meta))
    return apply


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda p: _edit_meta(p, epoch=999), r"meta.json epoch = 999 does not match the directory name \(expected 2\)"),
        (lambda p: _edit_meta(p, epoch=1.5), r"meta.json epoch = 1.5 does not match"),
        (lambda p: _edit_meta(p, epoch="2"), r"meta.json epoch = '2' does not match"),
        (lambda p: _edit_meta(p, files=["learner.pt"]), r"meta.json files = \['learner.pt'\] is not a mapping"),
        (lambda p: _edit_meta(p, format=7), r"not of checkpoint format 1"),
        (lambda p: (p / "meta.json").write_text("{garbage"), r"meta.json is unreadable"),
        (_same_size_garbage("learner.pt"), r"learner.pt does not match its recorded SHA-256"),
        (_unhashed(_same_size_garbage("learner.pt")), r"learner.pt cannot be read \(UnpicklingError"),
        (_unhashed(_same_size_garbage("metrics.jsonl")), r"line 1 of metrics.jsonl is not a metrics row"),
        (_unhashed(lambda p: (p / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 7}\n')),
         r"metrics.jsonl holds 2 rows; expected one row per completed epoch 0..1"),
        (_unhashed(lambda p: (p / "config.yaml").write_text("[1, 2]\n")),
         r"config.yaml holds list, not a mapping"),
    ],
)
def test_corrupt_checkpoints_are_named_with_the_reason(tmp_path, corrupt, reason):
    path = _write(tmp_path, 2)
    load_checkpoint(path)  # intact
    corrupt(path)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(path)


def test_resume_skips_corrupt_checkpoints_and_never_starts_over_a_run_silently(tmp_path):
    from cluster.config import Config
    from cluster.run import find_resume_checkpoint, prepare_run_dir

    config, lines = Config(), []
    run_dir = tmp_path / "run"
    for epoch in (1, 2):
        _write(run_dir, epoch)
    root = run_dir / "checkpoints"
    _same_size_garbage("driver.pt")(root / "epoch-000002")
    found = find_resume_checkpoint(config, resume="auto", output_dir=str(run_dir), log=lines.append)
    assert found.epoch == 1
    assert any("skipping" in line and "epoch-000002" in line and "driver.pt does not match its recorded SHA-256"
               in line for line in lines), lines
    # Without --resume, a directory with checkpoints is refused; --resume never starts over and removes them.
    with pytest.raises(ConfigError, match=r"already holds a run with checkpoints; pass --resume auto"):
        find_resume_checkpoint(config, resume=None, output_dir=str(run_dir))
    _edit_meta(root / "epoch-000001", epoch=5)  # now no checkpoint is valid
    with pytest.raises(ConfigError, match=r"holds checkpoints but none is valid.*refusing to start a new run"):
        find_resume_checkpoint(config, resume="auto", output_dir=str(run_dir), log=lines.append)
    with pytest.raises(ConfigError, match=r"--resume .*epoch-000001: .*not a complete gard checkpoint: meta.json epoch = 5"):
        find_resume_checkpoint(config, resume=str(root / "epoch-000001"), output_dir=None)
    with pytest.raises(ConfigError, match=r"--resume .*nowhere: no such checkpoint or run directory"):
        find_resume_checkpoint(config, resume=str(tmp_path / "nowhere"), output_dir=None)
    assert find_resume_checkpoint(config, resume="never", output_dir=str(run_dir)) is None
    prepare_run_dir(config, str(run_dir), start_over=True)
    assert not root.exists() and (run_dir / "metrics.jsonl").read_text() == ""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"--output-dir .*afile' is a file, not a directory"):
        prepare_run_dir(config, str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"the run directory .*afile/run' cannot be written \(Not a directory\)"):
        prepare_run_dir(config, str(tmp_path / "afile" / "run"))
