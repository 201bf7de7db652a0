"""Graceful stop and reward outages on a real local Ray + Serve: SIGTERM to a running
``gard train`` (a second driver on this test's cluster) leaves a valid checkpoint and no Serve
applications; a reward that stays down stops the run with a clear error after a checkpoint."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.checkpoint import latest_checkpoint, load_checkpoint
from cluster.config import load_config
from cluster.errors import RewardDownError
from cluster.run import train
from tests.conftest import start_local_ray

REPO = Path(__file__).resolve().parents[2]
SMALL = ["logging.progress=false", "logging.tensorboard=false", "cluster.max_staleness=0",
         "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1", "checkpoint.every_epochs=0",
         "reward_service.backend=serve", "rewards.jpeg_compressibility.serve={num_cpus: 0.1}"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import serve

    start_local_ray()
    yield ray.get_runtime_context().gcs_address
    serve.shutdown()
    ray.shutdown()


def _reward_apps() -> list[str]:
    from ray import serve

    try:
        return [name for name in serve.status().applications if name.startswith("reward-")]
    except Exception:  # noqa: BLE001 - Serve never started
        return []


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read on a thread so the test never blocks on a silent process."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_sigterm_to_gard_train_leaves_a_checkpoint_and_no_serve_apps(ray_cluster, tmp_path, free_port):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cluster", "train", str(REPO / "configs" / "jpeg_demo.yaml"), *SMALL, "epochs=50",
           f"cache_dir={tmp_path / 'cache'}", f"reward_service.http_port={free_port}", f"cluster.address={ray_cluster}",
           "--output-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        lines = _lines(proc)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = lines.get(timeout=300)
            if line is None:
                break
            output.append(line)
            if line.startswith("epoch   0"):
                break
        assert output and output[-1].startswith("epoch   0"), "".join(output)
        assert _reward_apps() == ["reward-jpeg_compressibility"]
        proc.send_signal(signal.SIGTERM)
        while (line := lines.get(timeout=300)) is not None:
            output.append(line)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(output)
    assert proc.returncode == 143, text
    assert "SIGTERM received: finishing the current epoch" in text
    assert "gard: stopped by SIGTERM after epoch" in text and "--resume auto" in text
    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    assert checkpoint.epoch >= 1 and checkpoint.meta["policy_version"] == checkpoint.epoch
    assert [row["epoch"] for row in checkpoint.metrics] == list(range(checkpoint.epoch))
    assert _reward_apps() == []  # removed before exiting


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_a_reward_that_stays_down_stops_the_run_after_a_checkpoint(ray_cluster, tmp_path, free_port):
    from ray import serve

    config = load_config(REPO / "configs" / "jpeg_demo.yaml", [
        *SMALL, "epochs=8", f"cache_dir={tmp_path / 'cache'}", f"reward_service.http_port={free_port}",
        "reward_service.timeout_s=5", "reward_service.max_retries=1", "reward_service.retry_backoff_s=0.2",
        "reward_service.down_timeout_s=3"])

    def take_the_reward_down(line: str) -> None:
        if line.startswith("epoch   0"):
            serve.delete("reward-jpeg_compressibility")

    run_dir = tmp_path / "run"
    with pytest.raises(RewardDownError, match=r"reward 'jpeg_compressibility' failed .*reward_service.down_timeout_s"
                                              r".*The run stopped after checkpoint .*epoch-0000"):
        train(config, output_dir=str(run_dir), log=take_the_reward_down)
    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    assert 1 <= checkpoint.epoch < 8
    # Every trained epoch had a complete, finite reward for every sample: nothing silently zero or missing.
    for row in checkpoint.metrics:
        assert row["reward/n_scored"] == config.samples_per_epoch and row["reward/nonfinite"] == 0
        assert np.isfinite(row["reward/mean"]) and row["reward/mean"] != 0
    assert _reward_apps() == []
