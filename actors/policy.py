"""The diffusion policy: a diffusers Stable Diffusion 1.x/2.x pipeline with peft LoRA on the UNet.

The policy owns the network pieces both the samplers and the learner need: prompt encoding,
the classifier-free-guided network output, the reference model (the same UNet with its adapters
disabled, DPOK / GARD eq. 9 and 15: no second copy of the weights), image decoding, and the
adapter's trainable parameters. Sampling loops live in ``actors/sampler.py``; losses in ``learner/``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PolicySpec:
    """What a Policy is built from (the ``policy`` and ``sampling`` config sections, resolved).

    pretrained: a local pipeline directory or a hub id (hub ids need a cache or network access).
    lora_targets: UNet module names to adapt (attention projections by default, as DDPO).
    """

    pretrained: str
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dtype: str = "float32"
    device: str = "cpu"
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    resolution: int = 64
    negative_prompt: str = ""
    init_lora_seed: int = 0


class Policy:
    """A Stable Diffusion pipeline whose UNet carries one trainable LoRA adapter."""

    def __init__(self, spec: PolicySpec):
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from peft import LoraConfig
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # actor logs stay readable
        transformers_logging.disable_progress_bar()
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = _DTYPES[spec.dtype]
        local = Path(spec.pretrained).exists()
        pipe = StableDiffusionPipeline.from_pretrained(
            spec.pretrained,
            dtype=self.dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local,
        )
        # σ_t > 0 at the last step needs ᾱ_{t'} = alphas_cumprod[0] (DESIGN.md §3), which is what
        # set_alpha_to_one=False gives; SD 1.x/2.x ship with it already.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        pipe.to(self.device)
        self.lora_config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapted model starts equal to the base
            target_modules=list(spec.lora_targets),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_lora_seed)
            pipe.unet.add_adapter(self.lora_config)
        # Trainable LoRA parameters stay float32 even when the frozen base runs in fp16/bf16.
        for param in pipe.unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        self.pipe = pipe
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.scheduler.set_timesteps(spec.num_steps, device=self.device)
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale_factor = pipe.vae_scale_factor
        if spec.resolution % self.vae_scale_factor:
            raise ValueError(
                f"sampling.resolution={spec.resolution} must be a multiple of the VAE scale factor "
                f"{self.vae_scale_factor}"
            )
        self._negative_embeds = self.encode_prompts([spec.negative_prompt])

    # ----- adapter -------------------------------------------------------------------------
    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA parameters, in a fixed order (the flat weight buffer's layout)."""
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        """The pretrained model: the same UNet with its adapters disabled (no second copy)."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def save_lora(self, directory: str | Path) -> Path:
        """Writes the adapter in diffusers format (``pipe.load_lora_weights(directory)`` loads it)."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        # peft key names (lora_A / lora_B), which the loader reads for every layer type. diffusers'
        # convert_state_dict_to_diffusers renames only attention layers to the old lora.down/up
        # names and leaves conv LoRA as is; the loader then drops half of such a mixed adapter.
        state = get_peft_model_state_dict(self.unet)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(directory),
            unet_lora_layers=state,
            unet_lora_adapter_metadata=self.lora_config.to_dict(),
            safe_serialization=True,
        )
        return Path(directory)

    # ----- network pieces ------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings [B, 77, D] (the pipeline's own tokenization: padded to max length)."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(tokens)[0].to(self.dtype)

    def negative_embeds(self, batch: int) -> torch.Tensor:
        return self._negative_embeds.expand(batch, -1, -1)

    def guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ (or v̂) with classifier-free guidance w: ε_u + w (ε_c - ε_u); w <= 1 skips the uncond pass.

        latents [B, C, h, w]; timesteps int tensor [] or [B]; prompt_embeds [B, 77, D].
        """
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=self.device).expand(batch)
        w = self.spec.guidance_scale
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            if w <= 1.0:
                return self.unet(latents.to(self.dtype), timesteps, prompt_embeds).sample.float()
            model_in = torch.cat([latents, latents]).to(self.dtype)
            embeds = torch.cat([self.negative_embeds(batch), prompt_embeds])
            uncond, cond = self.unet(model_in, torch.cat([timesteps, timesteps]), embeds).sample.float().chunk(2)
        return uncond + w * (cond - uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3] (the pipeline's postprocessing, quantized)."""
        images = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """x_T ~ N(0, I) drawn like ``StableDiffusionPipeline.prepare_latents`` (same generator order)."""
        from diffusers.utils.torch_utils import randn_tensor

        size = self.spec.resolution // self.vae_scale_factor
        shape = (batch, self.latent_channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma
