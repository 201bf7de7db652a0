"""LoRA fusion (``gard fuse-lora``): fused adapters reproduce Σ w_i Δ_i once diffusers loads them.

Expected merged weights are computed independently of actors/lora_fusion.py and actors/lora_files.py:
each input adapter is loaded into a fresh pipeline by diffusers (``load_lora_weights`` +
``fuse_lora``), and its Δ is the merged weight minus the base weight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.lora_files import LoraFusionError, parse_input_spec, read_adapter
from actors.lora_fusion import TargetMismatchError, compress_layer, fuse_adapters, fuse_lora_dirs

REPO = Path(__file__).resolve().parents[2]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# ----- building inputs ---------------------------------------------------------------------------
def _randomize(params, *, seed: int) -> None:
    """Nonzero A and B (a fresh adapter has B = 0, i.e. Δ = 0, which would make every test vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def _unet_adapter(
    tiny_sd: str, out: Path, *, rank: int, alpha: float, targets: tuple[str, ...], seed: int
) -> Path:
    from actors.policy import Policy
    from cluster.specs import default_policy_spec

    policy = Policy(default_policy_spec(pretrained=tiny_sd, lora_rank=rank, lora_alpha=alpha, lora_targets=targets))
    _randomize([p for _, p in policy.named_trainable_parameters()], seed=seed)
    return policy.save_lora(out)


def _text_encoder_adapter(tiny_sd: str, out: Path, *, rank: int, alpha: float, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(tiny_sd)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TE_TARGETS)
    pipe.text_encoder.add_adapter(config)
    _randomize([p for n, p in pipe.text_encoder.named_parameters() if "lora_" in n], seed=seed)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return out


def _pipeline(tiny_sd: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _merged_weights(tiny_sd: str, adapter: Path | None) -> dict[str, torch.Tensor]:
    """UNet and text-encoder weights after diffusers merges ``adapter`` into a fresh pipeline."""
    pipe = _pipeline(tiny_sd)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA modules
    weights = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    weights.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return weights


@pytest.fixture(scope="module")
def inputs(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """Adapters: UNet rank 2 and rank 4 (attention + 3x3 conv, different alphas), a UNet one with
    fewer targets, and a text-encoder one."""
    root = tmp_path_factory.mktemp("adapters")
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    return {
        "u2": _unet_adapter(tiny_sd, root / "u2", rank=2, alpha=4.0, targets=targets, seed=1),
        "u4": _unet_adapter(tiny_sd, root / "u4", rank=4, alpha=1.0, targets=targets, seed=2),
        "u_qk": _unet_adapter(tiny_sd, root / "u_qk", rank=2, alpha=2.0, targets=("to_q", "to_k"), seed=3),
        "te3": _text_encoder_adapter(tiny_sd, root / "te3", rank=3, alpha=6.0, seed=4),
    }


@pytest.fixture(scope="module")
def base(tiny_sd) -> dict[str, torch.Tensor]:
    return _merged_weights(tiny_sd, None)


def _assert_weights_close(actual: dict, expected: dict, *, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(
            actual[key], expected[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )


def _changed(weights: dict, base: dict) -> set[str]:
    return {k for k in base if not torch.equal(weights[k], base[k])}


# ----- tests -------------------------------------------------------------------------------------
def test_weighted_sum_of_mismatched_ranks_matches_merged_deltas(tiny_sd, inputs, base, tmp_path):
    w1 = _merged_weights(tiny_sd, inputs["u2"])
    w2 = _merged_weights(tiny_sd, inputs["u4"])
    result = fuse_lora_dirs([f"{inputs['u2']}:0.7", f"{inputs['u4']}:-0.3"], out_dir=tmp_path / "fused")
    assert set(result.ranks("unet").values()) == {6}  # exact: 2 + 4
    fused = _merged_weights(tiny_sd, tmp_path / "fused")
    expected = {k: base[k] + 0.7 * (w1[k] - base[k]) - 0.3 * (w2[k] - base[k]) for k in base}
    _assert_weights_close(fused, expected)
    adapted = _changed(w1, base)
    assert any(".conv1." in k for k in adapted) and any(".to_q." in k for k in adapted)
    assert _changed(fused, base) == adapted


def test_weights_one_zero_reproduce_the_first_adapter(tiny_sd, inputs, tmp_path):
    fuse_lora_dirs([str(inputs["u2"]), f"{inputs['u4']}:0"], out_dir=tmp_path / "fused")

    def image(adapter: Path) -> np.ndarray:
        pipe = _pipeline(tiny_sd)
        pipe.load_lora_weights(str(adapter))
        return pipe(
            "a red car",
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(11),
        ).images

    reference, fused = image(inputs["u2"]), image(tmp_path / "fused")
    np.testing.assert_allclose(fused, reference, atol=1e-5, rtol=0)
    assert (
        read_adapter(tmp_path / "fused").components["unet"].keys()
        == read_adapter(inputs["u2"]).components["unet"].keys()
    )


def test_text_encoder_and_unet_adapters_from_different_runs_combine(tiny_sd, inputs, base, tmp_path):
    te, unet = _merged_weights(tiny_sd, inputs["te3"]), _merged_weights(tiny_sd, inputs["u2"])
    result = fuse_lora_dirs([str(inputs["te3"]), str(inputs["u2"])], out_dir=tmp_path / "fused")
    assert set(result.components) == {"unet", "text_encoder"}
    fused = _merged_weights(tiny_sd, tmp_path / "fused")
    expected = {k: (te if k.startswith("text_encoder.") else unet)[k] for k in base}
    _assert_weights_close(fused, expected)
    assert any(k.startswith("text_encoder.") for k in _changed(fused, base))


def test_mismatched_target_modules_name_the_input(inputs, tmp_path):
    with pytest.raises(TargetMismatchError) as info:
        fuse_lora_dirs([str(inputs["u2"]), str(inputs["u_qk"])], out_dir=tmp_path / "fused")
    message = str(info.value)
    assert str(inputs["u_qk"]) in message and "unet" in message and ".to_v" in message
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "fused").exists()  # nothing written on error


def test_old_text_model_prefix_is_harmonized(inputs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = inputs["te3"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        tensors = {
            k.replace("text_encoder.", "text_encoder.text_model.", 1): handle.get_tensor(k)
            for k in handle.keys()
        }
        metadata = handle.metadata()
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "pytorch_lora_weights.safetensors"), metadata=metadata)
    result = fuse_lora_dirs([f"{inputs['te3']}:0.5", f"{tmp_path / 'old'}:0.5"], out_dir=tmp_path / "fused")
    new = read_adapter(inputs["te3"]).components["text_encoder"]
    assert result.components["text_encoder"].keys() == new.keys()
    for name, layer in result.components["text_encoder"].items():
        torch.testing.assert_close(layer.delta(), new[name].delta(), atol=1e-6, rtol=0)


def test_rank_compression_of_an_exactly_low_rank_sum(inputs):
    u2, u4 = read_adapter(inputs["u2"]), read_adapter(inputs["u4"])
    # 0.25 Δ + 0.75 Δ = Δ has rank 2 although the stacked factors have rank 4.
    result = fuse_adapters([u2, u2], [0.25, 0.75], rank=2)
    assert result.max_rel_error() < 1e-5
    for name, layer in result.components["unet"].items():
        assert layer.rank == 2
        torch.testing.assert_close(layer.delta(), u2.components["unet"][name].delta(), atol=1e-5, rtol=0)
    # A real rank-6 sum cut to rank 1: the reported error is the actual relative Frobenius error.
    exact = fuse_adapters([u2, u4], [1.0, 1.0])
    cut = fuse_adapters([u2, u4], [1.0, 1.0], rank=1)
    for name, layer in exact.components["unet"].items():
        full, approx = layer.delta(), cut.components["unet"][name].delta()
        measured = float((full - approx).norm() / full.norm())
        assert measured > 1e-3
        assert cut.rel_errors["unet"][name] == pytest.approx(measured, rel=1e-3)


def test_compress_layer_rejects_rank_zero(inputs):
    layer = next(iter(read_adapter(inputs["u2"]).components["unet"].values()))
    with pytest.raises(LoraFusionError, match="--rank"):
        compress_layer(layer, rank=0)


def test_input_spec_parsing(tmp_path):
    assert parse_input_spec("runs/a/lora") == (Path("runs/a/lora"), 1.0)
    assert parse_input_spec("runs/a/lora:-0.3") == (Path("runs/a/lora"), -0.3)
    assert parse_input_spec("runs/a:b/lora") == (Path("runs/a:b/lora"), 1.0)
    odd = tmp_path / "adapter:2"
    odd.mkdir()
    assert parse_input_spec(str(odd)) == (odd, 1.0)  # an existing path wins
    with pytest.raises(LoraFusionError, match="finite"):
        parse_input_spec("runs/a/lora:nan")
    with pytest.raises(LoraFusionError, match="does not exist"):
        fuse_lora_dirs([str(tmp_path / "missing")], out_dir=tmp_path / "out")
    with pytest.raises(LoraFusionError, match="no inputs"):
        fuse_lora_dirs([], out_dir=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFusionError, match="pytorch_lora_weights.safetensors"):
        fuse_lora_dirs([str(tmp_path / "empty")], out_dir=tmp_path / "out")


def _gard(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "cluster", "fuse-lora", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_end_to_end(tiny_sd, inputs, tmp_path):
    out = tmp_path / "fused"
    done = _gard("--out", str(out), f"{inputs['te3']}:0.5", f"{inputs['u2']}:0.7", f"{inputs['u4']}:-0.3")
    assert done.returncode == 0, done.stderr
    assert "text_encoder: " in done.stdout and "rank 6" in done.stdout
    expected = fuse_adapters(
        [read_adapter(inputs[k]) for k in ("te3", "u2", "u4")], [0.5, 0.7, -0.3]
    ).components
    pipe = _pipeline(tiny_sd)
    pipe.load_lora_weights(str(out))  # loadable by diffusers
    written = read_adapter(out).components
    for component, layers in expected.items():
        for name, layer in layers.items():
            torch.testing.assert_close(written[component][name].delta(), layer.delta(), atol=1e-6, rtol=0)

    again = _gard("--out", str(out), str(inputs["u2"]))
    assert again.returncode == 2 and "--overwrite" in again.stderr

    bad = _gard("--out", str(tmp_path / "bad"), str(inputs["u2"]), str(tmp_path / "nope") + ":0.5")
    assert bad.returncode == 2
    assert "nope" in bad.stderr and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_unreadable_inputs_and_a_file_as_output_are_refused_with_a_message(inputs, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    bad = _gard("--out", str(tmp_path / "o"), str(garbage))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "garbage.safetensors is not a readable safetensors LoRA file" in bad.stderr
    # Valid tensors, but metadata that is not JSON.
    from safetensors.torch import save_file

    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2)}, str(bad_meta),
              metadata={"lora_adapter_metadata": "{not json"})
    meta = _gard("--out", str(tmp_path / "o"), str(bad_meta))
    assert meta.returncode == 2 and "JSONDecodeError" in meta.stderr and "Traceback" not in meta.stderr
    (tmp_path / "afile").write_text("x")
    out_file = _gard("--out", str(tmp_path / "afile"), str(inputs["u2"]))
    assert out_file.returncode == 2 and "is a file; pass a directory" in out_file.stderr
    assert (tmp_path / "afile").read_text() == "x"
