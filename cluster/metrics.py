"""Run-directory sinks: metrics.jsonl, TensorBoard scalars, sample grids and the reward curve."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


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


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        """Appends one row (all or nothing: see append_line), then mirrors it to TensorBoard."""
        row = {k: _clean(v) for k, v in row.items()}
        append_line(self.path, json.dumps(row) + "\n")  # serialized in full before a byte is written
        self.rows.append(row)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(key, value, global_step=row.get("epoch", row.get("step")))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        plot_reward_curve(self.rows, self.run_dir / "reward_curve.png")


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


def save_grid(images: np.ndarray, path: Path, *, columns: int = 4) -> None:
    """uint8 [N, H, W, 3] -> one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
