"""`gard eval` end to end on a real local Ray: the final adapter of a 1-epoch run, evaluated with the run's
config, reproduces the run's last evaluation metric for metric, and the base model its evaluation before
training (the same samplers, fixed seeds and rewards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import main

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# slow: two runs' worth of evaluation (about 110 s); the eval CLI's refusals stay in the default suite
@pytest.mark.slow
def test_eval_reproduces_the_runs_final_and_initial_evaluations(ray_local, tmp_path, capsys):
    run = tmp_path / "run"
    # Small and fast (2 samplers x 1 batch of 4, 5 DDIM steps), with the demo's high learning rate so that
    # one epoch moves the adapter away from the base model; a gold reward checks the gold metrics too.
    code = main(["train", str(REPO / "configs" / "jpeg_demo.yaml"), "--output-dir", str(run),
                 f"cache_dir={tmp_path / 'cache'}", "epochs=1", "logging.progress=false", "logging.tensorboard=false",
                 "sampling.num_steps=5", "sampling.batch_size=4", "sampling.batches_per_sampler=1",
                 "train.updates_per_epoch=2", "evaluation.prompts={seen: [a cat, a dog], heldout: [a fox]}",
                 "evaluation.images_per_prompt=2", "evaluation.rewards={jpeg_incompressibility: {}}"])
    assert code == 0, capsys.readouterr().err
    row = _rows(run)[0]
    final = {k: v for k, v in row.items() if k.startswith("eval/") and not k.endswith("_initial")}
    initial = {k.removesuffix("_initial"): v for k, v in row.items() if k.startswith("eval/") and k.endswith("_initial")}
    assert abs(final["eval/reward_mean"] - initial["eval/reward_mean"]) > 1e-3, (final, initial)  # it trained
    capsys.readouterr()

    # The run's adapter with the run's resolved config: every eval/ metric of its last evaluation.
    assert main(["eval", str(run), "--config", str(run / "config.yaml")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "eval" / "eval_metrics.json").read_text())
    assert saved["adapter"] == str((run / "lora").resolve()) and saved["adapter_record"]["epoch"] == 1
    assert saved["evaluation"]["prompts"] == {"seen": ["a cat", "a dog"], "heldout": ["a fox"]}
    metrics = saved["metrics"]
    assert set(metrics) == set(final) - {"eval/hacking_alarm"}  # the guard is off: no alarm flag
    for key, value in final.items():
        assert metrics.get(key, value) == pytest.approx(value, abs=1e-5), key
    assert "eval/gold_heldout" in metrics and "eval/diversity/seen" in metrics
    assert "  eval/reward_mean" in out and out.index("eval/diversity/heldout") < out.index("eval/reward_mean")
    # The placement block, as `gard train` prints it: every actor of the evaluation on this one node.
    node_line = next(line for line in out.splitlines() if line.startswith("    node 127.0.0.1 ("))
    assert all(name in node_line for name in ("sampler 0", "sampler 1", "learner rank 0", "reward stage")), out
    assert (run / "eval" / "eval.png").is_file()
    items = json.loads((run / "eval" / "eval.json").read_text())
    assert [item["set"] for item in items] == ["seen"] * 4 + ["heldout"] * 2

    # No ADAPTER: the base model, the run's evaluation before its first update.
    assert main(["eval", "--config", str(run / "config.yaml"), "--output-dir", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "eval_metrics.json").read_text())
    assert base["adapter"] is None and set(base["metrics"]) == set(initial)
    for key, value in initial.items():
        assert base["metrics"][key] == pytest.approx(value, abs=1e-5), key
