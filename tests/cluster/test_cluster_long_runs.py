"""Long runs on a real local Ray: stop + exact resume and extension against an uninterrupted
run, a sampler, the learner and the reward stage killed with SIGKILL mid-run (each run equals the
uninterrupted one), a learner that keeps dying, and the CLI's refusal of an incompatible checkpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cluster.checkpoint import list_checkpoints
from cluster.config import load_config
from cluster.driver import Driver
from cluster.run import prepare_run_dir, train
from cluster.stop import RunInterrupted, StopRequest
from tests.conftest import actor_pid as _pid

REPO = Path(__file__).resolve().parents[2]
EVAL_KEYS = ("eval/",)  # every metric of an evaluation (training reward per set, gold, diversity...)
COUNTER_KEYS = ("sampler/restarts", "sampler/resampled_batches", "sampler/restarts_total")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir: Path, *overrides: str):
    """The demo, synchronous (max_staleness 0: the exact-resume setting), small and quick."""
    return load_config(REPO / "configs" / "jpeg_demo.yaml", [
        f"cache_dir={cache_dir}", "logging.progress=false", "logging.tensorboard=false", "cluster.max_staleness=0",
        "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1", "checkpoint.every_epochs=1",
        "checkpoint.keep_last=2", *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _training(row: dict, *, drop: tuple[str, ...] = ()) -> dict:
    """A row without timings (they differ between two runs of the same computation) and without the keys
    starting with a prefix in ``drop``."""
    return {k: v for k, v in row.items() if not k.endswith("_s") and not k.startswith(drop)}


def _lora(run_dir: Path) -> dict[str, bytes]:
    """The adapter tensors' bytes (the file's JSON header holds peft's target-module set, in hash order)."""
    from safetensors.torch import load_file

    tensors = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


