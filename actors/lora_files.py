"""LoRA adapter files: reading diffusers LoRA safetensors into per-layer factors and scales.

An adapter is a diffusers LoRA directory (``pytorch_lora_weights.safetensors``, what
``Policy.save_lora`` writes): keys ``{component}.{layer}.lora_A.weight`` / ``.lora_B.weight`` in peft
naming, ``component`` in {``unet``, ``text_encoder``}, and the component's ``LoraConfig`` packed into
the safetensors metadata (``lora_adapter_metadata``; keys ``unet.r``, ``unet.lora_alpha``, ...).

Notation, per adapted layer of adapter i (weights w_i from the command line):

    A_i  [r_i, in]        conv: [r_i, in, kh, kw]    (lora_A, "down")
    B_i  [out, r_i]       conv: [out, r_i, 1, 1]     (lora_B, "up")
    s_i  = alpha_i / r_i  (alpha_i / sqrt(r_i) with use_rslora; 1 when the file has no metadata,
                           the diffusers convention)
    Δ_i  = s_i · B_i @ A_i                           (conv: flatten A to [r_i, in·kh·kw], reshape back)

``actors.lora_fusion`` fuses adapters read here and writes the result. Pure tensor code plus file
reading; no Ray, no pipeline.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

COMPONENTS = ("unet", "text_encoder")  # what StableDiffusionPipeline.save_lora_weights can write
WEIGHT_FILE = "pytorch_lora_weights.safetensors"
_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight$")
_TEXT_MODEL_PREFIX = "text_model."  # older transformers nest CLIPTextModel's layers under it


class LoraFusionError(ValueError):
    """A fusion input is unusable (missing, malformed, unsupported); the message names the input."""


# ----- inputs ------------------------------------------------------------------------------------
def parse_input_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); the weight defaults to 1.0.

    Only a suffix after the last ':' that parses as a float is a weight, so paths containing ':'
    still work; a path that exists as written wins over reading its suffix as a weight.
    """
    path_text, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            weight = float(tail)
            path_text = head
        except ValueError:
            pass  # the ':' belongs to the path
    if not math.isfinite(weight):
        raise LoraFusionError(f"input {spec!r}: weight {tail!r} is not a finite number")
    return Path(path_text), weight


