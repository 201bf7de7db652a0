"""Where metric rows and evaluation grids go besides metrics.jsonl (cluster/metrics.py, cluster/wandb_logger.py):
TensorBoard scalars keep their namespaces and the grids are one image tag at step = updates applied,
read back from the event file; any sink receives each row's scalars at step = epoch and the grids with
captions; the W&B logger maps onto wandb's calls (a stand-in module), keeps one W&B run across resumes
and, when wandb cannot be imported, stops the run with a ConfigError naming logging.wandb before anything
is written; with the real wandb offline, the run's transaction log, read back, holds the rows, the grid
and the stored run id."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cluster.config import ConfigError, load_config
from cluster.evaluation import EVAL_IMAGES, EvalResult, save_eval
from cluster.metrics import MetricsWriter, open_writer

BASE = ["prompts.train=[a cat, a dog]", "logging.progress=false"]


def _result(seed: int) -> EvalResult:
    rng = np.random.default_rng(seed)
    return EvalResult(mean=0.1 * seed, images=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8),
                      components={}, prompts=["a cat", "a cat", "a dog", "a dog"],
                      scores=rng.random(4).astype(np.float32), captions=None)


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "train/policy_version": epoch + 1,
            "reward/mean": 0.5 + epoch, "time/epoch_s": 2.0, "sampler/restarts": 0,
            "eval/reward_mean": 0.7 if epoch == 1 else float("nan"), "b2/train_interval": [4, 10], "note": "x"}


class Recorder:
    """An in-memory MetricsSink: every call, in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def log(self, row, *, step):
        self.calls.append(("log", dict(row), step))

    def log_images(self, key, images, *, captions, step):
        self.calls.append(("images", key, [np.array(i) for i in images], list(captions), step))

    def close(self):
        self.calls.append(("close",))


def test_tensorboard_scalars_keep_their_namespaces_and_the_eval_grids_are_one_image_tag(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = MetricsWriter(tmp_path, tensorboard=True)
    save_eval(_result(0), run_dir=tmp_path, updates=0, writer=writer)  # the base model, before the first row
    writer.write(_row(0))
    writer.write(_row(1))
    save_eval(_result(2), run_dir=tmp_path, updates=2, writer=writer)  # after epoch 1's update
    writer.close()

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert sorted(tags["scalars"]) == ["eval/reward_mean", "reward/mean", "sampler/restarts", "time/epoch_s",
                                       "train/loss", "train/policy_version"]  # namespaced as in the rows
    assert {tag.split("/")[0] for tag in tags["scalars"]} == {"eval", "reward", "sampler", "time", "train"}
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(0, 0.5), (1, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/reward_mean")] == [(1, pytest.approx(0.7))]  # NaN not logged
    assert tags["images"] == [EVAL_IMAGES] == ["eval/samples"]
    events = acc.Images(EVAL_IMAGES)
    assert [e.step for e in events] == [0, 2]
    for event, updates in zip(events, (0, 2), strict=True):  # the very grid of the labelled PNG file
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        with Image.open(tmp_path / "samples" / f"eval_epoch{updates:04d}.png") as png:
            assert np.array_equal(logged, np.asarray(png))
        assert (event.width, event.height) == logged.shape[1::-1]


def test_a_sink_gets_each_rows_scalars_at_its_epoch_and_the_grids_with_captions(tmp_path):
    recorder = Recorder()
    writer = MetricsWriter(tmp_path, tensorboard=False, sinks=[recorder])
    save_eval(_result(0), run_dir=tmp_path, updates=0, writer=writer)
    writer.write(_row(0))
    writer.write(_row(1))
    save_eval(_result(2), run_dir=tmp_path, updates=2, writer=writer)
    writer.write({"step": 10, "dpo/loss": np.float32(0.25)})  # gard dpo rows have a step, not an epoch
    writer.close()

    kinds = [(c[0], c[-1]) for c in recorder.calls[:-1]]
    assert kinds == [("images", 0), ("log", 0), ("log", 1), ("images", 2), ("log", 10)]
    assert recorder.calls[-1] == ("close",)
    assert [s for _, s in kinds] == sorted(s for _, s in kinds)  # steps never go back (W&B drops lower ones)
    assert recorder.calls[1][1] == {"train/loss": 1.0, "train/policy_version": 1, "reward/mean": 0.5,
                                    "time/epoch_s": 2.0, "sampler/restarts": 0}  # no epoch, NaN, list or text
    assert recorder.calls[2][1]["eval/reward_mean"] == 0.7
    assert recorder.calls[4][1] == {"dpo/loss": 0.25}
    _, key, images, captions, _ = recorder.calls[3]
    with Image.open(tmp_path / "samples" / "eval_epoch0002.png") as png:
        assert key == "eval/samples" and len(images) == 1 and np.array_equal(images[0], np.asarray(png))
    assert captions == ["after 2 updates: eval reward 0.2 over 4 samples of 2 prompts (a cat; a dog)"]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]] == [0, 1]


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(calls: list) -> types.ModuleType:
    """A stand-in for the wandb module that records what WandbLogger asks of it (wandb is optional)."""
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls)

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    module.init, module.Image = init, Image
    return module