@pytest.fixture(scope="module")
def reference(ray_local, cache_dir, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return train(_config(cache_dir, "epochs=4"), output_dir=str(run_dir), log=lambda *_: None)


def test_stopped_resumed_and_extended_run_equals_the_uninterrupted_one(reference, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    stop = StopRequest()

    lines: list[str] = []

    def stop_after_first_epoch(line: str) -> None:
        lines.append(line)
        if line.startswith("epoch   0"):
            stop.request("test")

    # --resume auto in an empty run directory starts fresh, saying so.
    with pytest.raises(RunInterrupted, match=r"stopped by test after epoch 1 of 4; checkpoint .*epoch-000001"):
        train(_config(cache_dir, "epochs=4"), output_dir=str(run_dir), resume="auto", stop=stop,
              log=stop_after_first_epoch)
    assert any("no checkpoint in" in line and "starting fresh" in line for line in lines)
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-000001"]
    assert len(_rows(run_dir)) == 1

    # Resume to 2 epochs (a finished run), then extend the finished run to 4.
    lines.clear()
    train(_config(cache_dir, "epochs=2"), output_dir=str(run_dir), resume="auto", log=lines.append)
    assert any(line.startswith("resumed from") and "epoch-000001" in line for line in lines)
    train(_config(cache_dir, "epochs=4"), output_dir=str(run_dir), resume="auto", log=lambda *_: None)

    expected, rows = _rows(reference), _rows(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, expected, strict=True):
        # Epoch 1 ended the 2-epoch run, which evaluated there; everything trained is identical.
        drop = EVAL_KEYS if got["epoch"] == 1 else ()
        assert _training(got, drop=drop) == _training(want, drop=drop)
    assert rows[-1]["eval/reward_mean"] == expected[-1]["eval/reward_mean"]
    assert _lora(run_dir) == _lora(reference)  # the final adapter, bit for bit
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-000003", "epoch-000004"]
    lines.clear()  # a run that already has its epochs has nothing to do
    train(_config(cache_dir, "epochs=4"), output_dir=str(run_dir), resume="auto", log=lines.append)
    assert any("nothing to train" in line for line in lines)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_sampler_killed_mid_epoch_is_restarted_and_the_run_is_unchanged(reference, cache_dir, tmp_path):

    config = _config(cache_dir, "epochs=4")
    run_dir = prepare_run_dir(config, str(tmp_path / "run"))
    driver = Driver(config, run_dir=run_dir)
    pid = _pid(driver.samplers[0])
    lines: list[str] = []

    def kill_during_epoch_1(epoch: int, row: dict) -> None:
        if epoch == 0:  # epoch 1's batches were just submitted
            os.kill(pid, signal.SIGKILL)

    try:
        rows = driver.run(log=lines.append, on_epoch_end=kill_during_epoch_1)
        new_pid = _pid(driver.samplers[0])  # asked before shutdown() ends the run's samplers
    finally:
        driver.shutdown()
    assert sum(r["sampler/restarts"] for r in rows) == 1 and rows[-1]["sampler/restarts_total"] == 1
    assert any(line.startswith("sampler 0 died") for line in lines)
    assert new_pid != pid
    # Complete batches (never partial, never duplicated): every number equals the run without the kill.
    for got, want in zip(rows, _rows(reference), strict=True):
        assert got["reward/n_scored"] == config.samples_per_epoch
        assert _training(got, drop=COUNTER_KEYS) == _training(want, drop=COUNTER_KEYS)
    assert _lora(run_dir) == _lora(reference)


def test_cli_refuses_a_checkpoint_of_an_incompatible_config(reference, cache_dir, capsys):
    from cluster.cli import main

    code = main(["train", str(REPO / "configs" / "jpeg_demo.yaml"), f"cache_dir={cache_dir}", "cluster.max_staleness=0",
                 "sampling.batches_per_sampler=1", "evaluation.images_per_prompt=1", "epochs=6",
                 "train.learning_rate=0.5", "--output-dir", str(reference), "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "was written with a different config" in err and "train.learning_rate: 0.02 -> 0.5" in err


def _run_with(config, run_dir: Path, on_epoch_end) -> tuple[list[dict], list[str], Driver]:
    driver = Driver(config, run_dir=prepare_run_dir(config, str(run_dir)))
    lines: list[str] = []
    try:
        rows = driver.run(log=lines.append, on_epoch_end=lambda epoch, row: on_epoch_end(driver, epoch))
    finally:
        driver.shutdown()
    return rows, lines, driver


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_learner_killed_between_and_during_updates_is_restored_and_the_run_is_unchanged(reference, cache_dir,
                                                                                        tmp_path):
    config = _config(cache_dir, "epochs=4")
    pids = []

    def kill(driver: Driver, epoch: int) -> None:
        pids.append(_pid(driver.learner.actor))
        if epoch == 0:  # between updates: epoch 1's update reaches a restarted learner, which refuses it
            os.kill(pids[-1], signal.SIGKILL)
        if epoch == 1:  # queued ahead of epoch 2's update: the learner dies with that update in its queue
            driver.learner.actor.__ray_call__.remote(lambda self: (__import__("time").sleep(2), os._exit(1)))

    rows, lines, driver = _run_with(config, tmp_path / "run", kill)
    deaths = [line for line in lines if "the learner died during" in line]
    assert len(deaths) == 2 and driver.learner.restarts == 2, lines
    assert len(set(pids)) == 3  # three learner processes served the run
    # Every epoch applied exactly once, from the state it started from: the run equals the uninterrupted one.
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, _rows(reference), strict=True):
        assert _training(got) == _training(want)
    assert _lora(tmp_path / "run") == _lora(reference)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_a_hung_learner_is_killed_restored_and_the_run_is_unchanged(reference, cache_dir, tmp_path):
    """A learner that stays alive but never answers (here: asleep ahead of epoch 2's update) outlives the
    call timeout; it is killed, Ray starts it again, the snapshot is loaded and the update repeated."""
    config = _config(cache_dir, "epochs=4", "cluster.call_timeout_s=60")
    pids = []

    def hang(driver: Driver, epoch: int) -> None:
        pids.append(_pid(driver.learner.actor))
        if epoch == 1:
            driver.learner.actor.__ray_call__.remote(lambda self: __import__("time").sleep(600))

    rows, lines, driver = _run_with(config, tmp_path / "run", hang)
    hangs = [line for line in lines if line.startswith("gard: the learner")]
    assert len(hangs) == 1 and driver.learner.restarts == 1, lines
    assert "hung during the update" in hangs[0] and "cluster.call_timeout_s = 60 s" in hangs[0], hangs
    assert len(set(pids)) == 2  # the hung process was ended and another served epochs 2 and 3
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, _rows(reference), strict=True):
        assert _training(got) == _training(want)
    assert _lora(tmp_path / "run") == _lora(reference)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_reward_stage_killed_mid_epoch_is_restarted_and_the_run_is_unchanged(reference, cache_dir, tmp_path):
    config = _config(cache_dir, "epochs=4")
    pids = []

    def kill(driver: Driver, epoch: int) -> None:
        if epoch in (0, 2):  # the next epoch's batches were just submitted: their scoring dies with the stage
            pids.append(_pid(driver.reward_stage))
            os.kill(pids[-1], signal.SIGKILL)

    rows, _, driver = _run_with(config, tmp_path / "run", kill)
    assert len(set(pids)) == 2 and _pid(driver.reward_stage) not in pids
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, _rows(reference), strict=True):
        assert got["reward/n_scored"] == config.samples_per_epoch
        assert _training(got) == _training(want)
    assert _lora(tmp_path / "run") == _lora(reference)


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_a_learner_that_keeps_dying_stops_the_run_with_a_checkpoint(cache_dir, ray_local, tmp_path):
    from cluster.learner_handle import LearnerFailedError

    config = _config(cache_dir, "epochs=4", "cluster.max_actor_failures=1", "checkpoint.every_epochs=0")

    def kill(driver: Driver, epoch: int) -> None:
        if epoch == 1:
            os.kill(_pid(driver.learner.actor), signal.SIGKILL)

    with pytest.raises(LearnerFailedError, match=r"the learner died 1 times in a row .*cluster.max_actor_failures = 1"
                                                 r".*The run stopped after checkpoint .*epoch-000002"):
        _run_with(config, tmp_path / "run", kill)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["epoch-000002"]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
