"""The methods benchmark's table: runs grouped by method and swept learning rate, mean ± sample std."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "methods_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "methods.py")
methods = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(methods)


def _finished_run(root: Path, name: str, *, gold_tune: float, base_tune: float, scored: int) -> None:
    run = root / name
    (run / "lora").mkdir(parents=True)
    first = {"epoch": 0, "reward/n_scored": scored, "eval/gold_tune_initial": base_tune, "eval/gold_seen_initial": 0.5}
    last = {"epoch": 1, "reward/n_scored": scored, "eval/gold_tune": gold_tune, "eval/gold_seen": 0.6}
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(last) + "\n")
    (run / "wall_s.txt").write_text("100\n")


def test_rows_group_seeds_and_learning_rates_with_their_mean_and_std(tmp_path):
    _finished_run(tmp_path, "ddpo_is-s0", gold_tune=0.5, base_tune=0.6, scored=64)
    _finished_run(tmp_path, "ddpo_is-s1", gold_tune=0.7, base_tune=0.4, scored=64)
    _finished_run(tmp_path, "ddpo_is@lr0.001-s0", gold_tune=0.9, base_tune=0.6, scored=64)
    (tmp_path / "ddpo_is-s2").mkdir()  # unfinished (no lora/): left out
    lines = methods.table(tmp_path).splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in lines[2:]}
    # seeds 0 and 1: mean 0.6, sample std sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.141; the base row is the
    # first row's runs' evaluation before training: 0.5 +- 0.141 the same way
    # The paired gain: per run, after minus its own before: -0.1 and +0.3 -> mean 0.1, std sqrt(0.08) = 0.283
    assert rows["ddpo_is"][1:4] == ["2", "0.100 ± 0.283", "0.600 ± 0.141"]
    assert rows["base"][1:4] == ["2", "0", "0.500 ± 0.141"]
    assert rows["ddpo_is@lr0.001"][1:4] == ["1", "0.300", "0.900"]  # one seed: no std
    assert rows["ddpo_is"][-2:] == ["128", "100 |"]  # reward queries summed over the run's rows; mean wall s
    assert list(rows)[:3] == ["base", "ddpo_is", "ddpo_is@lr0.001"]


def test_a_run_name_carries_the_swept_learning_rate():
    assert methods.run_name("b2", None) == "b2"
    assert methods.run_name("b2", 3e-4) == "b2@lr0.0003"


def test_a_fusion_row_reads_its_evaluation_with_its_first_inputs_base_and_both_inputs_queries(tmp_path):
    _finished_run(tmp_path, "ddpo_is-s0", gold_tune=0.5, base_tune=0.6, scored=64)
    _finished_run(tmp_path, "ddpo_caption-s0", gold_tune=0.4, base_tune=0.6, scored=32)
    fused = tmp_path / "lora_fusion_clip_caption-s0"
    (fused / "lora").mkdir(parents=True)
    (fused / "eval_metrics.json").write_text(json.dumps({"metrics": {"eval/gold_tune": 0.55, "eval/gold_seen": 0.5}}))
    (fused / "fusion.json").write_text(json.dumps({"inputs": ["ddpo_is-s0", "ddpo_caption-s0"]}))
    result = methods.read_run(fused)
    assert result["final"]["eval/gold_tune"] == 0.55 and result["base"]["eval/gold_tune"] == 0.6
    assert result["reward_queries"] == 128 + 64 and result["wall_s"] is None  # each input's two rows
    row = next(line for line in methods.table(tmp_path).splitlines() if line.startswith("| lora_fusion_clip_caption"))
    # after the trained rows; gain 0.55 - 0.6 (its first input's base); no wall time of its own
    assert row.split(" | ")[1:4] == ["1", "-0.050", "0.550"] and row.endswith("| 192 | – |")


def test_the_gain_is_read_on_the_chosen_set_when_the_base_config_trains_another(tmp_path, capsys):
    # make demo's job as the base config: its training prompts are the evaluation set "heldout", and there
    # is no "tune" set; the gain column is heldout's, paired within each run, and heldout is not repeated
    run = tmp_path / "ddpo_is-s0"
    (run / "lora").mkdir(parents=True)
    first = {"epoch": 0, "reward/n_scored": 64, "eval/gold_heldout_initial": 0.36, "eval/gold_seen_initial": 0.68}
    last = {"epoch": 1, "reward/n_scored": 64, "eval/gold_heldout": 0.41, "eval/gold_seen": 0.66}
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(last) + "\n")
    assert methods.columns("heldout")[:3] == ["eval/gold_heldout", "eval/gold_seen", "eval/gold_heldout/single"]
    lines = methods.table(tmp_path, gain_set="heldout").splitlines()
    assert lines[0].startswith("| method | seeds | gold_heldout gain (paired) | gold_heldout | gold_seen |")
    row = next(line for line in lines if line.startswith("| ddpo_is "))
    assert row.split(" | ")[1:5] == ["1", "0.050", "0.410", "0.660"]
    # a gain set the base config does not evaluate is refused before any run starts, naming the valid ones
    with pytest.raises(SystemExit) as exit_info:
        methods.main(["--base-config", str(methods.REPO / "configs" / "shapes_dpo_heldout.yaml"),
                      "--gain-set", "tune", "--out", str(tmp_path / "x"), "--methods", "ddpo_is"])
    assert exit_info.value.code == 2
    assert "'tune' is not an evaluation set" in capsys.readouterr().err and not (tmp_path / "x").exists()
