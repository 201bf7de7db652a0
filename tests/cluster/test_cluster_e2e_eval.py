"""End to end on a real local Ray: gold rewards on the evaluation set and the hacking guard stopping a
run whose training reward (JPEG compressibility) rises while the gold reward (incompressibility) falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from cluster.run import train

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
PATIENCE = 2


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_guard_stops_a_run_that_games_its_reward_after_a_checkpoint(ray_local, tmp_path):
    from cluster.checkpoint import latest_checkpoint, load_checkpoint
    from cluster.cli import _user_error
    from cluster.errors import RewardHackingError
    from cluster.hacking_guard import HackingGuard

    # The demo's settings move the tiny model's JPEG size within a few epochs (lr 2e-2, clip 5e-2, LoRA on
    # convolutions too). Incompressibility is minus compressibility, so on one set the gold falls exactly
    # when the training reward rises: the guard must stop the run at the PATIENCE-th rise in a row. (The
    # evaluation's JPEG sizes do not fall at every epoch: measured, the 2nd rise in a row came after
    # epoch 2; the run would stop by itself at 10.)
    config = load_config(REPO / "configs" / "jpeg_demo.yaml", [
        f"cache_dir={tmp_path / 'cache'}", "logging.progress=false", "epochs=10", "cluster.max_staleness=0",
        "checkpoint.every_epochs=0", "evaluation.every=1", "evaluation.images_per_prompt=2",
        "evaluation.prompts={seen: [a cat, a dog], heldout: [a zebra]}",
        "evaluation.rewards={jpeg_incompressibility: {}}", "evaluation.guard.action=stop",
        f"evaluation.guard.patience={PATIENCE}", "evaluation.guard.metric=eval/gold_seen",
        "evaluation.guard.train_metric=eval/reward_mean/seen", "evaluation.keep_best=eval/gold_seen"])
    messages = []
    with pytest.raises(RewardHackingError) as info:
        train(config, output_dir=str(tmp_path / "run"), log=messages.append)
    assert _user_error(info.value) is info.value  # the CLI prints it as one paragraph and exits 1
    message = str(info.value)
    assert f"over the last {PATIENCE} evaluation(s) eval/reward_mean/seen rose (" in message
    assert "while eval/gold_seen fell (" in message and "The run stopped after checkpoint" in message

    rows = _rows(tmp_path / "run")
    stopped = len(rows)
    assert PATIENCE <= stopped < config.epochs, stopped
    assert [r["eval/hacking_alarm"] for r in rows] == [0] * (stopped - 1) + [1]
    assert any("reward hacking suspected" in m for m in messages)  # logged when raised
    for row in rows:  # an evaluation after every epoch, scored with the training and the gold reward
        for s in ("seen", "heldout"):
            assert row[f"eval/gold_{s}"] == pytest.approx(row[f"eval/jpeg_incompressibility/{s}"])
            assert row[f"eval/gold_{s}"] == pytest.approx(-row[f"eval/reward_mean/{s}"], abs=1e-4)
            assert row[f"eval/gold_{s}_se"] > 0 and 0 < row[f"eval/diversity/{s}"] < 1
        assert row["eval/reward_mean"] == pytest.approx(-(2 * row["eval/gold_seen"] + row["eval/gold_heldout"]) / 3,
                                                        abs=1e-4)
    assert "eval/gold_seen_initial" in rows[0] and "eval/reward_mean_initial" in rows[0]
    gold = [rows[0]["eval/gold_seen_initial"]] + [r["eval/gold_seen"] for r in rows]
    assert all(b < a for a, b in zip(gold[-PATIENCE - 1:-1], gold[-PATIENCE:], strict=True)), gold

    # evaluation.keep_best: the adapter of the evaluation with the highest gold on "seen" is in best_lora/.
    best_at = max(range(stopped), key=lambda i: rows[i]["eval/gold_seen"])
    best = json.loads((tmp_path / "run" / "best_lora" / "best.json").read_text())
    assert best == {"metric": "eval/gold_seen", "value": rows[best_at]["eval/gold_seen"], "updates": best_at + 1}
    record = json.loads((tmp_path / "run" / "best_lora" / "gard_adapter.json").read_text())
    assert record["epoch"] == best_at + 1
    assert (tmp_path / "run" / "best_lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0

    # The checkpoint before stopping holds every completed epoch; a resume rebuilds the alarmed guard.
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert checkpoint.epoch == stopped and checkpoint.metrics == rows
    guard = HackingGuard(patience=PATIENCE, train_metric="eval/reward_mean/seen", gold_metric="eval/gold_seen")
    guard.replay(checkpoint.metrics)
    assert guard.streak >= PATIENCE
    items = json.loads((tmp_path / "run" / "samples" / f"eval_epoch{stopped:04d}.json").read_text())
    assert [item["set"] for item in items] == ["seen"] * 4 + ["heldout"] * 2
    assert all(item["gold"]["jpeg_incompressibility"] == pytest.approx(-item["reward"], abs=1e-4) for item in items)
