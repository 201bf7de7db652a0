"""Run-directory sinks: metrics.jsonl, TensorBoard (scalars and evaluation grids), the optional W&B
logger (cluster/wandb_logger.py) and the reward curve.

A sink is any object with ``log(row, *, step)``, ``log_images(key, images, *, captions, step)`` and
``close()`` (``MetricsSink``); the writer hands every sink the same numeric scalars of a row under their
namespaced names (``train/loss``, ``eval/reward_mean``: TensorBoard groups by the part before the first
``/``) and the same images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from cluster.config import Config


def _clean(value):
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads as null
    return value


class MetricsWriteError(OSError):
    """A metrics row could not be written (a full disk, a quota); the file keeps only complete rows."""


def append_line(path: Path, line: str) -> None:
    """Appends ``line`` (one complete row, newline included) to ``path`` all or nothing.

    The row is written with ``os.write`` on an O_APPEND descriptor; when the write fails part-way (a
    disk that fills up takes some bytes, then raises ENOSPC) the file is cut back to its length before,
    so a reader never sees half a JSON line. Raises MetricsWriteError naming the file and the cause.
    """
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a short write is continued; the next one raises if the disk is full
                written += os.write(fd, data[written:])
        except BaseException as err:  # an OSError, or an interrupt between two partial writes
            os.ftruncate(fd, before)
            if not isinstance(err, OSError):
                raise
            raise MetricsWriteError(
                err.errno, f"could not append a row to {path}: {err.strerror or err}; the file was cut back to "
                f"its last complete row ({before} bytes). Free space (or fix the cause) and run again; a "
                f"training run continues from its newest checkpoint with --resume auto") from err
    finally:
        os.close(fd)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Replaces ``path`` with ``rows`` (one JSON object per line) all or nothing: written to a temporary
    file beside it, then renamed over it. Raises MetricsWriteError naming the file and the cause."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MetricsWriteError(err.errno, f"could not write {len(rows)} rows to {path}: {err.strerror or err}; "
                                           f"the file was left as it was") from err


class MetricsSink(Protocol):
    """Where the writer mirrors rows and images (TensorBoard, W&B, a test's recorder)."""

    def log(self, row: dict[str, float], *, step: int | None) -> None: ...

    def log_images(self, key: str, images: list[np.ndarray], *, captions: list[str], step: int) -> None: ...

    def close(self) -> None: ...


def row_scalars(row: dict) -> dict[str, float]:
    """The values a sink plots: numbers (bools as 0/1) under their namespaced names, without the step
    keys (``epoch``, ``step``) and without nulls (non-finite values, see _clean), strings or lists."""
    return {key: value for key, value in row.items()
            if isinstance(value, (int, float)) and key not in ("epoch", "step")}


def row_step(row: dict) -> int | None:
    """A row's x-axis value: its ``epoch`` (``gard train``) or ``step`` (``gard dpo``)."""
    return row.get("epoch", row.get("step"))


class TensorBoardSink:
    """Scalars and images into ``<run_dir>/tensorboard`` (one event file per process)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, float], *, step: int | None) -> None:
        for key, value in row.items():
            self._tb.add_scalar(key, value, global_step=step)
        self._tb.flush()  # a crash loses at most the row being written

    def log_images(self, key: str, images: list[np.ndarray], *, captions: list[str], step: int) -> None:
        # One tag per key (TensorBoard's image panel shows one image per tag and step): a second
        # image of the same key and step would hide the first, so several become key/0, key/1, ...
        for i, image in enumerate(images):
            self._tb.add_image(key if len(images) == 1 else f"{key}/{i}", image, global_step=step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors scalars and evaluation grids to
    TensorBoard (``tensorboard=True``) and to any further ``sinks`` (W&B: cluster/wandb_logger.py)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, sinks: list[MetricsSink] = ()):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.sinks: list[MetricsSink] = [TensorBoardSink(run_dir / "tensorboard")] if tensorboard else []
        self.sinks += list(sinks)

    def write(self, row: dict) -> None:
        """Appends one row (all or nothing: see append_line), then mirrors its scalars to the sinks at
        the row's epoch (or step)."""
        row = {k: _clean(v) for k, v in row.items()}
        append_line(self.path, json.dumps(row) + "\n")  # serialized in full before a byte is written
        self.rows.append(row)
        for sink in self.sinks:
            sink.log(row_scalars(row), step=row_step(row))

    def log_images(self, key: str, images: list[np.ndarray], *, captions: list[str], step: int) -> None:
        """uint8 [H, W, 3] images (an evaluation grid) to every sink under ``key`` at ``step``.

        W&B drops anything logged at a step lower than one it has seen, so a grid belongs after the
        rows of the steps before it: the driver logs the grid after N updates once row N - 1 is written."""
        for sink in self.sinks:
            sink.log_images(key, images, captions=captions, step=step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        plot_reward_curve(self.rows, self.run_dir / "reward_curve.png")


def open_writer(config: Config, *, run_dir: Path, resuming: bool) -> MetricsWriter:
    """The writer of a run as its ``logging`` section asks: TensorBoard (``logging.tensorboard``) and W&B
    (``logging.wandb`` unless ``logging.wandb_mode`` is ``disabled``); ``resuming`` continues the W&B run."""
    log = config.logging
    sinks = []
    if log.wandb and log.wandb_mode != "disabled":
        from cluster.wandb_logger import WandbLogger

        sinks.append(WandbLogger(run_dir=run_dir, project=log.wandb_project, mode=log.wandb_mode, name=config.name,
                                 config=config.to_dict(), resuming=resuming))
    return MetricsWriter(run_dir, tensorboard=log.tensorboard, sinks=sinks)


def reward_curve_points(rows: list[dict]) -> tuple[list[dict], list[tuple[int, float]]]:
    """(rows with a training reward, [(x, evaluation reward)]): the evaluation before the first update
    is drawn at x = 0, the one after epoch k's update at x = k + 1."""
    train = [r for r in rows if r.get("reward/mean") is not None]
    evals = [(0, r["eval/reward_mean_initial"]) for r in rows[:1] if r.get("eval/reward_mean_initial") is not None]
    evals += [(r["epoch"] + 1, r["eval/reward_mean"]) for r in rows if r.get("eval/reward_mean") is not None]
    return train, evals


def plot_reward_curve(rows: list[dict], path: Path) -> None:
    """Training reward mean ± std per epoch, with the evaluation reward where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = reward_curve_points(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        x = np.array([r["epoch"] for r in train])
        mean = np.array([r["reward/mean"] for r in train])
        std = np.array([r.get("reward/std") or 0.0 for r in train])
        ax.plot(x, mean, label="train reward (mean)")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if evals:
        ax.plot([e for e, _ in evals], [v for _, v in evals], "o-", label="eval reward (fixed set)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
