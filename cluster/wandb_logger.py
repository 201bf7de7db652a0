"""The optional Weights & Biases sink (``logging.wandb: true``): every metrics row at step = its epoch
(``step`` for ``gard dpo``), and each evaluation grid as a ``wandb.Image`` with a caption.

wandb is not a runtime dependency of gard (the dev extras install it for the tests): it is imported
only when the option is on, and a missing or broken installation is a ConfigError naming
``logging.wandb`` and how to install it, raised before the run starts (``require_wandb`` in the
pre-flight checks).

``logging.wandb_mode``: ``offline`` (the default) writes the W&B run under ``<run_dir>/wandb`` (one
``offline-run-<time>-<id>`` directory per start), to upload later with ``wandb sync``; ``online``
streams it (``wandb login`` first); ``disabled`` starts no W&B run. A resumed gard run continues the
same W&B run: its id is kept in ``<run_dir>/wandb_run_id``. W&B ignores values logged at a step lower
than the last one it has seen, so after a resume from a checkpoint older than the last logged epoch
the re-run epochs are in metrics.jsonl and TensorBoard, not in W&B.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import numpy as np

from cluster.config import ConfigError

RUN_ID_FILE = "wandb_run_id"


def require_wandb():
    """The wandb module; a ConfigError naming ``logging.wandb`` when it cannot be imported."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            f"logging.wandb = true, but the wandb package cannot be imported in this Python environment "
            f"({sys.executable}: {type(err).__name__}: {err}); install it there with `pip install wandb`, or set "
            f"logging.wandb=false (metrics.jsonl and TensorBoard need no extra package)") from None
    return wandb


def run_id(run_dir: Path, *, resuming: bool) -> str:
    """The W&B run id of ``run_dir``: the stored one when resuming, else a new one (stored)."""
    path = run_dir / RUN_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new = secrets.token_hex(4)  # W&B ids are short lowercase alphanumerics
    path.write_text(new + "\n")
    return new


class WandbLogger:
    """A MetricsSink (cluster/metrics.py) writing to one W&B run."""

    def __init__(self, *, run_dir: Path, project: str, mode: str, name: str, config: dict, resuming: bool):
        self._wandb = require_wandb()
        self._run = self._wandb.init(project=project, name=name, mode=mode, dir=str(run_dir), config=config,
                                     id=run_id(run_dir, resuming=resuming), resume="allow")

    def log(self, row: dict[str, float], *, step: int | None) -> None:
        self._run.log(row, step=step)

    def log_images(self, key: str, images: list[np.ndarray], *, captions: list[str], step: int) -> None:
        self._run.log({key: [self._wandb.Image(image, caption=caption)
                             for image, caption in zip(images, captions, strict=True)]}, step=step)

    def close(self) -> None:
        self._run.finish()
