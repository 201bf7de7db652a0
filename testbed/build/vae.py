"""The shapes world's VAE: a diffusers ``AutoencoderKL`` with downsampling factor 4 (32 px -> 4×8×8
latents, three encoder blocks, ~0.7M params), trained on renders of scenes of every kind (a quarter
with a held-out kind: see ``codec_scene_batch``).

Loss (the β-VAE objective of Kingma & Welling 2014, eq. 10, with a Gaussian decoder and a small KL weight,
as the Stable Diffusion autoencoder uses, Rombach et al. 2022, §3):
    L = mean over pixels ‖x − D(z)‖²  +  kl_weight · mean over batch KL(q(z|x) ‖ N(0, I)),
    z ~ q(z|x) drawn with the step's generator;  x: [B, 3, 32, 32] in [-1, 1],  z: [B, 4, 8, 8].
After training, ``scaling_factor`` is set to 1 / std of sampled latents over training scenes, so the
diffusion model sees unit-variance latents (the role 0.18215 plays for SD 1.x).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.build.common import (
    codec_scene_batch,
    cosine_lr,
    eval_scenes,
    render_batch,
    scene_batch,
    step_generator,
    tensor_to_images,
    train_loop,
)
from testbed.judge import judge
from testbed.world import render

BATCH_SIZE = 32
PEAK_LR = 2e-3
KL_WEIGHT = 1e-6
SCALING_STEP = 10**9  # the batch index of the scaling-factor scenes: beyond any training step


@dataclass(frozen=True)
class VaeReport:
    params: int
    steps: int
    scaling_factor: float
    psnr_seen: float
    psnr_held_out: float
    judge_seen: float  # fraction of reconstructions the judge finds correct for their own caption
    judge_held_out: float
    judge_clean_seen: float  # the same on the clean renders (the judge's own ceiling)
    judge_clean_held_out: float
    n_eval: int


def make_vae(seed: int):
    """A freshly initialised f4 AutoencoderKL (weights drawn from a generator seeded with ``seed``)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # diffusers initialises through the global generator; fork keeps callers' state
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, *, kl_weight: float = KL_WEIGHT):
    """The loss above for one batch ``x`` [B, 3, 32, 32]; returns (loss, stats)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    mse = (recon - x).pow(2).mean()
    kl = posterior.kl().mean()
    return mse + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae, *, seed: int, n: int = 512) -> float:
    """1 / std of sampled latents of ``n`` training scenes (a batch index no training run reaches)."""
    x = render_batch(scene_batch(seed, SCALING_STEP, n))
    z = vae.encode(x).latent_dist.sample(generator=step_generator(seed, SCALING_STEP))
    return float(1.0 / z.std())


def train_vae(out_dir: Path, *, steps: int, seed: int, batch_size: int = BATCH_SIZE, save_every: int = 100,
              stop_after: int | None = None, scaling_scenes: int = 512):
    """Trains (or resumes) the VAE to ``steps`` and saves it with ``save_pretrained`` to out_dir/vae."""
    vae = make_vae(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=PEAK_LR, weight_decay=0.0)

    def loss_fn(step: int):
        x = render_batch(codec_scene_batch(seed, step, batch_size))
        return vae_loss(vae, x, step_generator(seed, step))

    train_loop(name="vae", modules={"vae": vae}, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "vae.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR, warmup=min(50, max(1, steps // 10))))
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, seed=seed, n=scaling_scenes))
    vae.save_pretrained(out_dir / "vae")
    return vae


@torch.no_grad()
def reconstruct(vae, images: list[np.ndarray]) -> np.ndarray:
    """uint8 [B, 32, 32, 3] reconstructions through the posterior mean (deterministic)."""
    from testbed.build.common import images_to_tensor

    x = images_to_tensor(images)
    return tensor_to_images(vae.decode(vae.encode(x).latent_dist.mean).sample)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 image stacks (10 log10(255² / MSE))."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def evaluate_vae(vae, *, steps: int, n: int = 300) -> VaeReport:
    """PSNR and judge accuracy on reconstructions of ``n`` fixed seen and ``n`` held-out scenes."""
    results = {}
    for held_out in (False, True):
        scenes = eval_scenes(n, held_out=held_out)
        clean = np.stack([render(s) for s in scenes])
        recon = np.concatenate([reconstruct(vae, list(clean[i:i + 100])) for i in range(0, n, 100)])
        results[held_out] = (
            psnr(clean, recon),
            float(np.mean([judge(r, s.caption).correct for r, s in zip(recon, scenes, strict=True)])),
            float(np.mean([judge(c, s.caption).correct for c, s in zip(clean, scenes, strict=True)])),
        )
    return VaeReport(
        params=sum(p.numel() for p in vae.parameters()), steps=steps, scaling_factor=float(vae.config.scaling_factor),
        psnr_seen=results[False][0], psnr_held_out=results[True][0], judge_seen=results[False][1],
        judge_held_out=results[True][1], judge_clean_seen=results[False][2], judge_clean_held_out=results[True][2],
        n_eval=n,
    )


def finetune_decoder(out_dir: Path, vae, *, steps: int, seed: int, batch_size: int = BATCH_SIZE,
                     save_every: int = 20, stop_after: int | None = None):
    """Second stage: trains only the decoder (MSE of D(z) against x, z the frozen encoder's posterior
    mean) to ``steps`` and saves the VAE again. The encoder, hence the latents and ``scaling_factor`` the
    UNet is trained on, stay unchanged, so this stage can run alongside or after the UNet's training."""
    for p in vae.parameters():
        p.requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    for module in decoder:
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for m in decoder for p in m.parameters()], lr=PEAK_LR / 2, weight_decay=0.0)

    def loss_fn(step: int):
        x = render_batch(codec_scene_batch(seed + 3, step, batch_size))  # a stream apart from the first stage's
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        mse = (vae.decode(z).sample - x).pow(2).mean()
        return mse, {}

    train_loop(name="vae_decoder", modules={"vae": vae}, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "vae_decoder.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR / 2, warmup=min(20, max(1, steps // 10))))
    vae.eval()
    vae.requires_grad_(True)
    vae.save_pretrained(out_dir / "vae")
    return vae
