"""The work-conserving floor of a run (benchmarks/epoch_floor.py): its arithmetic against hand-derived
values on the DDPO preset, and the unit costs measured on the real sampler and learner."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import epoch_floor  # noqa: E402

from cluster.config import load_config  # noqa: E402

DDPO = REPO / "configs" / "shapes_ddpo_heldout.yaml"


def test_the_floor_adds_training_sampling_and_evaluation_over_the_cores():
    config = load_config(DDPO)  # 30 epochs of 2 x 8 x 16 = 256 samples; evaluations before and after
    measured = {"config": config, "sample_s_per_trajectory": 0.040, "train_s_per_pair": 0.008,
                "pairs_per_sample": 10.0}
    result = epoch_floor.floor(measured, cores=2)
    # by hand: per epoch 256 x 0.040 = 10.24 s sampling, 256 x 10 x 0.008 = 20.48 s training;
    # 2 evaluations of (3 + 12 + 18) x 128 = 4224 images at 0.040 s = 337.92 s
    assert (result["epochs"], result["samples_per_epoch"], result["evaluations"], result["eval_images"]) == \
        (30, 256, 2, 4224)
    assert result["core_s"] == pytest.approx({"training": 614.4, "sampling": 307.2, "evaluation": 337.92})
    assert result["epoch_floor_s"] == pytest.approx((10.24 + 20.48) / 2)
    assert result["run_floor_min"] == pytest.approx((614.4 + 307.2 + 337.92) / 2 / 60)
    every_ten = epoch_floor.floor({**measured, "config": load_config(DDPO, ["evaluation.every=10"])}, cores=4)
    assert every_ten["evaluations"] == 4 and every_ten["epoch_floor_s"] == pytest.approx((10.24 + 20.48) / 4)


def test_unit_costs_come_from_the_real_sampler_and_learner():
    torch.set_num_threads(1)
    measured = epoch_floor.measure(DDPO, ["sampling.num_steps=2"], repeats=2)
    assert measured["pairs_per_sample"] == 2.0  # every step of each sample trained once
    assert all(math.isfinite(v) and v > 0 for v in (measured["sample_s_per_trajectory"], measured["train_s_per_pair"]))
