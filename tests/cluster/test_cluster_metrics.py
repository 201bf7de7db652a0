"""Run-directory sinks of cluster/metrics.py: metrics.jsonl rows read back exactly (non-finite floats as
null, numpy scalars as Python numbers), rows written all or nothing when the disk fills up mid-row, the
TensorBoard mirror, the reward curve and sample grids."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cluster.metrics as metrics_module
from cluster.grids import save_grid
from cluster.metrics import MetricsWriteError, MetricsWriter, plot_reward_curve, write_rows


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_appended_one_json_object_per_line_in_order(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    rows = [{"epoch": e, "reward_mean": 0.5 * e, "note": f"e{e}"} for e in range(3)]
    for i, row in enumerate(rows):
        writer.write(row)
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == i + 1  # written at once, not on close

    lines = (tmp_path / "metrics.jsonl").read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 4  # newline-terminated, one line per row
    assert [json.loads(line) for line in lines[:-1]] == rows
    assert writer.rows == rows
    assert not (tmp_path / "tensorboard").exists()
    assert not (tmp_path / "reward_curve.png").exists()  # only close() plots


def test_non_finite_floats_become_null_and_numpy_scalars_python_numbers(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"epoch": np.int64(4), "nan": float("nan"), "inf": math.inf, "ninf": -math.inf,
                  "np_nan": np.float32("nan"), "np_inf": np.float64("inf"), "f32": np.float32(1.5),
                  "f64": np.float64(0.25), "i32": np.int32(-7), "flag": True, "none": None, "text": "ok",
                  "zero": 0.0})

    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    row = json.loads(text)
    assert row == {"epoch": 4, "nan": None, "inf": None, "ninf": None, "np_nan": None, "np_inf": None,
                   "f32": 1.5, "f64": 0.25, "i32": -7, "flag": True, "none": None, "text": "ok", "zero": 0.0}
    assert type(row["epoch"]) is int and type(row["i32"]) is int and type(row["f32"]) is float
    # The in-memory rows hold the same cleaned values (Python types), not the originals.
    assert writer.rows == [row]
    assert type(writer.rows[0]["epoch"]) is int and type(writer.rows[0]["f32"]) is float


def test_writer_appends_to_an_existing_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "reward_mean": 1.0}) + "\n")
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"epoch": 1, "reward_mean": 2.0})
    assert _read(tmp_path / "metrics.jsonl") == [{"epoch": 0, "reward_mean": 1.0}, {"epoch": 1, "reward_mean": 2.0}]
    assert writer.rows == [{"epoch": 1, "reward_mean": 2.0}]  # a resuming driver restores rows itself


def test_a_row_cut_short_by_a_full_disk_is_removed_and_named_in_the_error(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"epoch": 0, "reward/mean": 1.0})
    before = path.read_bytes()
    row = {"epoch": 1, "reward/mean": 2.0, "note": "x" * 40}
    line = (json.dumps(row) + "\n").encode()
    real_write, calls = os.write, []

    def filling_disk(fd, data):  # what a disk that fills up does: takes 10 bytes, then refuses the rest
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", filling_disk)
    with pytest.raises(MetricsWriteError) as info:
        writer.write(row)
    monkeypatch.undo()

    assert calls == [len(line), len(line) - 10]  # the short write was continued once, then failed
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left on device" in str(info.value)
    assert f"cut back to its last complete row ({len(before)} bytes)" in str(info.value)
    assert path.read_bytes() == before  # not a byte of the failed row is left
    assert writer.rows == [{"epoch": 0, "reward/mean": 1.0}]  # nor is it in memory
    # Once there is space again the next row follows the complete ones.
    writer.write(row)
    assert _read(path) == [{"epoch": 0, "reward/mean": 1.0}, row] and len(writer.rows) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE short writes as on Linux")
def test_a_file_size_limit_hit_mid_row_leaves_only_complete_lines(tmp_path):
    """A real short write: the kernel writes up to RLIMIT_FSIZE, then refuses with EFBIG."""
    script = f"""
import resource, signal
from pathlib import Path
import cluster.metrics as metrics_module
from cluster.metrics import MetricsWriteError, MetricsWriter
writer = MetricsWriter(Path({str(tmp_path)!r}), tensorboard=False)
writer.write({{"epoch": 0}})  # 13 bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed instead of write() failing
resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))
try:
    writer.write({{"epoch": 1, "note": "{'y' * 60}"}})
