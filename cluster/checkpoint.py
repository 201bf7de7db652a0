"""Atomic run checkpoints: write, list, prune, find the newest valid one, load, check compatibility.

Layout of one checkpoint (``<run_dir>/checkpoints/epoch-000012/`` after 12 completed epochs)::

    lora/pytorch_lora_weights.safetensors   the adapter in diffusers format (pipe.load_lora_weights)
    learner.pt     adapter tensors by name, optimizer (AdamW moments, steps, lr), advantage
                   statistics, B² z-score history, policy version, the learner's RNG states
    driver.pt      the driver's RNG states
    metrics.jsonl  the metric rows of the completed epochs (a resumed run continues this file)
    config.yaml    the resolved config of the run
    meta.json      epoch, policy version, B² stage, counters, file sizes; written last

A checkpoint is written under a temporary name (``.tmp-...``) and renamed into place once complete,
so a crash mid-write leaves a directory that is never picked up: only ``epoch-NNNNNN`` directories
whose ``meta.json`` parses and whose files have the recorded sizes count as checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cluster.config import ConfigError, resume_safe_fields

CHECKPOINTS = "checkpoints"
FORMAT = 1
_NAME = re.compile(r"^epoch-(\d{6,})$")

# Config fields a resumed run may change: marked on the fields themselves (cluster/config.py).
RESUME_SAFE = resume_safe_fields()


@dataclass
class Checkpoint:
    """A loaded checkpoint (``load_checkpoint``)."""

    path: Path
    meta: dict
    learner_state: dict
    driver_state: dict
    metrics: list[dict]
    config: dict

    @property
    def epoch(self) -> int:
        """Completed epochs: the resumed run starts with this epoch index."""
        return int(self.meta["epoch"])


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, *, epoch: int, learner_state: dict, lora_files: dict[str, bytes],
                     driver_state: dict, metrics: list[dict], config: dict, info: dict, keep_last: int) -> Path:
    """Writes ``epoch-{epoch:06d}`` atomically, then keeps only the newest ``keep_last`` checkpoints.

    ``info`` (JSON-able: policy version, B² stage, counters) goes into meta.json.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    try:
        (tmp / "lora").mkdir(parents=True)
        for name, data in lora_files.items():
            (tmp / "lora" / name).write_bytes(data)
        torch.save(learner_state, tmp / "learner.pt")
        torch.save(driver_state, tmp / "driver.pt")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = {"format": FORMAT, "epoch": int(epoch), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence marks completeness
        _fsync_tree(tmp)
        if final.exists():  # the same epoch again (a resume from an older checkpoint): replace it
            trash = root / f".tmp-replaced-{final.name}-{time.time_ns()}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep_last=keep_last)
    return final


def is_valid(path: Path) -> bool:
    """A complete checkpoint: right name, meta.json of this format, every listed file at its size."""
    path = Path(path)
    if not path.is_dir() or not _NAME.match(path.name):
        return False
    try:
        meta = json.loads((path / "meta.json").read_text())
        return meta.get("format") == FORMAT and all(
            (path / name).is_file() and (path / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Valid checkpoints, oldest first (partial or foreign directories are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_valid(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, *, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` valid checkpoints, and leftovers of interrupted writes."""
    root = checkpoint_root(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        if f"-{os.getpid()}-" not in leftover.name:  # never a write of this process in flight
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Reads a checkpoint directory; a missing or partial one is a FileNotFoundError naming it, a damaged
    metrics.jsonl line a ConfigError naming the line."""
    path = Path(path)
    if not is_valid(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete gard checkpoint (expected a directory named epoch-NNNNNN with "
            f"meta.json and the files it lists, under <run_dir>/{CHECKPOINTS}/); pass --resume auto to pick the "
            f"newest valid one")
    meta = json.loads((path / "meta.json").read_text())
    metrics = _metric_rows(path)
    return Checkpoint(
        path=path,
        meta=meta,
        learner_state=torch.load(path / "learner.pt", weights_only=True, map_location="cpu"),
        driver_state=torch.load(path / "driver.pt", weights_only=True, map_location="cpu"),
        metrics=metrics,
        config=yaml.safe_load((path / "config.yaml").read_text()),
    )


def _metric_rows(path: Path) -> list[dict]:
    """The checkpoint's metrics.jsonl rows. Its size matched meta.json, so a line that is not a JSON
    object was damaged after the checkpoint was written: a ConfigError naming the file and the line,
    never rows silently dropped (the resumed run continues this history)."""
    rows = []
    for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            row, reason = None, f"{err.msg} at column {err.colno}"
        else:
            reason = f"a JSON {type(row).__name__}, not an object"
        if not isinstance(row, dict):
            raise ConfigError(
                f"checkpoint {str(path)!r} is damaged: line {number} of metrics.jsonl is not a metrics row "
                f"({reason}): {line[:80]!r}. Resume from another checkpoint (--resume <run_dir>/{CHECKPOINTS}/"
                f"epoch-NNNNNN) or start a new --output-dir")
        rows.append(row)
    return rows


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not (prefix == "" and key == "rewards"):
            out.update(_flatten(value, f"{path}."))
        elif isinstance(value, dict):  # rewards: compare each reward's options except its serve settings
            for name, options in value.items():
                for opt, v in (options or {}).items():
                    if opt != "serve":
                        out[f"rewards.{name}.{opt}"] = v
                out.setdefault(f"rewards.{name}", "configured")
        else:
            out[path] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``field: checkpoint value -> current value`` for every field that matters for resuming."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_SAFE):
            continue
        left, right = a.get(key, missing), b.get(key, missing)
        if left != right:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{key}: {show(left)} -> {show(right)}")
    return diffs


def check_compatible(checkpoint: Checkpoint, current: dict) -> None:
    """Refuses to resume a checkpoint written with a config that samples or trains differently."""
    diffs = config_differences(checkpoint.config, current)
    if diffs:
        listed = "; ".join(diffs[:12]) + (f"; and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"checkpoint {str(checkpoint.path)!r} was written with a different config, so it cannot be resumed "
            f"exactly: {listed}. Run with the checkpoint's values (its config.yaml) or use a new --output-dir "
            f"(only {', '.join(sorted({k.rstrip('.') for k in RESUME_SAFE}))} may change on resume)")
