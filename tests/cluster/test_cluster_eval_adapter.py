"""`gard eval` before Ray starts: which LoRA directory an ADAPTER argument means, and bad ADAPTERs, a
mismatched adapter and an earlier evaluation refused with exit code 2, one paragraph, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cluster.run
from cluster.checkpoint import write_checkpoint
from cluster.cli import main
from cluster.config import ConfigError
from cluster.eval_adapter import METRICS_FILE, WEIGHTS_FILE, resolve_adapter, split_items, summary

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "jpeg_demo.yaml")
KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _lora(path: Path, *, rank: int = 4, epoch: int | None = None) -> Path:
    path.mkdir(parents=True)
    save_file({f"{KEY}.lora_A.weight": torch.zeros(rank, 64), f"{KEY}.lora_B.weight": torch.zeros(64, rank)},
              str(path / WEIGHTS_FILE))
    if epoch is not None:
        (path / "gard_adapter.json").write_text(json.dumps({"epoch": epoch}))
    return path


def _checkpoint(run_dir: Path, epoch: int) -> Path:
    files = {WEIGHTS_FILE: f"epoch {epoch}".encode(), "gard_adapter.json": json.dumps({"epoch": epoch}).encode()}
    return write_checkpoint(run_dir, epoch=epoch, learner_state={}, lora_files=files, driver_state={},
                            metrics=[{"epoch": e} for e in range(epoch)], config={}, info={}, keep_last=5)


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting Ray."""
    def refuse(config):
        raise AssertionError("gard eval started Ray for an input it should have refused")

    monkeypatch.setattr(cluster.run, "ray_session", refuse)


def test_adapter_argument_resolves_to_a_lora_directory(tmp_path):
    assert resolve_adapter(None).lora is None  # the base model
    lora = _lora(tmp_path / "fused")
    assert resolve_adapter(str(lora)).lora == lora.resolve()
    assert resolve_adapter(str(lora)).default_output is None  # runs/eval-<name>-<time>

    run = tmp_path / "run"
    _lora(run / "lora", epoch=3)
    _checkpoint(run, 3)
    source = resolve_adapter(str(run), log=(messages := []).append)
    assert source.lora == (run / "lora").resolve() and source.default_output == (run / "eval").resolve()
    assert source.record == {"epoch": 3} and messages == []

    newer = _checkpoint(run, 5)  # a continued run that stopped early keeps the older final adapter: say so
    source = resolve_adapter(str(run), log=(messages := []).append)
    assert source.lora == (run / "lora").resolve()
    assert len(messages) == 1 and "after epoch 3" in messages[0] and str(newer.resolve()) in messages[0]

    checkpoint = resolve_adapter(str(newer))  # a checkpoint directory: its lora/, output beside the run's
    assert checkpoint.lora == newer.resolve() / "lora"
    assert checkpoint.default_output == run.resolve() / "eval-epoch-000005"


def test_a_run_without_lora_uses_its_newest_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 1)
    _checkpoint(run, 2)
    broken = run / "checkpoints" / "epoch-000003"  # a write that did not finish: skipped, with a warning
    broken.mkdir()
    source = resolve_adapter(str(run), log=(messages := []).append)
    assert source.lora == run.resolve() / "checkpoints" / "epoch-000002" / "lora"
    assert source.record == {"epoch": 2} and source.default_output == run.resolve() / "eval"
    assert any("skipping" in m and "epoch-000003" in m for m in messages)
    assert any("newest checkpoint" in m for m in messages)


def test_positional_arguments_split_into_adapter_and_overrides():
    assert split_items([]) == (None, [])
    assert split_items(["runs/x", "epochs=2", "evaluation.seed=3"]) == ("runs/x", ["epochs=2", "evaluation.seed=3"])
    assert split_items(["seed=1", "runs/lr=1e-3"]) == ("runs/lr=1e-3", ["seed=1"])  # a path, not an override
    with pytest.raises(ConfigError, match=r"gard eval takes one ADAPTER, got 2: \['a', 'b'\]"):
        split_items(["a", "b"])


def test_summary_lists_each_metric_sorted():
    assert summary({"eval/reward_mean": -3.9181234, "eval/diversity/all": 0.25}).splitlines() == [
        "  eval/diversity/all   0.25", "  eval/reward_mean    -3.91812"]


