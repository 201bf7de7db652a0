"""Bad runs refused before Ray starts: `gard train` exits 2 with one paragraph naming the field, no
traceback, and writes nothing (no run directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cluster.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "jpeg_demo.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd):
    """A pipeline directory without model_index.json and a LoRA adapter of rank 8 (the demo's is 4)."""
    root = tmp_path_factory.mktemp("preflight")
    broken = root / "broken-pipeline"
    shutil.copytree(tiny_sd, broken)
    (broken / "model_index.json").unlink()
    adapter = root / "rank8"
    adapter.mkdir()
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(8, 64),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 8)},
              str(adapter / "pytorch_lora_weights.safetensors"))
    alpha8 = root / "alpha8"  # rank 4 as configured, saved with lora_alpha 8 (the demo's is 4)
    alpha8.mkdir()
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(alpha8 / "pytorch_lora_weights.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})})
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file at all")
    return {"tiny": tiny_sd, "broken": str(broken), "rank8": str(adapter), "alpha8": str(alpha8), "garbage": str(garbage)}


CASES = [
    (["policy.pretrained=tiny:nope"], r"policy.pretrained = 'tiny:nope': unknown tiny model"),
    (["policy.pretrained=./no/such/dir"], r"policy.pretrained = './no/such/dir': no such directory"),
    (["policy.pretrained={broken}"], r"policy.pretrained = '.*broken-pipeline': .* has no model_index.json"),
    (["policy.pretrained=nobody/no-such-model"], r"policy.pretrained = 'nobody/no-such-model': not in the local "
                                                 r"Hugging Face cache"),
    (["policy.pretrained={tiny}", "policy.lora_rank=4096"],
     r"policy.lora_rank = 4096 exceeds the dimensions of UNet layer .* min\(in, out\) = \d+"),
    (["policy.pretrained={tiny}", "policy.lora_targets=[to_qq]"],
     r"policy.lora_targets: 'to_qq' matches no Linear/Conv2d layer of the UNet"),
    (["policy.pretrained={tiny}", "policy.train_targets=[unet, text_encoder]", "policy.text_encoder_lora_rank=999"],
     r"policy.text_encoder_lora_rank = 999 exceeds the dimensions of text encoder layer"),
    (["policy.pretrained={tiny}", "sampling.num_steps=5000"], r"sampling.num_steps = 5000: .*1000"),
    (["policy.pretrained={tiny}", "sampling.resolution=72"],
     r"sampling.resolution = 72 is not a multiple of 16, which this model's VAE and UNet downsampling need"),
    (["sampling.resolution=1048576"], r"sampling.resolution = 1048576 is out of range: expected a positive "
                                      r"multiple of 8, at most 4096"),
    (["policy.pretrained={tiny}", "policy.init_adapter={rank8}"],
     r"policy.init_adapter = '.*rank8' has rank 8 .* but policy.lora_rank = 4"),
    (["policy.pretrained={tiny}", "policy.init_adapter={alpha8}"],
     r"policy.init_adapter = '.*alpha8' was saved with lora_alpha 8 for the unet, but policy.lora_alpha = 4; .* "
     r"act 0.5 times as strong"),
    (["policy.pretrained={tiny}", "policy.init_adapter={garbage}"],
     r"policy.init_adapter = '.*garbage': pytorch_lora_weights.safetensors is not a readable safetensors file"),
    (["rewards={{jpeg_compressibility: {{quality: 500}}}}"], r"quality must be an int in \[1, 100\]"),
]


@pytest.mark.parametrize("overrides, pattern", CASES)
def test_bad_run_exits_2_before_anything_is_written(files, tmp_path, capsys, overrides, pattern):
    import re

    run_dir = tmp_path / "run"
    args = [o.format(**files) for o in overrides]
    code = main(["train", DEMO, "--output-dir", str(run_dir), f"cache_dir={tmp_path / 'cache'}", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph
    assert not run_dir.exists()
