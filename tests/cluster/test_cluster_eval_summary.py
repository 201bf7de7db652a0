"""The run's gold summary (before -> after, paired) against hand-derived values (pure: no Ray)."""

from __future__ import annotations

import json
import math

import pytest

from cluster.eval_summary import SUMMARY_FILE, paired_summary, summarise_run


def _items(values: list[float | None], sets: list[str]) -> list[dict]:
    return [{"set": s, "prompt": f"p{i % 2}", "reward": 0.0, "gold": {"shapes_judge": v}}
            for i, (v, s) in enumerate(zip(values, sets, strict=True))]


SETS = ["tune"] * 4 + ["heldout"] * 2


def test_the_paired_gain_and_its_standard_error():
    before = _items([0, 1, 0, 0, 1, None], SETS)
    after = _items([1, 1, 1, 0, 0, 1], SETS)
    summary = paired_summary(before, after, gold="shapes_judge")
    tune = summary["tune"]
    # before 0,1,0,0 (mean 1/4, var 1/4 -> se 1/4); after 1,1,1,0 (mean 3/4, se 1/4);
    # differences 1,0,1,0: mean 1/2, var 1/3 -> se sqrt(1/3)/2
    assert (tune.n, tune.before, tune.after, tune.gain) == (4, 0.25, 0.75, 0.5)
    assert tune.before_se == pytest.approx(0.25) and tune.after_se == pytest.approx(0.25)
    assert tune.gain_se == pytest.approx(math.sqrt(1 / 3) / 2)
    # An image the gold could not score before (None) is left out of both sides: one pair remains.
    heldout = summary["heldout"]
    assert (heldout.n, heldout.before, heldout.after, heldout.gain) == (1, 1.0, 0.0, -1.0)
    assert math.isnan(heldout.gain_se)


def test_evaluations_of_different_sets_are_refused():
    before = _items([0, 1, 0, 0, 1, 1], SETS)
    with pytest.raises(ValueError, match="hold 6 and 5 images"):
        paired_summary(before, before[:5], gold="shapes_judge")
    swapped = [dict(item) for item in before]
    swapped[3]["prompt"] = "another prompt"
    with pytest.raises(ValueError, match=r"evaluation image 3 is \('tune', 'p1'\) before and \('tune', 'another prompt'\)"):
        paired_summary(before, swapped, gold="shapes_judge")


def test_the_run_summary_reads_the_first_and_the_newest_evaluation(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    assert summarise_run(tmp_path, gold="shapes_judge") == []  # nothing to compare yet
    (samples / "eval_epoch0000.json").write_text(json.dumps(_items([0, 0, 0, 0, 0, 0], SETS)))
    (samples / "eval_epoch9999.json").write_text(json.dumps(_items([1, 0, 0, 0, 0, 0], SETS)))
    (samples / "eval_epoch10000.json").write_text(json.dumps(_items([1, 1, 0, 0, 1, 0], SETS)))
    lines = summarise_run(tmp_path, gold="shapes_judge")
    assert lines[0].startswith("gold (shapes_judge) before training -> after 10000 updates")
    assert "gain +0.500" in lines[1] and "(n = 4)" in lines[1] and "gain +0.500" in lines[2]
    written = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert written["updates"] == 10000 and written["sets"]["tune"]["after"] == 0.5
