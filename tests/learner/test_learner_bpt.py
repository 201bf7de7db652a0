"""The backward-progressive-training schedule (B²-DiffuRL §3.2): values, intervals, validation."""

from __future__ import annotations

import pytest

from learner.bpt import BptSchedule


def test_paper_reference_matches_14_plus_floor_7k_over_100_for_every_stage():
    schedule = BptSchedule.paper_reference()
    assert (schedule.num_steps, schedule.tau_start, schedule.tau_end, schedule.num_stages) == (
        20,
        14,
        20,
        100,
    )
    taus = [schedule.tau(k) for k in range(100)]
    assert taus == [14 + (7 * k) // 100 for k in range(100)]
    assert taus[0] == 14 and taus[-1] == 20
    assert taus == sorted(taus)
    # Seven equal bins of the 100 stages, one per tau value.
    counts = {tau: taus.count(tau) for tau in range(14, 21)}
    assert sorted(counts.values()) == [14, 14, 14, 14, 14, 15, 15]
    assert taus.index(15) == 15 and taus.index(20) == 86  # first k with floor(7k/100) = 1 and 6


def test_interval_and_branch_step_are_the_last_tau_step_indices():
    schedule = BptSchedule.paper_reference()
    for k in range(100):
        tau = 14 + (7 * k) // 100
        assert schedule.interval(k) == (20 - tau, 20)
        assert schedule.branch_step(k) == 20 - tau
    assert schedule.interval(0) == (6, 20) and schedule.interval(99) == (0, 20)


def test_general_formula_on_a_small_schedule():
    # n = tau_end - tau_start + 1 = 8 values over 8 stages: one stage per value.
    schedule = BptSchedule(num_steps=10, tau_start=3, tau_end=10, num_stages=8)
    assert [schedule.tau(k) for k in range(8)] == list(range(3, 11))
    # 3 values over 7 stages: bins of sizes 3, 2, 2 (floor(3k/7)).
    schedule = BptSchedule(num_steps=5, tau_start=3, tau_end=5, num_stages=7)
    assert [schedule.tau(k) for k in range(7)] == [3, 3, 3, 4, 4, 5, 5]
    # A constant schedule trains the same last steps throughout.
    schedule = BptSchedule(num_steps=6, tau_start=6, tau_end=6, num_stages=3)
    assert [schedule.interval(k) for k in range(3)] == [(0, 6)] * 3


def test_stage_of_epoch_with_epochs_per_stage_and_clamping_after_the_last_stage():
    schedule = BptSchedule(num_steps=20, tau_start=14, tau_end=20, num_stages=100, epochs_per_stage=2)
    assert [schedule.stage(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert schedule.total_epochs == 200
    assert schedule.stage(199) == 99 and schedule.stage(10_000) == 99
    assert schedule.tau(schedule.stage(10_000)) == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"num_steps": 0, "tau_start": 1, "tau_end": 1, "num_stages": 1},
            r"bpt\.num_steps=0 .*num_steps >= 1",
        ),
        (
            {"num_steps": 20, "tau_start": 0, "tau_end": 20, "num_stages": 30},
            r"bpt\.tau_start=0 .*1 <= tau_start",
        ),
        (
            {"num_steps": 20, "tau_start": 14, "tau_end": 21, "num_stages": 100},
            r"bpt\.tau_end=21 .*<= num_steps \(20\)",
        ),
        (
            {"num_steps": 20, "tau_start": 15, "tau_end": 14, "num_stages": 100},
            r"bpt\.tau_end=14 .*tau_start \(15\)",
        ),
        (
            {"num_steps": 20, "tau_start": 14, "tau_end": 20, "num_stages": 6},
            r"bpt\.num_stages=6 .*>= .* = 7",
        ),
        (
            {"num_steps": 20, "tau_start": 14, "tau_end": 20, "num_stages": 100, "epochs_per_stage": 0},
            r"bpt\.epochs_per_stage=0",
        ),
        (
            {"num_steps": 20.0, "tau_start": 14, "tau_end": 20, "num_stages": 100},
            r"bpt\.num_steps=20\.0 .*an int",
        ),
    ],
)
def test_invalid_schedules_name_the_field_value_and_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BptSchedule(**kwargs)


def test_out_of_range_stage_and_negative_epoch_are_refused():
    schedule = BptSchedule.paper_reference()
    for bad in (-1, 100, 1.5):
        with pytest.raises(ValueError, match=r"stage=.* expected an int in \[0, 100\)"):
            schedule.tau(bad)
    with pytest.raises(ValueError, match=r"epoch=-1 .*>= 0"):
        schedule.stage(-1)
