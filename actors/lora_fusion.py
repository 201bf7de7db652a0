"""LoRA fusion (TexForce): one adapter whose weight deltas are weighted sums of other adapters' deltas.

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

The fused layer is Σ_i w_i Δ_i, represented *exactly* as one LoRA of rank Σ_i r_i:

    A = [A_1; A_2; ...]  (rows stacked)     B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] / s_out

which is correct for any mix of ranks (stacking A and B without the per-input scales, or summing
factors of equal rank, is not). ``rank=R`` then compresses each layer by a truncated SVD of the
product, computed through two thin QRs so the full [out, in] delta is never formed.

Everything here is pure tensor math plus file I/O; no Ray, no pipeline.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

COMPONENTS = ("unet", "text_encoder")  # what StableDiffusionPipeline.save_lora_weights can write
WEIGHT_FILE = "pytorch_lora_weights.safetensors"
PROVENANCE_FILE = "gard_fusion.json"
_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight$")
_TEXT_MODEL_PREFIX = "text_model."  # older transformers nest CLIPTextModel's layers under it


class LoraFusionError(ValueError):
    """A fusion input is unusable (missing, malformed, unsupported); the message names the input."""


class TargetMismatchError(LoraFusionError):
    """Two inputs adapt different layers (or differently shaped layers) of the same component."""


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
    tensors = load_file(str(file))
    metadata = read_metadata(file)
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


# ----- fusion math -------------------------------------------------------------------------------
def fuse_layers(layers: list[LoraLayer], weights: list[float]) -> LoraLayer:
    """Exact LoRA of Σ_i w_i Δ_i: A's stacked along the rank dim, B_i scaled by w_i s_i (rank Σ r_i).

    Zero-weight terms are left out (they add rank, not signal) unless every weight is zero, in
    which case the first layer is kept with a zero multiplier so the result still loads.
    """
    terms = [(w, layer) for w, layer in zip(weights, layers, strict=True) if w != 0.0]
    if not terms:
        terms = [(0.0, layers[0])]
    down = torch.cat([layer.down for _, layer in terms], dim=0)
    up = torch.cat([(w * layer.scale) * layer.up for w, layer in terms], dim=1)
    return LoraLayer(down=down, up=up, scale=1.0)


def compress_layer(layer: LoraLayer, *, rank: int) -> tuple[LoraLayer, float]:
    """Best rank-``rank`` approximation (Frobenius) of the layer's Δ, and its relative error.

    With B' = B·scale [out, k] and A [k, n] (n = in·kh·kw): B' = Q_B R_B, Aᵀ = Q_A R_A (thin QR), so
    Δ = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the small core R_B R_Aᵀ = U S Vᵀ gives Δ's singular values
    S. Keeping the top R: B = Q_B U_R √S_R, A = √S_R V_Rᵀ Q_Aᵀ. The relative error is
    ‖Δ − Δ_R‖_F / ‖Δ‖_F = sqrt(Σ_{j>R} S_j²) / sqrt(Σ_j S_j²) (0 for Δ = 0). A layer already of
    rank <= R is returned unchanged.
    """
    if rank < 1:
        raise LoraFusionError(f"--rank must be >= 1, got {rank}")
    if layer.rank <= rank:
        return layer, 0.0
    out = layer.up.shape[0]
    up = layer.up.reshape(out, -1).double() * layer.scale
    down = layer.down.reshape(layer.rank, -1).double()
    q_up, r_up = torch.linalg.qr(up)  # [out, k'], [k', k]
    q_down, r_down = torch.linalg.qr(down.T)  # [n, k''], [k'', k]
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)  # core [k', k'']
    keep = min(rank, s.numel())
    total = s.square().sum()
    rel_error = float((s[keep:].square().sum() / total).sqrt()) if total > 0 else 0.0
    root = s[:keep].sqrt()
    new_up = (q_up @ u[:, :keep]) * root  # [out, R]
    new_down = root[:, None] * (vh[:keep] @ q_down.T)  # [R, n]
    return (
        LoraLayer(
            down=new_down.float().reshape(keep, *layer.down.shape[1:]),
            up=new_up.float().reshape(out, keep, *layer.up.shape[2:]),
            scale=1.0,
        ),
        rel_error,
    )


# ----- fusion of adapters ------------------------------------------------------------------------
@dataclass
class FusionResult:
    """The fused adapter (component -> layer -> LoraLayer) and, with --rank, per-layer relative errors."""

    components: dict[str, dict[str, LoraLayer]]
    rel_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def ranks(self, component: str) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.components[component].items()}

    def max_rel_error(self) -> float:
        return max((e for errs in self.rel_errors.values() for e in errs.values()), default=0.0)


def _harmonize_text_model_prefix(adapters: list[Adapter]) -> list[Adapter]:
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


def check_same_layers(adapters: list[Adapter], *, component: str) -> None:
    """Raises TargetMismatchError unless every holder of ``component`` adapts the same, same-shaped layers."""
    holders = [a for a in adapters if component in a.components]
    reference = holders[0]
    ref_layers = reference.components[component]
    for other in holders[1:]:
        layers = other.components[component]
        missing, extra = sorted(set(ref_layers) - set(layers)), sorted(set(layers) - set(ref_layers))
        if missing or extra:
            raise TargetMismatchError(
                f"input {str(other.path)!r} adapts different {component} layers "
                f"than {str(reference.path)!r}: "
                f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), "
                f"{len(extra)} extra (e.g. {', '.join(extra[:3]) or '-'}). Fusion needs the same target "
                "modules (e.g. the same policy.lora_targets) for a component present in several inputs"
            )
        for name, layer in layers.items():
            ref = ref_layers[name]
            if layer.up.shape[0] != ref.up.shape[0] or layer.down.shape[1:] != ref.down.shape[1:]:
                raise TargetMismatchError(
                    f"input {str(other.path)!r}: {component} layer {name} has Δ shape "
                    f"{tuple(layer.delta().shape)} but {tuple(ref.delta().shape)} in {str(reference.path)!r} "
                    "(adapters of different base models?)"
                )


def fuse_adapters(adapters: list[Adapter], weights: list[float], *, rank: int | None = None) -> FusionResult:
    """Σ_i w_i Δ_i for every layer of every component, exact (rank Σ r_i) or SVD-compressed to ``rank``.

    A component present in only some inputs is carried over with those inputs' weights (so a
    text-encoder adapter and a UNet adapter from different runs combine into one adapter).
    """
    if not adapters:
        raise LoraFusionError("no inputs to fuse")
    if len(weights) != len(adapters):
        raise LoraFusionError(f"{len(adapters)} inputs but {len(weights)} weights")
    adapters = _harmonize_text_model_prefix(adapters)
    result = FusionResult(components={})
    for component in COMPONENTS:
        holders = [(a, w) for a, w in zip(adapters, weights, strict=True) if component in a.components]
        if not holders:
            continue
        check_same_layers([a for a, _ in holders], component=component)
        fused: dict[str, LoraLayer] = {}
        errors: dict[str, float] = {}
        for name in holders[0][0].components[component]:
            layer = fuse_layers([a.components[component][name] for a, _ in holders], [w for _, w in holders])
            if rank is not None:
                layer, errors[name] = compress_layer(layer, rank=rank)
            fused[name] = layer
        result.components[component] = fused
        if rank is not None:
            result.rel_errors[component] = errors
    return result


# ----- output ------------------------------------------------------------------------------------
def _rank_pattern(ranks: dict[str, int], *, default: int) -> dict[str, int]:
    """peft ``rank_pattern`` for the layers whose rank differs from ``default``, checked to resolve uniquely.

    peft matches a pattern key k against a module name m as ``(.*\\.)?k$``, so a full layer name
    could also catch another layer whose name ends in ``.<that name>``; anchoring with '^' (as
    diffusers does) removes that ambiguity when it occurs.
    """
    from peft.utils.other import get_pattern_key

    odd = {name: r for name, r in ranks.items() if r != default}

    def resolves(pattern: dict[str, int]) -> bool:
        return all(
            pattern.get(get_pattern_key(pattern.keys(), name), default) == r for name, r in ranks.items()
        )

    if resolves(odd):
        return odd
    anchored = {f"^{name}": r for name, r in odd.items()}
    if not resolves(anchored):
        raise LoraFusionError(
            "could not express the fused per-layer ranks as an unambiguous peft rank_pattern"
        )
    return anchored


def component_state(layers: dict[str, LoraLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-named tensors and the LoraConfig dict that reproduce each layer's Δ when loaded.

    The config has r = the most common rank, lora_alpha = r and target_modules = the exact layer
    names; other ranks go in rank_pattern and their different scale alpha/r_l is folded into B,
    so no alpha_pattern is needed.
    """
    from peft import LoraConfig

    ranks = {name: layer.rank for name, layer in layers.items()}
    default = Counter(ranks.values()).most_common(1)[0][0]
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out_scale = default / layer.rank  # alpha / r_l with alpha = default
        state[f"{name}.lora_A.weight"] = layer.down.float().contiguous()
        state[f"{name}.lora_B.weight"] = (layer.up * (layer.scale / out_scale)).float().contiguous()
    config = LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(layers),
        rank_pattern=_rank_pattern(ranks, default=default),
    )
    return state, config.to_dict()


