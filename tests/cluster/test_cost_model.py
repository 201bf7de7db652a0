"""The cost model's formulas on hand-computed cases, and `gard plan` on a config."""

import json

import pytest

from cluster.cli import main
from cluster.cost_model import EpochWork, Layout, UnitCosts, candidate_layouts, plan, predict

WORK = EpochWork(samples=16, steps=10, trained_pairs=160, optimizer_steps=2, batch_size=8)
COSTS = UnitCosts(sample_transition_s=0.01, train_pair_s=0.03, reward_image_s=0.02, allreduce_s=0.1,
                  publish_s=0.05, driver_s=0.2)


def test_disaggregated_pipelined_epoch_is_the_slower_stage_plus_publish_and_driver():
    # sampling 16*10*0.01 = 1.6 s device time on 1 sampler, reward 16*0.02 = 0.32 s beside it: 1.92 s;
    # training 160*0.03 = 4.8 s on 2 ranks = 2.4 s + 2 steps * 0.1 * log2(2) = 2.6 s; publish 0.05; driver 0.2.
    p = predict(WORK, COSTS, Layout("disaggregated", 1, 2, max_staleness=1))
    assert p.sample_s == pytest.approx(1.92) and p.train_s == pytest.approx(2.6)
    assert p.epoch_s == pytest.approx(2.6 + 0.05 + 0.2)
    assert p.utilisation == pytest.approx((1.6 + 4.8) / (3 * 2.85))


def test_synchronous_and_colocated_epochs_add_the_stages():
    sync = predict(WORK, COSTS, Layout("disaggregated", 1, 2, max_staleness=0))
    assert sync.epoch_s == pytest.approx(1.92 + 2.6 + 0.05 + 0.2)
    # colocated on 4 devices: sampling (1.6 + 0.32) / 4 = 0.48, training 4.8 / 4 + 2 * 0.1 * 2 = 1.6,
    # publish 0.05 * log2(4) = 0.1.
    co = predict(WORK, COSTS, Layout("colocated", 4, 4, max_staleness=0))
    assert co.epoch_s == pytest.approx(0.48 + 1.6 + 0.1 + 0.2)
    assert co.utilisation == pytest.approx(6.4 / (4 * 2.38))


def test_reward_devices_take_the_reward_off_the_samplers_but_leave_one_batch_on_the_critical_path():
    p = predict(WORK, COSTS, Layout("disaggregated", 2, 1, max_staleness=0, reward_devices=1))
    assert p.sample_s == pytest.approx(max(0.8, 0.32)) and p.reward_tail_s == pytest.approx(8 * 0.02)
    assert p.layout.devices == 4


def test_plan_tries_every_split_and_puts_the_fastest_first():
    layouts = candidate_layouts(4)
    assert [(layout.kind, layout.samplers, layout.learners) for layout in layouts] == [
        ("colocated", 4, 4), ("disaggregated", 1, 3), ("disaggregated", 2, 2), ("disaggregated", 3, 1)]
    ranked = plan(WORK, COSTS, 4)
    assert [p.epoch_s for p in ranked] == sorted(p.epoch_s for p in ranked)
    # training dominates (4.8 s vs 1.92 s of sampling): the best split gives most devices to learners
    best_split = min((p for p in ranked if p.layout.kind == "disaggregated"), key=lambda p: p.epoch_s)
    assert best_split.layout.learners == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sample_transition_s": -1.0, "train_pair_s": 0.1}, "UnitCosts.sample_transition_s"),
    ({"sample_transition_s": 0.1, "train_pair_s": float("nan")}, "UnitCosts.train_pair_s"),
])
def test_bad_unit_costs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnitCosts(**kwargs)


def test_layouts_refuse_impossible_splits():
    with pytest.raises(ValueError, match="one to one"):
        Layout("colocated", 2, 3)
    with pytest.raises(ValueError, match="'colocated' or 'disaggregated'"):
        Layout("mixed", 1, 1)


def test_gard_plan_prints_every_layout_and_a_recommendation(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"sample_transition_s": 0.004, "train_pair_s": 0.016, "source": "test"}))
    assert main(["plan", "configs/jpeg_demo.yaml", "--gpus", "3", "--costs", str(costs)]) == 0
    out = capsys.readouterr().out
    assert "colocated 3 x (sampler + learner)" in out and "disaggregated 2 samplers + 1 learner" in out
    assert "recommended on 3 devices: colocated" in out  # training dominates and colocation idles nothing


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read a JSON object"),
    ('{"sample_transition_s": 0.1, "train_pair_s": 0.1, "gpu_s": 1}', "unknown keys \\['gpu_s'\\]"),
    ('{"sample_transition_s": "fast", "train_pair_s": 0.1}', "not numbers"),
    ('{"train_pair_s": 0.1}', "sample_transition_s"),
])
def test_gard_plan_names_what_is_wrong_with_the_costs(tmp_path, capsys, content, message):
    costs = tmp_path / "costs.json"
    costs.write_text(content)
    assert main(["plan", "configs/jpeg_demo.yaml", "--gpus", "4", "--costs", str(costs)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_the_shipped_sd15_costs_load_and_state_their_assumptions():
    from cluster.plan import load_costs

    raw = json.loads(open("benchmarks/costs/sd15_h100.json").read())
    assert raw["assumptions"] and "not measured" in raw["source"]
    assert load_costs("benchmarks/costs/sd15_h100.json").train_pair_s == raw["train_pair_s"]


@pytest.mark.parametrize("name", ["sd15_h200", "sd15_h200_large_batches"])
def test_the_measured_sd15_costs_are_the_device_checks_figures(name):
    """The H200 cost files are derived from the device check's results (benchmarks/gpu/results/) by the
    check's own derivation, not typed in: rederiving them gives the same seconds."""
    from benchmarks.gpu.unit_costs import derive_unit_costs
    from cluster.plan import COST_FIELDS, load_costs

    result = "h200_micro32" if name.endswith("large_batches") else "h200_micro8"
    results = json.loads(open(f"benchmarks/gpu/results/{result}.json").read())
    derived = derive_unit_costs(results, large_batch=name.endswith("large_batches"))
    shipped = load_costs(f"benchmarks/costs/{name}.json")
    assert "H200" in derived["machine"]
    assert {field: getattr(shipped, field) for field in COST_FIELDS} == pytest.approx(
        {field: derived[field] for field in COST_FIELDS})
    # hand check of the main one: 8 images x 50 steps sampled in the measured seconds
    if name == "sd15_h200":
        assert shipped.sample_transition_s == pytest.approx(results["sampling"]["seconds"] / 400)
