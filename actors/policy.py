"""The diffusion policy: a diffusers Stable Diffusion 1.x/2.x pipeline with peft LoRA on the UNet
and/or the CLIP text encoder (TexForce, Chen et al., ECCV 2024).

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

from actors.ddim import check_ddim_schedule

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PolicySpec:
    """What a Policy is built from (the ``policy`` and ``sampling`` config sections, resolved).

    pretrained: a local pipeline directory or a hub id (hub ids need a cache or network access).
    train_targets: which networks carry a trainable adapter: ``unet``, ``text_encoder`` or both.
    lora_targets: UNet module names to adapt (attention projections by default, as DDPO).
    text_encoder_lora_*: the text encoder's adapter (TexForce: q, k, v and out projections).
    No defaults here: they live in the config (``cluster/config.py``), which builds this spec
    (``cluster/specs.py``; ``default_policy_spec`` for tests and benchmarks).
    """

    pretrained: str
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]
    dtype: str
    device: str
    num_steps: int
    guidance_scale: float
    eta: float
    resolution: int
    negative_prompt: str
    init_lora_seed: int
    train_targets: tuple[str, ...]
    text_encoder_lora_rank: int
    text_encoder_lora_alpha: float
    text_encoder_lora_targets: tuple[str, ...]
    timestep_spacing: str | None  # None: the pretrained scheduler's own

    def __post_init__(self):
        unknown = [t for t in self.train_targets if t not in TRAIN_TARGETS]
        if unknown or not self.train_targets:
            raise ValueError(f"policy.train_targets={list(self.train_targets)!r}: expected a non-empty list "
                             f"of {list(TRAIN_TARGETS)}")


TRAIN_TARGETS = ("unet", "text_encoder")
_TARGETS_FIELD = {"unet": "policy.lora_targets", "text_encoder": "policy.text_encoder_lora_targets"}


class AdapterBindingError(ValueError):
    """A requested LoRA target binds to no module, or perturbing its adapter does not change the output."""


class Policy:
    """A Stable Diffusion pipeline whose UNet and/or text encoder carry a trainable LoRA adapter."""

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
        # σ_t > 0 at the last step needs ᾱ_{t'} = alphas_cumprod[0] (``actors/ddim.py``), which is what
        # set_alpha_to_one=False gives; SD 1.x/2.x ship with it already.
        overrides = {"timestep_spacing": spec.timestep_spacing} if spec.timestep_spacing else {}
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False, **overrides)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        pipe.to(self.device)
        # init "gaussian": A ~ N(0, 1/r), B = 0, so the adapted model starts equal to the base.
        self.lora_configs: dict[str, LoraConfig] = {}
        if "unet" in spec.train_targets:
            self.lora_configs["unet"] = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha,
                                                   init_lora_weights="gaussian",
                                                   target_modules=list(spec.lora_targets))
        if "text_encoder" in spec.train_targets:
            self.lora_configs["text_encoder"] = LoraConfig(
                r=spec.text_encoder_lora_rank, lora_alpha=spec.text_encoder_lora_alpha,
                init_lora_weights="gaussian", target_modules=list(spec.text_encoder_lora_targets))
        self.adapted = {name: getattr(pipe, name) for name in self.lora_configs}  # fixed order: unet first
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_lora_seed)
            for name, module in self.adapted.items():
                try:
                    module.add_adapter(self.lora_configs[name])
                except ValueError as err:  # peft: none of the target modules exist in this network
                    raise AdapterBindingError(
                        f"{_TARGETS_FIELD[name]}={sorted(self.lora_configs[name].target_modules)} match no module "
                        f"of the {name}: {err}") from None
        # Trainable LoRA parameters stay float32 even when the frozen base runs in fp16/bf16.
        for module in self.adapted.values():
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        self.pipe = pipe
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.scheduler.set_timesteps(spec.num_steps, device=self.device)
        check_ddim_schedule(self.scheduler, eta=spec.eta)
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale_factor = pipe.vae_scale_factor
        if spec.resolution % self.vae_scale_factor:
            raise ValueError(
                f"sampling.resolution={spec.resolution} must be a multiple of the VAE scale factor "
                f"{self.vae_scale_factor}"
            )
        with torch.no_grad():
            self._negative_embeds = self.encode_prompts([spec.negative_prompt])

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self.adapted

    # ----- adapter -------------------------------------------------------------------------
    @torch.no_grad()
    def verify_adapters(self, *, perturbation: float = 1e-2) -> dict[str, int]:
        """Checks that every requested LoRA target is attached and live; returns {target: layers}.

        peft fails only when *no* target matches; a misspelt target beside valid ones binds to nothing
        silently, and an adapter can be attached yet never change the output (a zero scaling, a module
        off the forward path). For each target: at least one LoRA layer whose module name is the target
        or ends with ".target" (peft's rule), and adding ``perturbation``·N(0, 1) to those layers'
        B matrices must change the network's output (the UNet on one latent of the sampling size; the
        text encoder on one prompt). The weights are restored exactly. Raises AdapterBindingError.
        """
        counts: dict[str, int] = {}
        for name, module in self.adapted.items():
            layers = {n: m for n, m in module.named_modules() if hasattr(m, "lora_B")}
            probe = self._probe_fn(name)
            base = probe()
            for target in sorted(self.lora_configs[name].target_modules):
                bound = [m for n, m in layers.items() if n == target or n.endswith("." + target)]
                counts[f"{name}:{target}"] = len(bound)
                if not bound:
                    raise AdapterBindingError(
                        f"{_TARGETS_FIELD[name]}: target {target!r} matches no module of the {name} (LoRA layers "
                        f"bound for the other targets: {len(layers)}); check the module names of this model")
                weights = [p for m in bound for p in m.lora_B.parameters()]
                saved = [w.clone() for w in weights]
                gen = torch.Generator().manual_seed(0)
                for w in weights:
                    w.add_(perturbation * torch.randn(w.shape, generator=gen).to(w.device, w.dtype))
                changed = probe()
                for w, value in zip(weights, saved, strict=True):
                    w.copy_(value)
                if not torch.isfinite(changed).all() or not (changed != base).any():
                    raise AdapterBindingError(
                        f"{_TARGETS_FIELD[name]}: the LoRA on target {target!r} ({len(bound)} layers of the {name}) "
                        f"does not change the model's output when perturbed (lora alpha 0, or modules off the "
                        f"forward path?); refusing to train an adapter that cannot act")
        return counts

    def _probe_fn(self, name: str):
        """A deterministic forward of network ``name`` for ``verify_adapters``."""
        if name == "text_encoder":
            return lambda: self.encode_prompts(["a photo"]).float()
        size = self.spec.resolution // self.vae_scale_factor
        latents = torch.randn((1, self.latent_channels, size, size), generator=torch.Generator().manual_seed(0))
        latents = latents.to(self.device, self.dtype)
        t = self.scheduler.timesteps[:1].to(self.device)
        embeds = self._negative_embeds
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())

        def forward():
            with autocast:
                return self.unet(latents, t, embeds).sample.float()
        return forward

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA parameters, in a fixed order (the flat weight buffer's layout), names prefixed with
        the network (``unet.`` / ``text_encoder.``)."""
        return [(f"{name}.{n}", p) for name, module in self.adapted.items()
                for n, p in module.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        """The pretrained model: the same networks with their adapters disabled (no second copy)."""
        for module in self.adapted.values():
            module.disable_adapters()
        try:
            yield
        finally:
            for module in self.adapted.values():
                module.enable_adapters()

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """network -> its LoRA tensors under peft key names (float32, CPU)."""
        from peft.utils import get_peft_model_state_dict

        return {name: {k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in get_peft_model_state_dict(module).items()}
                for name, module in self.adapted.items()}

    def save_lora(self, directory: str | Path) -> Path:
        """Writes the adapters in diffusers format (``pipe.load_lora_weights(directory)`` loads the UNet
        and text-encoder adapters together)."""
        from diffusers import StableDiffusionPipeline

        # peft key names (lora_A / lora_B), which the loader reads for every layer type. diffusers'
        # convert_state_dict_to_diffusers renames only attention layers to the old lora.down/up
        # names and leaves conv LoRA as is; the loader then drops half of such a mixed adapter.
        states = self.lora_state_dicts()
        kwargs = {}
        for name, state in states.items():
            kwargs[f"{name}_lora_layers"] = state
            metadata = self.lora_configs[name].to_dict()
            if isinstance(metadata.get("target_modules"), (set, frozenset, list)):
                # peft keeps a set (hash order varies between processes): sorted, the file bytes are stable
                metadata["target_modules"] = sorted(metadata["target_modules"])
            kwargs[f"{name}_lora_adapter_metadata"] = metadata
        StableDiffusionPipeline.save_lora_weights(save_directory=str(directory), safe_serialization=True, **kwargs)
        return Path(directory)

    def load_lora(self, directory: str | Path) -> None:
        """Starts from an adapter saved in diffusers format (by ``save_lora`` or a diffusers training
        script using peft key names). Every adapted network must be present with the same layers and
        shapes; anything else is a ValueError naming the file and the offending keys."""
        from safetensors.torch import load_file

        path = Path(directory) / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise ValueError(f"policy.init_adapter: {str(path)!r} does not exist (expected a diffusers LoRA "
                             f"directory written by gard or save_lora_weights)")
        tensors = load_file(str(path))
        params = dict(self.named_trainable_parameters())
        # peft state-dict keys drop the adapter name ("...lora_A.weight"); module parameters carry it.
        by_key = {_strip_adapter_name(n): p for n, p in params.items()}
        missing = sorted(set(by_key) - set(tensors))
        unexpected = sorted(set(tensors) - set(by_key))
        if missing or unexpected:
            raise ValueError(
                f"policy.init_adapter {str(path)!r} does not match this policy's adapters "
                f"(train_targets={list(self.adapted)}): {len(missing)} missing keys {missing[:3]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}")
        for key, param in by_key.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(f"policy.init_adapter {str(path)!r}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"this policy expects {tuple(param.shape)} (different lora rank?)")
        with torch.no_grad():
            for key, param in by_key.items():
                param.copy_(tensors[key].to(param.dtype))

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
        """The negative prompt's embeddings [batch, 77, D]. With a trained text encoder they depend on
        the adapter (and carry gradients when enabled), so they are encoded anew, never cached."""
        if self.trains_text_encoder:
            return self.encode_prompts([self.spec.negative_prompt]).expand(batch, -1, -1)
        return self._negative_embeds.expand(batch, -1, -1)

    def guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε̂ (or v̂) with classifier-free guidance w: ε_u + w (ε_c - ε_u); w <= 1 skips the uncond pass.

        latents [B, C, h, w]; timesteps int tensor [] or [B]; prompt_embeds [B, 77, D];
        negative_embeds [B, 77, D] (default: ``negative_embeds(B)``; samplers pass them once per batch).
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
            negative = self.negative_embeds(batch) if negative_embeds is None else negative_embeds
            embeds = torch.cat([negative, prompt_embeds])
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


def _strip_adapter_name(name: str, adapter: str = "default") -> str:
    """``unet.x.to_q.lora_A.default.weight`` -> ``unet.x.to_q.lora_A.weight`` (the saved key)."""
    return name.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")