def save_adapter(result: FusionResult, out_dir: str | Path, *, provenance: dict | None = None) -> Path:
    """Writes the fused adapter in diffusers format (``pipe.load_lora_weights(out_dir)`` loads it).

    provenance: optional JSON-able record (inputs, weights, ranks, errors) written next to it.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    kwargs = {}
    for component, layers in result.components.items():
        state, config = component_state(layers)
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = config
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), safe_serialization=True, **kwargs)
    if provenance is not None:
        (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out_dir


def fuse_lora_dirs(
    specs: list[str], *, out_dir: str | Path, rank: int | None = None, overwrite: bool = False
) -> FusionResult:
    """``gard fuse-lora``: parses ``PATH[:WEIGHT]`` specs, fuses the adapters and writes ``out_dir``.

    Inputs are all read (and checked) before anything is written; an existing output file is
    only replaced with ``overwrite``.
    """
    if not specs:
        raise LoraFusionError("no inputs to fuse: pass one or more adapter directories as PATH[:WEIGHT]")
    if rank is not None and rank < 1:
        raise LoraFusionError(f"--rank must be >= 1, got {rank}")
    parsed = [parse_input_spec(spec) for spec in specs]
    for path, _ in parsed:
        find_weight_file(path)  # every path checked before the (slower) reading starts
    out_file = Path(out_dir) / WEIGHT_FILE
    if out_file.exists() and not overwrite:
        raise LoraFusionError(f"{str(out_file)!r} already exists; pass --overwrite to replace it")
    adapters = [read_adapter(path) for path, _ in parsed]
    weights = [w for _, w in parsed]
    result = fuse_adapters(adapters, weights, rank=rank)
    provenance = {
        "inputs": [{"path": str(path), "weight": w} for path, w in parsed],
        "rank": rank,
        "ranks": {c: sorted(set(result.ranks(c).values())) for c in result.components},
        "max_rel_error": result.max_rel_error(),
    }
    save_adapter(result, out_dir, provenance=provenance)
    return result