def test_the_wandb_logger_logs_rows_at_their_epoch_and_keeps_one_run_across_resumes(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    config = load_config(None, [*BASE, "name=shapes", "logging.wandb=true", "logging.wandb_project=gard-tests",
                                "logging.tensorboard=false"])
    writer = open_writer(config, run_dir=tmp_path, resuming=False)
    writer.write(_row(0))
    save_eval(_result(1), run_dir=tmp_path, updates=1, writer=writer)
    writer.close()

    (_, init), (_, row, step), (_, images, image_step), finish = calls
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert init == {"project": "gard-tests", "name": "shapes", "mode": "offline", "dir": str(tmp_path),
                    "config": config.to_dict(), "id": run_id, "resume": "allow"}
    assert step == 0 and row["reward/mean"] == 0.5 and "epoch" not in row
    assert image_step == 1 and list(images) == ["eval/samples"]
    (image,) = images["eval/samples"]
    assert image.caption.startswith("after 1 update: eval reward 0.1") and image.data.ndim == 3
    assert finish == ("finish",)

    calls.clear()  # a resumed gard run continues the W&B run; a fresh start in the same directory does not
    open_writer(config, run_dir=tmp_path, resuming=True).close()
    assert calls[0][1]["id"] == run_id
    calls.clear()
    open_writer(config, run_dir=tmp_path, resuming=False).close()
    assert calls[0][1]["id"] != run_id


def test_wandb_mode_disabled_starts_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even imported
    config = load_config(None, [*BASE, "logging.wandb=true", "logging.wandb_mode=disabled", "logging.tensorboard=false"])
    writer = open_writer(config, run_dir=tmp_path, resuming=False)
    assert writer.sinks == [] and not (tmp_path / "wandb_run_id").exists()


def test_without_wandb_installed_the_run_stops_with_a_config_error_before_writing_anything(tmp_path, monkeypatch):
    from cluster.run import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    config = load_config(None, [*BASE, "logging.wandb=true"])
    with pytest.raises(ConfigError) as info:
        open_writer(config, run_dir=tmp_path, resuming=False)
    message = str(info.value)
    assert message.startswith("logging.wandb = true, but the wandb package cannot be imported")
    assert "pip install wandb" in message and "logging.wandb=false" in message
    with pytest.raises(ConfigError, match=r"^logging.wandb = true, but the wandb package cannot be imported"):
        train(config, output_dir=str(tmp_path / "run"), log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # stopped before the run directory (and Ray)


# The real wandb (a dev extra) in offline mode, with everything that could reach a network turned off: no
# login, no git or code capture, no system metrics, metadata or cloud-machine probes, no error reports,
# no console capture (pytest's own); its settings, cache and data directories are under tmp_path.
OFFLINE_WANDB_ENV = {
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false", "WANDB__DISABLE_STATS": "true",
    "WANDB__DISABLE_META": "true", "WANDB__DISABLE_MACHINE_INFO": "true", "WANDB__SAVE_REQUIREMENTS": "false",
}


def test_real_wandb_offline_run_holds_the_rows_and_the_grid_and_a_resume_continues_it(tmp_path, monkeypatch):
    """wandb 0.31 offline: the service (wandb-core) writes <run_dir>/wandb/offline-run-<time>-<id>/ with the
    transaction log run-<id>.wandb (what `wandb sync` uploads) and files/media/ with the images; read back,
    it holds the rows at step = epoch, the grid under eval/samples and the id from <run_dir>/wandb_run_id,
    and a resumed gard run writes a second offline run directory under the same id."""
    wandb = pytest.importorskip("wandb")
    for name, value in OFFLINE_WANDB_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = load_config(None, [*BASE, "name=shapes", "logging.wandb=true", "logging.wandb_project=gard-tests",
                                "logging.tensorboard=false"])
    try:
        writer = open_writer(config, run_dir=tmp_path, resuming=False)
        writer.write(_row(0))
        writer.write(_row(1))
        save_eval(_result(2), run_dir=tmp_path, updates=2, writer=writer)  # after epoch 1's update
        writer.close()
        run_id = (tmp_path / "wandb_run_id").read_text().strip()
        (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
        records = _offline_records(first / f"run-{run_id}.wandb")

        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.project, run.display_name) == (run_id, "gard-tests", "shapes")
        assert json.loads(next(u.value_json for u in run.config.update if u.key == "name")) == "shapes"
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        by_step = {row["_step"]: row for row in history}
        assert len(history) == 3 and sorted(by_step) == [0, 1, 2]  # step = epoch; the grid at updates applied
        assert [by_step[s]["reward/mean"] for s in (0, 1)] == [0.5, 1.5]
        assert [by_step[s]["train/loss"] for s in (0, 1)] == [1.0, 0.5]
        assert by_step[1]["eval/reward_mean"] == 0.7 and "eval/reward_mean" not in by_step[0]  # NaN not logged
        assert not {"epoch", "note", "b2/train_interval"} & set(by_step[0])
        grid = {key.removeprefix("eval/samples/"): value for key, value in by_step[2].items()
                if key.startswith("eval/samples/")}
        assert grid["_type"] == "images/separated" and grid["count"] == 1
        assert grid["captions"] == ["after 2 updates: eval reward 0.2 over 4 samples of 2 prompts (a cat; a dog)"]
        (media,) = grid["filenames"]
        png_path = tmp_path / "samples" / "eval_epoch0002.png"
        with Image.open(first / "files" / media) as logged, Image.open(png_path) as png:
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(png))

        open_writer(config, run_dir=tmp_path, resuming=True).close()  # a resumed gard run: the same W&B run
        assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
        # W&B names an offline run's directory by its start time to the second; a resume started within the
        # same second as the first run gets that name with "-1" appended, which sorts after it
        first_dir, latest = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))
        assert first_dir == first  # the first run's log is left where it was
        resumed = [r.run for r in _offline_records(latest / f"run-{run_id}.wandb")
                   if r.WhichOneof("record_type") == "run"][-1]
        assert resumed.run_id == run_id and resumed.resume
        assert resumed.start_time.ToNanoseconds() > run.start_time.ToNanoseconds()
    finally:
        wandb.teardown()  # stops the wandb-core service process now, not at the end of the session


def _offline_records(path) -> list:
    """The records (``wandb.proto.wandb_internal_pb2.Record``) of an offline W&B transaction log.

    wandb 0.31 has no Python reader for it (wandb-core writes and syncs it): a LevelDB-style log, a 7-byte
    header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of
    type byte + data, length: 2 bytes little-endian, type: 1 full, 2 first, 3 middle, 4 last) and its data;
    a block's tail shorter than a chunk header is padding. A full or first-to-last run of chunks is one
    serialized Record."""
    import zlib

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[6] == 0, f"not a version-0 W&B transaction log: {data[:7]!r}"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length = int.from_bytes(data[pos : pos + 4], "little"), int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path.name}: bad chunk checksum before byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