def find_weight_file(path: str | Path) -> Path:
    """The safetensors file of an adapter given as a directory (or as the file itself)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraFusionError(f"input {str(path)!r} is not a .safetensors file")
        return path
    if not path.is_dir():
        raise LoraFusionError(f"input {str(path)!r} does not exist (expected an adapter directory)")
    if (path / WEIGHT_FILE).is_file():
        return path / WEIGHT_FILE
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(c.name for c in candidates) or "none"
    raise LoraFusionError(
        f"input {str(path)!r}: expected {WEIGHT_FILE} (or exactly one .safetensors file), found {found}"
    )


# ----- one adapter -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer, Δ = scale · up @ down.

    down: A, float32 [r, in] (linear) or [r, in, kh, kw] (conv).
    up: B, float32 [out, r] (linear) or [out, r, 1, 1] (conv).
    scale: the effective multiplier (alpha / r for a layer read from a file).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """Δ, float32 [out, in] or [out, in, kh, kw] (the shape of the base layer's weight)."""
        product = self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1)
        return (self.scale * product).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from disk: component -> {layer name -> LoraLayer} (layer names as in the model)."""

    path: Path
    components: dict[str, dict[str, LoraLayer]]


def read_metadata(file: Path) -> dict[str, dict]:
    """Per-component LoraConfig dicts from the safetensors metadata (diffusers' packing, undone).

    diffusers writes one JSON object under ``lora_adapter_metadata`` whose top-level keys carry the
    component as a prefix (``unet.r``); a component without any key had no metadata.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    per_component: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, _, name = key.partition(".")
        per_component.setdefault(component, {})[name] = value
    return per_component


def layer_scale(config: dict | None, *, layer: str, rank: int, where: str) -> float:
    """s = alpha / r for ``layer`` under ``config`` (per-layer rank/alpha patterns resolved as peft does).

    config: the component's LoraConfig dict, or None (no metadata: diffusers then uses alpha = r, s = 1).
    rank: the rank of the stored tensors, checked against the config (peft would refuse to load otherwise).
    """
    if config is None:
        return 1.0
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    config_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), layer), config.get("r", rank))
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), layer), config.get("lora_alpha", config_rank)
    )
    if int(config_rank) != rank:
        raise LoraFusionError(
            f"{where}: layer {layer} stores rank {rank} but its LoRA config says r={config_rank}"
        )
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def read_adapter(path: str | Path) -> Adapter:
    """Reads an adapter directory (or .safetensors file) into float32 LoraLayers with their scales."""
    from safetensors.torch import load_file

    file = find_weight_file(path)
    where = f"input {str(path)!r}"
    try:
        tensors = load_file(str(file))
        metadata = read_metadata(file)
    except Exception as err:  # safetensors' and JSON's errors alike: the file is not an adapter
        raise LoraFusionError(f"{where}: {file.name} is not a readable safetensors LoRA file with diffusers "
                              f"metadata ({type(err).__name__}: {err})") from None
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoraFusionError(
                f"{where}: unsupported key {key!r}; only plain LoRA in peft naming "
                "(<component>.<layer>.lora_A.weight / .lora_B.weight) can be fused, not DoRA, LoRA biases, "
                "embedding LoRA or the old lora.down/lora.up naming"
            )
        parts.setdefault((match["component"], match["layer"]), {})[match["part"]] = tensor.to(torch.float32)
    components: dict[str, dict[str, LoraLayer]] = {}
    for (component, layer), pair in sorted(parts.items()):
        if component not in COMPONENTS:
            raise LoraFusionError(
                f"{where}: component {component!r} is not supported (supported: {COMPONENTS})"
            )
        if set(pair) != {"A", "B"}:
            raise LoraFusionError(f"{where}: layer {component}.{layer} has lora_{''.join(pair)} but not both")
        down, up = pair["A"], pair["B"]
        if up.shape[1] != down.shape[0] or up.dim() != down.dim() or any(s != 1 for s in up.shape[2:]):
            raise LoraFusionError(
                f"{where}: layer {component}.{layer} has incompatible lora_A {tuple(down.shape)} "
                f"and lora_B {tuple(up.shape)}"
            )
        scale = layer_scale(metadata.get(component), layer=layer, rank=down.shape[0], where=where)
        components.setdefault(component, {})[layer] = LoraLayer(down=down, up=up, scale=scale)
    if not components:
        raise LoraFusionError(f"{where}: {file.name} holds no LoRA weights")
    return Adapter(path=Path(path), components=components)


# ----- several adapters -------------------------------------------------------------------------
def harmonize_text_model_prefix(adapters: list[Adapter]) -> list[Adapter]:
    """Drops the ``text_model.`` layer prefix when only some inputs' text-encoder layers carry it.

    Adapters saved with older transformers name CLIP layers ``text_model.encoder...``; newer ones
    ``encoder...``; diffusers' loader strips the prefix for the newer model, so the unprefixed
    names are the common ground.
    """
    prefixed = [
        all(name.startswith(_TEXT_MODEL_PREFIX) for name in a.components["text_encoder"])
        for a in adapters
        if "text_encoder" in a.components
    ]
    if len(set(prefixed)) < 2:
        return adapters
    harmonized = []
    for adapter in adapters:
        components = dict(adapter.components)
        if "text_encoder" in components:
            components["text_encoder"] = {
                name.removeprefix(_TEXT_MODEL_PREFIX): layer
                for name, layer in components["text_encoder"].items()
            }
        harmonized.append(Adapter(path=adapter.path, components=components))
    return harmonized
