"""Tiny Stable Diffusion pipelines built from configs with random weights (no download).

Tests and the CPU demo use these; they are saved with ``save_pretrained`` and loaded back through
the same ``from_pretrained`` path as real checkpoints. Sizes:
UNet ~0.8M params (block_out_channels (32, 64)), a 2-layer CLIP text encoder of width 32, an
AutoencoderKL with scale factor 8, and the real CLIP BPE vocabulary that ships inside open_clip.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

TINY_PREFIX = "tiny:"
TINY_VARIANTS = ("sd", "sd-v")  # ε-prediction and v-prediction
SHAPES_VARIANT = "shapes"  # the trained shapes-world pipeline shipped under testbed/weights/shapes


def _write_clip_tokenizer(directory: Path) -> None:
    """Writes vocab.json/merges.txt for the real CLIP BPE (49408 ids) from open_clip's vocab file."""
    import open_clip.tokenizer as oc_tok

    merges = gzip.open(oc_tok.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oc_tok.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_tiny_sd(out_dir: str | Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Builds and saves a tiny StableDiffusionPipeline to ``out_dir``; returns the path.

    Latents are 4 x (H/8) x (W/8); the UNet's ``sample_size`` is 8 (64 px images) but any multiple
    of 8 px works at run time.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Save into a temporary sibling and rename, so a concurrent reader never sees half a model.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    pipe.save_pretrained(staging)
    try:
        os.replace(staging, out_dir)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def resolve_pretrained(name: str, *, cache_dir: str | Path) -> str:
    """Maps ``tiny:sd`` / ``tiny:sd-v`` to a locally built pipeline (built once), ``tiny:shapes`` to the
    shipped shapes-world pipeline (after checking its manifest), and a local directory to its absolute path
    (actors may run in another working directory); hub ids pass through."""
    if not name.startswith(TINY_PREFIX):
        return str(Path(name).resolve()) if Path(name).exists() else name
    variant = name[len(TINY_PREFIX) :]
    if variant == SHAPES_VARIANT:
        # Imported here: only this variant needs the testbed package.
        from testbed.build.manifest import SHAPES_WEIGHTS, check_manifest

        check_manifest(SHAPES_WEIGHTS)
        return str(SHAPES_WEIGHTS)
    if variant not in TINY_VARIANTS:
        valid = [TINY_PREFIX + v for v in (*TINY_VARIANTS, SHAPES_VARIANT)]
        raise ValueError(f"unknown tiny model {name!r}; valid: {valid}")
    path = Path(cache_dir).resolve() / f"tiny-{variant}"
    if not (path / "model_index.json").exists():
        build_tiny_sd(path, prediction_type="v_prediction" if variant == "sd-v" else "epsilon")
    return str(path)
