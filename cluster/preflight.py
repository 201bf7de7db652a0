"""Checks that need the model files or the environment but not Ray: run in the driver before any actor
starts (the model reference, the scheduler, the adapters' targets and ranks, the resolution, the
initial adapter, the optional packages the logging section asks for).

A bad scheduler found inside an actor would surface as an actor that died at start-up; found here, it
is one paragraph naming the field (exit code 2) and the run directory is not written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.config import Config, ConfigError


def check_scheduler(config: Config, *, pretrained: str) -> None:
    """Builds the DDIM scheduler the samplers will use (the model's own config, ``set_alpha_to_one=False``,
    ``sampling.timestep_spacing`` if set) and refuses a schedule with a step of σ_t = 0
    (``actors.ddim.check_ddim_schedule``). A hub id without a local copy is checked in the actors."""
    from diffusers import DDIMScheduler

    from actors.ddim import check_ddim_schedule

    scheduler_dir = Path(pretrained) / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        return
    overrides = {"timestep_spacing": config.sampling.timestep_spacing} if config.sampling.timestep_spacing else {}
    scheduler = DDIMScheduler.from_pretrained(str(scheduler_dir), set_alpha_to_one=False, **overrides)
    try:
        scheduler.set_timesteps(config.sampling.num_steps)  # more steps than training timesteps: ValueError
        check_ddim_schedule(scheduler, eta=config.sampling.eta)
    except ValueError as err:
        raise ConfigError(f"policy.pretrained = {config.policy.pretrained!r} with sampling.num_steps = "
                          f"{config.sampling.num_steps}: {err}") from None


def check_pretrained(config: Config, *, cache_dir: str) -> str:
    """``policy.pretrained`` -> the absolute local pipeline directory (``tiny:`` names built here), or a
    hub id left to the actors when the hub is reachable; ConfigError for an unknown ``tiny:`` name, a
    directory that is not a diffusers pipeline, or a hub id with no local copy while offline."""
    from actors.tiny import resolve_pretrained

    name = config.policy.pretrained
    try:
        resolved = resolve_pretrained(name, cache_dir=Path(cache_dir).resolve())
    except ValueError as err:
        raise ConfigError(f"policy.pretrained = {name!r}: {err}") from None
    path = Path(resolved)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"policy.pretrained = {name!r}: {str(path)!r} has no model_index.json; expected a "
                              f"diffusers pipeline directory (StableDiffusionPipeline.save_pretrained output)")
        return str(path.resolve())
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"policy.pretrained = {name!r}: no such directory (expected a diffusers pipeline "
                          f"directory, a hub id such as runwayml/stable-diffusion-v1-5, or tiny:sd)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "model_index.json"), str):
            raise ConfigError(f"policy.pretrained = {name!r}: not in the local Hugging Face cache, and "
                              f"HF_HUB_OFFLINE=1 forbids downloading it; download it first or pass a local directory")
    return name


def _adaptable_layers(module) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every Linear/Conv layer: a LoRA of rank r on it is [r, in] x [out, r]."""
    import torch

    dims = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            dims[name] = (layer.in_features, layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            dims[name] = (layer.in_channels * kh * kw, layer.out_channels)
    return dims


def _check_targets(layers: dict[str, tuple[int, int]], *, targets, rank: int, field: str, network: str) -> None:
    rank_field = field.replace("lora_targets", "lora_rank")
    for target in targets:
        bound = {n: d for n, d in layers.items() if n == target or n.endswith("." + target)}
        if not bound:
            raise ConfigError(f"{field}: {target!r} matches no Linear/Conv2d layer of the {network} (names are "
                              f"matched as suffixes, e.g. to_q or attn1.to_q)")
        name, (d_in, d_out) = min(bound.items(), key=lambda item: min(item[1]))
        if rank > min(d_in, d_out):
            raise ConfigError(f"{rank_field} = {rank} exceeds the dimensions of {network} layer {name!r} "
                              f"({d_in} -> {d_out}), targeted by {target!r}: a LoRA update has rank at most "
                              f"min(in, out) = {min(d_in, d_out)}; use a smaller rank or other targets")


def check_policy(config: Config, *, pretrained: str) -> None:
    """The adapters and the image size against a local pipeline's configs, built on the meta device (no
    weights are read): every LoRA target matches a layer, ranks fit the layers, the resolution fits the
    VAE and the UNet's downsampling. (``policy.init_adapter``'s ranks: ``check_init_adapter``.)"""
    path = Path(pretrained)
    if not (path / "unet" / "config.json").is_file():
        return  # a hub id: the actors check it when they load it
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pol = config.policy
    unet_config = UNet2DConditionModel.load_config(str(path / "unet"))
    vae_config = AutoencoderKL.load_config(str(path / "vae"))
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["down_block_types"]) - 1)
    if config.sampling.resolution % factor:
        raise ConfigError(f"sampling.resolution = {config.sampling.resolution} is not a multiple of {factor}, which "
                          f"this model's VAE and UNet downsampling need")
    with init_empty_weights():
        networks = {"unet": UNet2DConditionModel.from_config(unet_config)}
        if "text_encoder" in pol.train_targets:
            from transformers import CLIPTextConfig, CLIPTextModel

            networks["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(str(path / "text_encoder")))
    if "unet" in pol.train_targets:
        _check_targets(_adaptable_layers(networks["unet"]), targets=pol.lora_targets, rank=pol.lora_rank,
                       field="policy.lora_targets", network="UNet")
    if "text_encoder" in pol.train_targets:
        _check_targets(_adaptable_layers(networks["text_encoder"]), targets=pol.text_encoder_lora_targets,
                       rank=pol.text_encoder_lora_rank, field="policy.text_encoder_lora_targets",
                       network="text encoder")


def check_init_adapter(config: Config) -> None:
    """The ranks of ``policy.init_adapter``'s LoRA tensors equal the configured ones (read from the
    safetensors header, not the tensors), and so do the alphas its diffusers metadata records (LoRA
    scales its update by alpha / rank: the same tensors under another alpha are another adapter)."""
    from safetensors import safe_open

    pol = config.policy
    expected = {"unet": pol.lora_rank, "text_encoder": pol.text_encoder_lora_rank}
    file = Path(pol.init_adapter) / "pytorch_lora_weights.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any unreadable header is the same user error
        raise ConfigError(f"policy.init_adapter = {pol.init_adapter!r}: {file.name} is not a readable "
                          f"safetensors file ({err})") from None
    for key, shape in shapes.items():
        component = key.split(".", 1)[0]
        if ".lora_A." in key and component in expected and shape[0] != expected[component]:
            field = "policy.lora_rank" if component == "unet" else "policy.text_encoder_lora_rank"
            raise ConfigError(f"policy.init_adapter = {pol.init_adapter!r} has rank {shape[0]} ({key}), but "
                              f"{field} = {expected[component]}; set {field}={shape[0]} or use another adapter")
    try:  # diffusers' save_lora_weights packs each network's LoraConfig as "<network>.<key>"
        saved = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        saved = {}
    present = {key.split(".", 1)[0] for key in shapes}
    for component, alpha in (("unet", pol.lora_alpha), ("text_encoder", pol.text_encoder_lora_alpha)):
        recorded = saved.get(f"{component}.lora_alpha") if isinstance(saved, dict) else None
        if component in present and isinstance(recorded, (int, float)) and float(recorded) != float(alpha):
            field = "policy.lora_alpha" if component == "unet" else "policy.text_encoder_lora_alpha"
            raise ConfigError(f"policy.init_adapter = {pol.init_adapter!r} was saved with lora_alpha {recorded:g} "
                              f"for the {component}, but {field} = {alpha:g}; LoRA scales its update by alpha / "
                              f"rank, so it would act {alpha / recorded:g} times as strong as saved; set "
                              f"{field}={recorded:g} or use another adapter")


def check_logging(config: Config) -> None:
    """``logging.wandb`` needs an importable wandb package (imported here, so that a missing one stops
    the run before Ray starts or the run directory is written)."""
    if config.logging.wandb and config.logging.wandb_mode != "disabled":
        from cluster.wandb_logger import require_wandb

        require_wandb()


def check_reward_models(config: Config) -> None:
    """Resolves each reward's model shortcuts (``tiny:clip``, ``tiny:shapes-clip``, ``tiny:shapes-llava``) as the run will: a shipped
    model that is missing or fails its manifest stops the run here, naming the reward."""
    from cluster.specs import resolve_reward_specs

    for section, rewards in (("rewards", config.rewards), ("evaluation.rewards", config.evaluation.rewards)):
        try:
            resolve_reward_specs(rewards, cache_dir=config.cache_dir)
        except (OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"{section}: {err}") from None


def check_models(config: Config) -> str:
    """What ``gard train`` and ``gard eval`` check before Ray starts: the reward models, the base model,
    its DDIM schedule, the adapters against it and ``policy.init_adapter``'s ranks (that one also for a
    hub id, from the adapter file alone). Returns the resolved ``policy.pretrained``."""
    check_reward_models(config)
    pretrained = check_pretrained(config, cache_dir=config.cache_dir)
    check_scheduler(config, pretrained=pretrained)
    check_policy(config, pretrained=pretrained)
    if config.policy.init_adapter:
        check_init_adapter(config)
    return pretrained
