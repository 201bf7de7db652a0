"""The prepared GPU device check, in its CPU mode: it runs, needs no Ray, and its numbers are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.plan import load_costs

REPO = Path(__file__).resolve().parents[2]


def test_device_check_cpu_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "device_check.py"), "--device", "cpu",
                           "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert "| first-step |rho-1|, same precision |" in proc.stdout
    assert result["ray_imported"] is False
    sampling, training, precision = result["sampling"], result["training"], result["precision"]
    assert sampling["finite"] and sampling["images_per_s"] > 0 and sampling["tflop_per_image"] > 0
    assert training["pairs"] == 4 * 6 and training["optimizer_steps"] == 4 and training["skipped_steps"] == 0
    assert training["tflop_per_pair"] > 0 and training["first_step_ratio_dev"] < 1e-4
    # The same precision on both sides: the ratio is 1; fp32 samplers beside a bf16 learner: it is not.
    assert all(v < 1e-4 for v in precision["first_step_ratio_dev_same_precision"].values())
    assert precision["first_step_ratio_dev_fp32_sampler"]["bf16"] > 1e-4
    assert precision["grad_cosine_to_fp32"]["fp16"] >= 0.99 and precision["grad_cosine_to_fp32"]["bf16"] >= 0.95
    checkpoint = result["checkpoint"]
    assert checkpoint["state_tensors_off_cpu"] == [] and checkpoint["adapter_restored_exactly"]
    assert checkpoint["moments_on"] == ["cpu"] and checkpoint["version"] == 1
    # The scale-out parts: a reward tower's cost, the group's collective, and the unit costs gard plan reads.
    reward, collective = result["reward"], result["collective"]
    assert reward["finite"] and reward["batch"] == 8 and reward["image_s"] > 0 and reward["gflop_per_image"] > 0
    assert collective["backend"] == "gloo" and collective["sum_correct"] and collective["closed"]
    costs = load_costs(tmp_path / "unit_costs.json")  # the file gard plan --costs takes
    assert costs.sample_transition_s == pytest.approx(sampling["seconds"] / (4 * 6))  # --batch 4, 6 steps
    large = sampling["large_batch"]
    assert large["batch"] == 8
    large_costs = load_costs(tmp_path / "unit_costs_large_batch.json")
    assert large_costs.sample_transition_s == pytest.approx(large["seconds"] / (8 * 6))
    # a trained pair: the PPO update's pair plus the KL reference's guided forward (one sampled transition)
    assert costs.train_pair_s == pytest.approx(1 / training["pairs_per_s"] + costs.sample_transition_s)
    assert costs.reward_image_s == pytest.approx(reward["image_s"])
    assert costs.publish_s > training["publish_s"]
