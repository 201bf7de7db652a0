"""LoRA fusion (TexForce): one adapter whose weight deltas are weighted sums of other adapters' deltas.

Inputs are diffusers LoRA directories read by ``actors.lora_files`` (its docstring gives the file
format and the notation A_i, B_i, s_i, Δ_i per adapted layer of adapter i, weight w_i).

The fused layer is Σ_i w_i Δ_i, represented *exactly* as one LoRA of rank Σ_i r_i:

    A = [A_1; A_2; ...]  (rows stacked)     B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] / s_out

which is correct for any mix of ranks (stacking A and B without the per-input scales, or summing
factors of equal rank, is not). ``rank=R`` then compresses each layer by a truncated SVD of the
product, computed through two thin QRs so the full [out, in] delta is never formed.

Everything here is pure tensor math plus file I/O; no Ray, no pipeline.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.lora_files import (
    COMPONENTS,
    WEIGHT_FILE,
    Adapter,
    LoraFusionError,
    LoraLayer,
    find_weight_file,
    harmonize_text_model_prefix,
    parse_input_spec,
    read_adapter,
)

PROVENANCE_FILE = "gard_fusion.json"


class TargetMismatchError(LoraFusionError):
    """Two inputs adapt different layers (or differently shaped layers) of the same component."""


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
    adapters = harmonize_text_model_prefix(adapters)
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
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LoraFusionError(f"--out {str(out_dir)!r} is a file; pass a directory for the fused adapter")
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
