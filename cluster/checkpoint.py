"""Atomic run checkpoints: write, list, prune, find the newest valid one, load, check compatibility.

Layout of one checkpoint (``<run_dir>/checkpoints/epoch-000012/`` after 12 completed epochs)::

    lora/pytorch_lora_weights.safetensors   the adapter in diffusers format (pipe.load_lora_weights)
    learner.pt     adapter tensors by name, optimizer (AdamW moments, steps, lr), advantage
                   statistics, B² z-score history, policy version, the learner's RNG states
    driver.pt      the driver's RNG states
    metrics.jsonl  the metric rows of the completed epochs (a resumed run continues this file)
    config.yaml    the resolved config of the run
    meta.json      epoch, policy version, B² stage, counters, file sizes and SHA-256s; written last

A checkpoint is written under a temporary name (``.tmp-...``) and renamed into place once complete,
so a crash mid-write leaves a directory that is never picked up: only ``epoch-NNNNNN`` directories
whose ``meta.json`` parses, names the same epoch and whose files have the recorded sizes and hashes
count as checkpoints; ``load_checkpoint`` also parses every file and names the first that does not.
"""

from __future__ import annotations

import hashlib
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
from cluster.eval_config import MOVED_KEYS

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
        listed = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in listed}
        meta = {"format": FORMAT, "epoch": int(epoch), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info, "files": files, "sha256": {str(f.relative_to(tmp)): _sha256(f) for f in listed}}
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, partial or corrupt (the message says which file
    and why)."""


def _meta_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, from its name, meta.json and file sizes (cheap: no
    tensor is read); None when it is one."""
    match = _NAME.match(path.name)
    if not path.is_dir() or not match:
        return "not a directory named epoch-NNNNNN"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "no meta.json (a write that did not finish)"
    except (OSError, ValueError) as err:
        return f"meta.json is unreadable ({err})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"meta.json is not of checkpoint format {FORMAT}"
    epoch, files = meta.get("epoch"), meta.get("files")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != int(match.group(1)):
        return f"meta.json epoch = {epoch!r} does not match the directory name (expected {int(match.group(1))})"
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()) or \
            not set(_REQUIRED) <= set(files):
        return f"meta.json files = {files!r} is not a mapping of the checkpoint's files to their sizes"
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or not of the recorded size {size} bytes"
    for name, digest in (meta.get("sha256") or {}).items():
        if _sha256(path / name) != digest:
            return f"{name} does not match its recorded SHA-256 (the file was changed or corrupted)"
    return None


_REQUIRED = ("learner.pt", "driver.pt", "metrics.jsonl", "config.yaml")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_valid(path: Path) -> bool:
    """A complete checkpoint: right name, meta.json of this format whose epoch matches the name, every
    listed file at its size and (checkpoints that record them) its SHA-256."""
    return _meta_problem(Path(path)) is None


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
    """Reads and checks a checkpoint directory; CheckpointError naming the file and the reason for a
    missing, partial or corrupt one."""
    path = Path(path)
    problem = _meta_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"{str(path)!r} is not a complete gard checkpoint: {problem} (expected a directory named epoch-NNNNNN "
            f"with meta.json and the files it lists, under <run_dir>/{CHECKPOINTS}/); pass --resume auto to pick "
            f"the newest valid one")
    meta = json.loads((path / "meta.json").read_text())

    def read(name: str, parse):
        try:
            return parse(path / name)
        except Exception as err:  # any parse failure of any file: the checkpoint is unusable, say why
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None

    tensors = lambda f: torch.load(f, weights_only=True, map_location="cpu")  # noqa: E731
    metrics = _metric_rows(path)
    if [row.get("epoch") if isinstance(row, dict) else None for row in metrics] != list(range(meta["epoch"])):
        raise CheckpointError(f"checkpoint {str(path)!r}: metrics.jsonl holds {len(metrics)} rows; expected one "
                              f"row per completed epoch 0..{meta['epoch'] - 1}")
    checkpoint = Checkpoint(path=path, meta=meta, learner_state=read("learner.pt", tensors),
                            driver_state=read("driver.pt", tensors), metrics=metrics,
                            config=read("config.yaml", lambda f: yaml.safe_load(f.read_text())))
    for name, value in (("learner.pt", checkpoint.learner_state), ("driver.pt", checkpoint.driver_state),
                        ("config.yaml", checkpoint.config)):
        if not isinstance(value, dict):
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} holds {type(value).__name__}, not a mapping")
    return checkpoint


def invalid_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """The ``epoch-NNNNNN`` directories of a run that are not checkpoints, each with the reason."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = ((p, _meta_problem(p)) for p in sorted(root.iterdir()) if _NAME.match(p.name))
    return [(p, problem) for p, problem in found if problem is not None]


def _metric_rows(path: Path) -> list[dict]:
    """The checkpoint's metrics.jsonl rows. Its size matched meta.json, so a line that is not a JSON
    object was damaged after the checkpoint was written: a CheckpointError naming the file and the line,
    never rows silently dropped (the resumed run continues this history)."""
    rows = []
    text = (path / "metrics.jsonl").read_bytes().decode("utf-8", errors="replace")  # damage shows as a bad line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            row, reason = None, f"{err.msg} at column {err.colno}"
        else:
            reason = f"a JSON {type(row).__name__}, not an object"
        if not isinstance(row, dict):
            raise CheckpointError(
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


def is_resume_safe(key: str) -> bool:
    """Whether dotted config path ``key`` may change on resume: it is, or lies under, a RESUME_SAFE path
    ("*" matches any one name, as in ``rewards.*.serve.``)."""
    parts = key.split(".")
    for safe in RESUME_SAFE:
        pattern = safe.rstrip(".").split(".")
        section = safe.endswith(".")
        if (len(parts) == len(pattern) or (section and len(parts) > len(pattern))) and all(
                p in ("*", k) for p, k in zip(pattern, parts, strict=False)):
            return True
    return False


def config_differences(saved: dict, current: dict) -> list[str]:
    """``field: checkpoint value -> current value`` for every field that matters for resuming."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if is_resume_safe(key) or key in MOVED_KEYS:  # moved keys were resume-safe where they were
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
