"""The shapes-world run on one device (benchmarks/gpu/shapes_on_device.py): its paired gain is the
hand-derived one, and its CPU mode runs the demo's job in one process without Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

from shapes_on_device import paired_gain  # noqa: E402


def test_paired_gain_is_the_mean_difference_over_the_same_images_with_its_standard_error():
    before = np.array([0, 1, 0, 1, 0], dtype=np.float32)
    after = np.array([1, 1, 0, 0, 1], dtype=np.float32)
    # differences 1, 0, 0, -1, 1: mean 0.2; sample variance (0.64 + 0.04 + 0.04 + 1.44 + 0.64) / 4 = 0.7
    g = paired_gain(before, after)
    assert g["before"] == pytest.approx(0.4) and g["after"] == pytest.approx(0.6) and g["n"] == 5
    assert g["gain"] == pytest.approx(0.2)
    assert g["se"] == pytest.approx(math.sqrt(0.7 / 5))


def test_one_epoch_on_the_cpu_reports_every_evaluation_set_on_the_same_images(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "shapes_on_device.py"), "--device", "cpu", "--out",
         str(tmp_path), "epochs=1", "evaluation.images_per_prompt=1"],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "shapes_on_device.json").read_text())
    assert result["ray_imported"] is False and result["device"] == "cpu"
    # the demo's three evaluation sets, one image per prompt: 3 yellow, 12 held-out, 18 seen prompts
    assert {name: g["n"] for name, g in result["gains"].items()} == {"yellow": 3, "heldout": 12, "seen": 18}
    assert len(result["epochs"]) == 1 and result["epochs"][0]["policy_version"] == 1
    assert 0.0 < result["epochs"][0]["reward_mean"] < 1.0  # the reward CLIP's cosine score
    for g in result["gains"].values():
        assert 0.0 <= g["before"] <= 1.0 and g["gain"] == pytest.approx(g["after"] - g["before"])
