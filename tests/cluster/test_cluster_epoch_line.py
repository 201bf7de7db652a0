"""The console line and progress-bar postfix of one epoch: each algorithm's own statistics, never a "nan"
for a quantity the algorithm does not compute."""

from __future__ import annotations

import torch

from cluster.epoch_metrics import progress_postfix, report_epoch, summary_line

torch.set_num_threads(1)

BASE = {"epoch": 3, "train/policy_version": 4, "reward/mean": 0.81234, "reward/std": 0.1, "time/epoch_s": 2.5}


def test_a_ppo_epoch_shows_its_kl_and_clipping():
    row = {**BASE, "train/loss": 0.25, "train/kl": 0.0213, "train/approx_kl": 0.004, "train/clipfrac": 0.1}
    line = summary_line(row)
    assert line == ("epoch   3  v4  reward 0.8123 ± 0.1000  loss 2.500e-01  kl 2.13e-02  approx_kl 4.00e-03  "
                    "clipfrac 0.10  2.5s")
    assert progress_postfix(row) == {"reward": "0.812", "kl": "2.13e-02"}


def test_a_dpo_epoch_shows_its_pair_accuracy_and_margin_and_no_nan():
    row = {**BASE, "train/loss": 1.145, "dpo/acc": 0.625, "dpo/margin": 0.0031, "eval/reward_mean": 0.8655}
    line = summary_line(row)
    assert "nan" not in line and "kl" not in line and "clipfrac" not in line
    assert line.endswith("loss 1.145e+00  dpo_acc 0.62  dpo_margin 3.10e-03  2.5s  eval 0.8655")
    assert progress_postfix(row) == {"reward": "0.812", "dpo_acc": "0.62"}


def test_an_epoch_without_a_training_step_prints_the_reward_and_time_only():
    assert summary_line(dict(BASE)) == "epoch   3  v4  reward 0.8123 ± 0.1000  2.5s"
    assert progress_postfix(dict(BASE)) == {"reward": "0.812"}


def test_report_epoch_advances_the_bar_once_and_logs_the_line():
    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, None

        def update(self, k):
            self.n += k

        def set_postfix(self, postfix):
            self.postfix = postfix

    bar, lines = Bar(), []
    report_epoch(bar, dict(BASE), log=lines.append)
    assert (bar.n, bar.postfix, lines) == (1, {"reward": "0.812"}, [summary_line(dict(BASE))])
