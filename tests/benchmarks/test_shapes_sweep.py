"""The shapes-world sweep (benchmarks/gpu/shapes_sweep.py): variants are validated, runs group by their
overrides without the seed, the tables carry hand-derived means and spreads, a stopped run keeps its
partial curve, and one real variant runs on the CPU through the sweep's subprocess path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import shapes_sweep  # noqa: E402


def _gain(value: float, se: float = 0.01) -> dict:
    return {"gain": value, "se": se, "before": 0.3, "after": 0.3 + value, "n": 10}


def _run(overrides: list[str], curve: list[tuple[int, float, float]]) -> dict:
    return {"overrides": overrides, "done": True, "returncode": 0,
            "epochs": [{"epoch": 0, "reward_mean": 0.8, "seconds": 2.0}],
            "curve": [{"epochs": e, "gains": {"heldout": _gain(h), "seen": _gain(s)}} for e, h, s in curve]}


def test_variants_file_is_validated_with_the_variant_named(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"lr_1e-3": ["train.learning_rate=1e-3"], "base": []}))
    assert shapes_sweep.load_variants(good) == {"lr_1e-3": ["train.learning_rate=1e-3"], "base": []}
    assert shapes_sweep.load_variants(None) == shapes_sweep.DDPO_VARIANTS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": "train.learning_rate=1e-3"}))
    with pytest.raises(SystemExit, match=r"variant 'lr'.*list of 'key=value'"):
        shapes_sweep.load_variants(bad)
    bad.write_text(json.dumps({"a/b": []}))
    with pytest.raises(SystemExit, match=r"variant name 'a/b'"):
        shapes_sweep.load_variants(bad)
    bad.write_text("[]")
    with pytest.raises(SystemExit, match="non-empty JSON object"):
        shapes_sweep.load_variants(bad)


def test_runs_group_by_overrides_without_the_seed_and_the_table_has_the_mean_and_std_over_seeds():
    ddpo = "configs/shapes_ddpo_heldout.yaml"
    sweeps = [{"config": ddpo, "variants": {"p0": _run([], [(10, 0.02, -0.01)]),
                                            "lr": _run(["train.learning_rate=1e-3"], [(10, 0.05, 0.0)])}},
              {"config": ddpo, "variants": {"p1": _run(["seed=1"], [(10, 0.04, -0.03)]),
                                            "p2": _run(["seed=2"], [(10, 0.09, 0.01)])}},
              {"config": "configs/shapes_dpo_heldout.yaml", "variants": {"d0": _run([], [(10, -0.01, 0.0)])}}]
    grouped = shapes_sweep.by_seed(sweeps)
    assert {k: sorted(v) for k, v in grouped.items()} == {
        ("shapes_ddpo_heldout",): [0, 1, 2], ("shapes_ddpo_heldout", "train.learning_rate=1e-3"): [0],
        ("shapes_dpo_heldout",): [0]}
    table = shapes_sweep.seed_table(sweeps)
    # 0.02, 0.04, 0.09: mean 0.05; deviations -0.03, -0.01, 0.04 -> variance (9 + 1 + 16) e-4 / 2 = 13e-4
    assert "| shapes_ddpo_heldout | – | 3 | 10 | +0.050 ± 0.036 | +0.020 / +0.040 / +0.090 | -0.010 |" in table
    assert "| shapes_ddpo_heldout | train.learning_rate=1e-3 | 1 | 10 | +0.050 | +0.050 | +0.000 |" in table
    assert "| shapes_dpo_heldout | – | 1 | 10 | -0.010 | -0.010 | +0.000 |" in table


def test_a_stopped_run_keeps_its_partial_curve_and_the_sweep_table_marks_it(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "shapes_on_device.json").write_text(json.dumps(_run([], [(10, 0.03, 0.0)])))
    (tmp_path / "stopped").mkdir()
    partial = _run([], [(10, -0.02, 0.01)])
    partial.pop("done")
    (tmp_path / "stopped" / "epochs.json").write_text(json.dumps(partial))
    (tmp_path / "never").mkdir()
    results = {name: shapes_sweep.read_run(tmp_path / name) for name in ("done", "stopped", "never")}
    assert results["done"]["done"] and not results["stopped"]["done"] and results["never"]["curve"] == []
    table = shapes_sweep.markdown_table(results)
    assert "| done | 10 | +0.030 ± 0.010 | +0.000 ± 0.010 | 0.8000 | 2.0 | yes |" in table
    assert "| stopped | 10 | -0.020 ± 0.010 | +0.010 ± 0.010 | 0.8000 | 2.0 | no |" in table
    assert "| never | 0 |" in table


def test_a_crash_after_some_evaluations_is_a_failure_and_a_deadline_stop_is_not():
    curve = _run([], [(10, 0.01, 0.0)])["curve"]
    results = {"ok": {"returncode": 0, "curve": curve}, "crashed_late": {"returncode": 1, "curve": curve},
               "crashed_early": {"returncode": -9, "curve": []},
               "deadline": {"returncode": -15, "curve": curve, "stopped_at_deadline": True},
               "killed_by_someone": {"returncode": -15, "curve": curve, "stopped_at_deadline": False}}
    assert shapes_sweep.failed_variants(results) == ["crashed_late", "crashed_early", "killed_by_someone"]


def test_one_variant_runs_through_the_sweep_on_the_cpu(tmp_path):
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"lr_low": ["train.learning_rate=1e-4"]}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "shapes_sweep.py"), "--device", "cpu", "--out",
         str(tmp_path / "sweep"), "--variants", str(variants), "--eval-every", "1", "--deadline-s", "1200",
         "epochs=2", "evaluation.images_per_prompt=1", "sampling.batch_size=16"],
        capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    run = summary["variants"]["lr_low"]
    assert run["done"] and run["returncode"] == 0 and not run["stopped_at_deadline"] and len(run["epochs"]) == 2
    # the validation draw: the 12 held-out and 18 seen prompts, one image each, after epochs 1 and 2
    assert [p["epochs"] for p in run["curve"]] == [1, 2]
    assert {n: g["n"] for n, g in run["curve"][-1]["gains"].items()} == {"heldout": 12, "seen": 18}
    assert "train.learning_rate=1e-4" in (tmp_path / "sweep" / "lr_low" / "command.txt").read_text()
    assert "evaluation.seed=777" in summary["common"]
    assert summary["config"] == "configs/shapes_ddpo_heldout.yaml"  # no machine path in the results
