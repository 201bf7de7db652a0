"""The manifest of a built model directory: every file's sha256 and size, so a loader can tell an intact
build from a partial, stale or edited one before diffusers reads it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
# The shipped build of the shapes world's pipeline (``resolve_pretrained("tiny:shapes")``).
SHAPES_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "shapes"
# The shipped reward model of the shapes world (``clip_score`` with ``model: tiny:shapes-clip``).
SHAPES_CLIP_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "shapes-clip"
# The shipped captioner of the shapes world (``llava_bertscore`` with ``model: tiny:shapes-llava``).
SHAPES_LLAVA_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "shapes-llava"
REBUILD = "python -m testbed.build --out DIR (or `gard testbed build`)"


class ManifestError(RuntimeError):
    """A model directory that does not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | Path) -> Path:
    """Writes ``manifest.json`` listing each file under ``directory`` (relative path, sha256, bytes)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in _files(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    return path


def check_manifest(directory: str | Path) -> None:
    """Raises ManifestError naming the first missing, changed or unlisted file of ``directory``."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}, so it is not a complete shapes-world build; "
                            f"build the models with `{REBUILD}`.")
    listed = json.loads(path.read_text())["files"]
    for name, entry in listed.items():
        file = directory / name
        if not file.is_file():
            raise ManifestError(f"{file} is listed in {path} but missing; the build is incomplete. "
                                f"Rebuild with `{REBUILD}`.")
        size = file.stat().st_size
        if size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise ManifestError(f"{file} does not match {path} (size {size} bytes, expected {entry['bytes']}, "
                                f"or a different sha256): it was modified or partly written. Rebuild with "
                                f"`{REBUILD}`.")
    extra = [p.relative_to(directory).as_posix() for p in _files(directory)
             if p.relative_to(directory).as_posix() not in listed]
    if extra:
        raise ManifestError(f"{directory} holds files its manifest does not list ({extra[:5]}); the directory "
                            f"mixes builds. Rebuild with `{REBUILD}`.")
