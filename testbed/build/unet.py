"""The shapes world's denoiser: a diffusers ``UNet2DConditionModel`` (~1.5M params, 8×8 latents,
cross-attention to the text encoder's last hidden states), and the assembled ``StableDiffusionPipeline``.

Objective (DDPM, Ho et al. 2020, eq. 14, ε-prediction, conditioned as in Rombach et al. 2022, eq. 2):
    z0 = scaling_factor · z,  z ~ q(z|x) of the frozen VAE            [B, 4, 8, 8]
    t ~ U{0..999},  ε ~ N(0, I),  z_t = sqrt(ᾱ_t) z0 + sqrt(1−ᾱ_t) ε   (the scheduler's ``add_noise``)
    c = text_encoder(prompt).last_hidden_state                         [B, 77, hidden]; the empty prompt's
        with probability ``CFG_DROPOUT``, so classifier-free guidance (Ho & Salimans 2022, eq. 6) works
    L = mean ‖ε − ε_θ(z_t, t, c)‖²
ᾱ_t is the scaled-linear schedule of Stable Diffusion (β from 0.00085 to 0.012 over 1000 steps), the
same ``DDIMScheduler`` the pipeline samples with. The VAE and the text encoder are frozen, so the training
set is precomputed once: latent posteriors of a pool of training-split scenes and the text states of
its distinct captions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from testbed.build.common import cosine_lr, scene_batch, step_generator, train_loop
from testbed.world import render

BATCH_SIZE = 32
PEAK_LR = 1e-3
CFG_DROPOUT = 0.1
POOL_SIZE = 2048


def make_scheduler():
    """The DDIM scheduler of the pipeline (the noise schedule training and sampling share)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def make_unet(seed: int, *, cross_attention_dim: int):
    """A freshly initialised UNet for 4×8×8 latents; cross-attention at 4×4 and 2×2, where a token's
    receptive field covers whole objects."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # diffusers initialises through the global generator
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
        )


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[N, 77, hidden] text states, tokenised exactly as ``StableDiffusionPipeline.encode_prompt`` does."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def latent_pool(vae, text_encoder, tokenizer, *, seed: int, size: int = POOL_SIZE):
    """The precomputed training set: posterior means and stds [P, 4, 8, 8] of ``size`` training-split
    scenes, caption indices [P], and the text states [C + 1, 77, hidden] of the distinct captions with
    the empty prompt last."""
    from testbed.build.common import images_to_tensor

    scenes = scene_batch(seed + 2, 0, size)
    means, stds = [], []
    for i in range(0, size, 256):
        dist = vae.encode(images_to_tensor([render(s) for s in scenes[i:i + 256]])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    captions = sorted({s.caption for s in scenes})
    index = {c: i for i, c in enumerate(captions)}
    states = encode_prompts(text_encoder, tokenizer, [*captions, ""])
    return torch.cat(means), torch.cat(stds), torch.tensor([index[s.caption] for s in scenes]), states


def diffusion_loss(unet, scheduler, z0: torch.Tensor, states: torch.Tensor, generator: torch.Generator):
    """The ε-prediction loss of the module docstring; z0 [B, 4, 8, 8] scaled latents, states [B, 77, H]."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    z_t = scheduler.add_noise(z0, noise, t)
    mse = (unet(z_t, t, encoder_hidden_states=states).sample - noise).pow(2).mean()
    return mse, {}


def train_unet(out_dir: Path, vae, text_encoder, tokenizer, *, steps: int, seed: int, batch_size: int = BATCH_SIZE,
               save_every: int = 100, pool_size: int = POOL_SIZE, stop_after: int | None = None):
    """Trains (or resumes) the UNet on the frozen VAE's latents to ``steps``; saves out_dir/unet."""
    vae.eval()
    text_encoder.eval()
    means, stds, caption_idx, states = latent_pool(vae, text_encoder, tokenizer, seed=seed, size=pool_size)
    empty = states.shape[0] - 1
    scale = float(vae.config.scaling_factor)
    unet = make_unet(seed, cross_attention_dim=text_encoder.config.hidden_size)
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PEAK_LR, weight_decay=1e-4)

    def loss_fn(step: int):
        g = step_generator(seed, step, stream=3)
        pick = torch.randint(0, means.shape[0], (batch_size,), generator=g)
        z0 = scale * (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=g))
        drop = torch.rand(batch_size, generator=g) < CFG_DROPOUT
        cond = states[torch.where(drop, torch.full_like(pick, empty), caption_idx[pick])]
        return diffusion_loss(unet, scheduler, z0, cond, g)

    train_loop(name="unet", modules={"unet": unet}, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "unet.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR, warmup=min(100, max(1, steps // 10))))
    unet.eval()
    unet.save_pretrained(out_dir / "unet")
    return unet


def assemble_pipeline(out_dir: Path, vae, text_encoder, tokenizer, unet, *, dtype: torch.dtype = torch.float16) -> Path:
    """Saves the StableDiffusionPipeline (no safety checker) with ``dtype`` safetensors to out_dir/pipeline
    and writes its manifest; returns the directory."""
    from diffusers import StableDiffusionPipeline

    from testbed.build.manifest import write_manifest

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    target = out_dir / "pipeline"
    pipe.to(dtype=dtype).save_pretrained(target, safe_serialization=True)
    pipe.to(dtype=torch.float32)  # the caller's modules stay usable for fp32 evaluation
    strip_source_paths(target)
    write_manifest(target)
    return target



def strip_source_paths(directory: Path) -> None:
    """Drops ``_name_or_path`` from the saved configs: a module loaded from a build directory records
    that machine's path there, which means nothing where the pipeline is shipped."""
    import json

    for config in sorted(Path(directory).glob("*/config.json")):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
