"""evaluation.keep_best: the adapter of the best evaluation so far, kept in best_lora/."""

from __future__ import annotations

import json
import math

import pytest

from cluster.best_adapter import BEST_DIR, best_record, keep_if_best


def test_the_best_adapter_is_replaced_only_by_a_higher_finite_value(tmp_path):
    exported = []

    def export(directory):  # stands for the driver's export_lora: one file naming the evaluation
        exported.append(directory.name)
        (directory / "adapter.txt").write_text(f"after {len(exported)} exports")

    values = [0.30, 0.50, 0.40, math.nan, 0.50, 0.60, 0.10]
    kept = [keep_if_best(tmp_path, metric="eval/gold_val", metrics={"eval/gold_val": v, "eval/x": 1.0},
                         updates=10 * (i + 1), export=export) for i, v in enumerate(values)]
    assert kept == [True, True, False, False, False, True, False]  # 0.5 again is not better; NaN never is
    assert best_record(tmp_path) == {"metric": "eval/gold_val", "value": 0.60, "updates": 60}
    assert (tmp_path / BEST_DIR / "adapter.txt").read_text() == "after 3 exports"
    assert exported == [f"{BEST_DIR}.tmp"] * 3  # written aside, then renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR]
    # A resumed run reads the record: a lower value after the resume does not replace it.
    assert not keep_if_best(tmp_path, metric="eval/gold_val", metrics={"eval/gold_val": 0.55}, updates=70,
                            export=export)
    assert json.loads((tmp_path / BEST_DIR / "best.json").read_text())["updates"] == 60


def test_a_metric_the_evaluation_did_not_write_is_named(tmp_path):
    with pytest.raises(KeyError, match="evaluation.keep_best = 'eval/gold_nope' is not among"):
        keep_if_best(tmp_path, metric="eval/gold_nope", metrics={"eval/gold_val": 0.5}, updates=1,
                     export=lambda d: None)
    assert best_record(tmp_path) is None