def _bad_adapters(root: Path) -> list[tuple[str, str]]:
    (root / "file.txt").write_text("not an adapter")
    (root / "empty").mkdir()
    (root / "broken-run" / "checkpoints" / "epoch-000001").mkdir(parents=True)
    return [
        (str(root / "missing"), r"ADAPTER = '.*missing': no such file or directory; expected a run directory"),
        (str(root / "file.txt"), r"ADAPTER = '.*file.txt' is a file, not a directory; expected a run directory"),
        (str(root / "empty"), r"ADAPTER = '.*empty' holds neither pytorch_lora_weights.safetensors, nor "
                              r"lora/pytorch_lora_weights.safetensors, nor checkpoints/; expected a run directory"),
        (str(root / "broken-run"), r"ADAPTER = '.*broken-run' is a run directory without lora/ whose checkpoints/ "
                                   r"holds no valid checkpoint"),
    ]


def test_bad_adapter_exits_2_before_ray_and_writes_nothing(tmp_path, capsys, no_ray):
    for adapter, pattern in _bad_adapters(tmp_path):
        out = tmp_path / "out"
        code = main(["eval", adapter, "--config", DEMO, "--output-dir", str(out), f"cache_dir={tmp_path / 'c'}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert re.search(pattern, err), err
        assert "Traceback" not in err and err.count("\n") == 1  # one paragraph
        assert not out.exists() and not (tmp_path / "c").exists()


def test_two_adapters_are_a_usage_error(capsys, no_ray):
    with pytest.raises(SystemExit) as info:
        main(["eval", "runs/a", "runs/b", "--config", DEMO])
    assert info.value.code == 2
    assert "gard eval takes one ADAPTER, got 2" in capsys.readouterr().err


def test_adapter_of_another_rank_exits_2_naming_it(tmp_path, tiny_sd, capsys, no_ray):
    adapter = _lora(tmp_path / "rank8", rank=8)
    out = tmp_path / "out"
    code = main(["eval", str(adapter), "--config", DEMO, "--output-dir", str(out), f"policy.pretrained={tiny_sd}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"ADAPTER = '.*rank8': policy.init_adapter = '.*rank8' has rank 8 \(unet\..*lora_A.weight\), "
                     r"but policy.lora_rank = 4; set policy.lora_rank=8", err), err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists()


def test_an_earlier_evaluation_is_not_overwritten_without_the_flag(tmp_path, capsys, no_ray):
    run = tmp_path / "run"
    _lora(run / "lora")
    (run / "eval").mkdir()
    (run / "eval" / METRICS_FILE).write_text("{}")
    code = main(["eval", str(run), "--config", DEMO])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"eval_metrics.json already exists .* pass --overwrite", err), err
    assert (run / "eval" / METRICS_FILE).read_text() == "{}"
    (tmp_path / "a-file.txt").write_text("")
    code = main(["eval", str(run), "--config", DEMO, "--output-dir", str(tmp_path / "a-file.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a directory" in err, err


def test_an_adapter_recorded_for_another_base_model_gets_a_warning(tmp_path):
    from cluster.config import load_config
    from cluster.eval_adapter import AdapterSource, _check_base_model

    config = load_config(DEMO, [f"cache_dir={tmp_path}"])
    record = {"base_model": {"pretrained": "tiny:sd", "resolved": "/elsewhere/tiny-sd"}}
    same = AdapterSource(lora=tmp_path, default_output=None, record=record)
    _check_base_model(config, pretrained="/here/tiny-sd", source=same, log=(messages := []).append)
    assert messages == []  # the same base as configured, wherever it was resolved
    other = AdapterSource(lora=tmp_path, default_output=None,
                          record={"base_model": {"pretrained": "runwayml/stable-diffusion-v1-5", "resolved": "x"}})
    _check_base_model(config, pretrained="/here/tiny-sd", source=other, log=messages.append)
    assert len(messages) == 1 and "was trained on 'runwayml/stable-diffusion-v1-5'" in messages[0]
    assert "policy.pretrained = 'tiny:sd'" in messages[0]
