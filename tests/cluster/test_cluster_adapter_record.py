"""gard_adapter.json (cluster/adapter_record.py): every exported lora/ names the base model it was trained
on (as configured and as resolved), the trained networks' targets, ranks and alphas, the run, how far it
trained and gard's git commit when there is one; without git the record is still written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import cluster.adapter_record as adapter_record_module
from cluster.adapter_record import RECORD_FILE, adapter_record, git_commit, record_files
from cluster.checkpoint import load_checkpoint, write_checkpoint
from cluster.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _config(*overrides: str):
    return load_config(None, ["prompts.train=[a cat]", "name=shapes-clip", "policy.lora_rank=8",
                              "policy.lora_alpha=16", "policy.lora_targets=[to_q, to_v]", *overrides])


def test_the_record_names_the_base_model_the_adapters_and_the_progress(monkeypatch):
    monkeypatch.setattr(adapter_record_module, "git_commit", lambda: {"commit": "abc123", "dirty": False})
    config = _config("policy.train_targets=[unet, text_encoder]", "policy.text_encoder_lora_rank=2",
                     "policy.text_encoder_lora_targets=[q_proj]")
    record = adapter_record(config, pretrained="/models/tiny-sd", progress={"epoch": 12, "policy_version": 11})
    assert record == {
        "format": 1,
        "base_model": {"pretrained": "tiny:sd", "resolved": "/models/tiny-sd"},
        "init_adapter": None,
        "adapters": {"unet": {"rank": 8, "alpha": 16.0, "targets": ["to_q", "to_v"]},
                     "text_encoder": {"rank": 2, "alpha": 4.0, "targets": ["q_proj"]}},
        "run": "shapes-clip",
        "epoch": 12,
        "policy_version": 11,
        "gard_git": {"commit": "abc123", "dirty": False},
    }
    # Only the networks that were trained; offline DPO records its steps instead of epochs.
    unet_only = adapter_record(_config(), pretrained="org/model", progress={"dpo_steps": 100})
    assert list(unet_only["adapters"]) == ["unet"] and unet_only["dpo_steps"] == 100
    assert "epoch" not in unet_only and unet_only["base_model"]["resolved"] == "org/model"
    (name, data), = record_files(config, pretrained="/models/tiny-sd", progress={"epoch": 1, "policy_version": 1}).items()
    assert name == RECORD_FILE == "gard_adapter.json" and json.loads(data)["base_model"]["pretrained"] == "tiny:sd"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_the_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    found = git_commit()
    assert found["commit"] == head and isinstance(found["dirty"], bool)


def test_without_a_git_checkout_or_git_the_commit_is_null_and_the_record_is_written(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None  # not a repository

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit() is None
    record = json.loads(record_files(_config(), pretrained="p", progress={"epoch": 1, "policy_version": 1})[RECORD_FILE])
    assert record["gard_git"] is None and record["epoch"] == 1


def test_a_checkpoints_lora_directory_keeps_the_record_and_still_loads(tmp_path):
    files = {"pytorch_lora_weights.safetensors": b"x" * 10,
             **record_files(_config(), pretrained="/m", progress={"epoch": 2, "policy_version": 2})}
    path = write_checkpoint(tmp_path, epoch=2, learner_state={"version": 2}, lora_files=files,
                            driver_state={"rng": None}, metrics=[{"epoch": 0}, {"epoch": 1}], config={}, info={},
                            keep_last=3)
    assert json.loads((path / "lora" / RECORD_FILE).read_text())["policy_version"] == 2
    assert "lora/gard_adapter.json" in json.loads((path / "meta.json").read_text())["sha256"]
    assert load_checkpoint(path).epoch == 2  # the extra file is listed and checked like the others
