"""``gard_adapter.json``: what an exported LoRA directory was trained on, written beside its weights.

A diffusers LoRA file holds the adapter's tensors and ``LoraConfig``, not the base model: an adapter
applied to another base loads without complaint and draws nonsense. So every ``lora/`` gard writes (the
run's final adapter, each checkpoint's, ``gard dpo``'s) carries this record: the base model as
configured (``policy.pretrained``) and as resolved (the local pipeline directory, or the hub id), the
starting adapter if any, each trained network's LoRA targets, rank and alpha, the run's name, how far
it had trained (epoch and policy version, or offline DPO steps) and gard's git commit when gard runs
from a git checkout (null otherwise, e.g. a ``ray job submit`` working directory without ``.git``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cluster.config import Config

RECORD_FILE = "gard_adapter.json"
FORMAT = 1
_REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = _REPO) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout gard runs from, or None when there is none (no
    git, not a repository, a timeout): the record is best effort and never stops an export."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(status.strip())} if sha else None


def adapter_record(config: Config, *, pretrained: str, progress: dict[str, int]) -> dict:
    """The record of an adapter trained from ``config`` on ``pretrained`` (the resolved base model), with
    ``progress``: ``{"epoch": completed epochs, "policy_version": v}`` or ``{"dpo_steps": n}``."""
    pol = config.policy
    networks = {
        "unet": {"rank": pol.lora_rank, "alpha": pol.lora_alpha, "targets": list(pol.lora_targets)},
        "text_encoder": {"rank": pol.text_encoder_lora_rank, "alpha": pol.text_encoder_lora_alpha,
                         "targets": list(pol.text_encoder_lora_targets)},
    }
    return {
        "format": FORMAT,
        "base_model": {"pretrained": pol.pretrained, "resolved": pretrained},
        "init_adapter": pol.init_adapter,
        "adapters": {name: networks[name] for name in pol.train_targets},
        "run": config.name,
        **{key: int(value) for key, value in progress.items()},
        "gard_git": git_commit(),
    }


def record_files(config: Config, *, pretrained: str, progress: dict[str, int]) -> dict[str, bytes]:
    """``{RECORD_FILE: JSON bytes}``, to add to the files of a LoRA directory."""
    record = adapter_record(config, pretrained=pretrained, progress=progress)
    return {RECORD_FILE: (json.dumps(record, indent=1) + "\n").encode()}