except MetricsWriteError as err:
    print(err.errno, len(writer.rows))
"""
    root = str(Path(metrics_module.__file__).resolve().parents[1])  # the repository, importable in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.EFBIG), "1"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 0}\n'


def test_write_rows_replaces_the_file_or_leaves_it_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1')  # a damaged last line: replaced, not continued
    write_rows(path, [{"epoch": 0}, {"epoch": 1}])
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'

    def refuse(src, dst):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(MetricsWriteError, match=r"could not write 3 rows to .*metrics.jsonl: Disk quota exceeded"):
        write_rows(path, [{"epoch": e} for e in range(3)])
    assert path.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left

def test_close_writes_the_reward_curve_png_from_the_rows(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for epoch in range(4):
        writer.write({"epoch": epoch, "reward/mean": float(epoch), "reward/std": 0.5 if epoch else None,
                      "eval/reward_mean": 1.0 + epoch if epoch % 2 == 0 else float("nan")})
    writer.close()

    with Image.open(tmp_path / "reward_curve.png") as image:
        assert image.format == "PNG" and image.size == (600, 400)  # figsize 6 x 4 in at 100 dpi


def test_reward_curve_plots_rows_without_rewards_and_creates_no_other_files(tmp_path):
    path = tmp_path / "curve.png"
    plot_reward_curve([{"epoch": 0, "reward/mean": None}, {"epoch": 1, "eval/reward_mean": 0.3}], path)
    with Image.open(path) as image:
        assert image.size == (600, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_reward_curve_includes_the_evaluation_before_training_at_epoch_zero():
    from cluster.metrics import reward_curve_points

    rows = [{"epoch": 0, "reward/mean": 1.0, "eval/reward_mean_initial": 0.2},
            {"epoch": 1, "reward/mean": 2.0, "eval/reward_mean": 0.5}, {"epoch": 2, "reward/mean": None}]
    train, evals = reward_curve_points(rows)
    assert [r["epoch"] for r in train] == [0, 1]
    assert evals == [(0, 0.2), (2, 0.5)]  # before the first update, then after epoch 1's update


def test_tensorboard_mirrors_numeric_scalars_by_epoch(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"epoch": 0, "reward_mean": 0.5, "loss": np.float32(2.0), "skipped": float("nan"), "tag": "x"})
    writer.write({"epoch": 1, "reward_mean": 0.75, "loss": 1.0, "skipped": 3, "tag": "y"})
    writer.close()

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "reward_mean", "skipped"]  # not epoch, not strings
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(0, 0.5), (1, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 2.0), (1, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("skipped")] == [(1, 3.0)]  # the NaN (null) was not logged
    assert (tmp_path / "reward_curve.png").exists()


def _images(n: int, h: int, w: int) -> np.ndarray:
    """Image i is filled with the value 10 * (i + 1), so every cell of a grid can be identified."""
    return np.stack([np.full((h, w, 3), 10 * (i + 1), dtype=np.uint8) for i in range(n)])


def test_save_grid_lays_out_images_row_major_with_white_padding(tmp_path):
    path = tmp_path / "samples" / "epoch_3.png"  # the parent directory is created
    save_grid(_images(5, 8, 6), path, columns=3)

    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (3 * 6, 2 * 8)  # (width, height)
        grid = np.asarray(image)
    for i in range(5):
        r, c = divmod(i, 3)
        assert (grid[r * 8 : (r + 1) * 8, c * 6 : (c + 1) * 6] == 10 * (i + 1)).all()
    assert (grid[8:16, 12:18] == 255).all()  # the sixth cell is empty: white


@pytest.mark.parametrize(("n", "columns", "size"), [
    (4, 4, (4 * 5, 5)),  # one full row
    (2, 4, (2 * 5, 5)),  # fewer images than columns: only as wide as the images
    (7, 2, (2 * 5, 4 * 5)),  # ceil(7 / 2) rows
    (3, 0, (5, 3 * 5)),  # at least one column
])
def test_save_grid_pixel_size_for_n_images_and_columns(tmp_path, n, columns, size):
    save_grid(_images(n, 5, 5), tmp_path / "grid.png", columns=columns)
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == size
