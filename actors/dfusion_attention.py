"""D-Fusion's attention side: prompt-token selection, the fusion mask, the fused self-attention and
the diffusers attention processor that records cross-attention maps and keys/values and fuses them.

Hu, Zhang & Kuang, "D-Fusion: Direct Preference Optimization for Aligning Diffusion Models with
Visually Consistent Samples" (ICML 2025, arXiv 2505.22002), §3.2. The method, its notation (P pairs,
latents [P, C, h, w], UNet attention layer ℓ with L_ℓ = h_ℓ w_ℓ spatial tokens, H heads of width d,
S = 77 text tokens, N = 2P UNet rows with classifier-free guidance, else P) and the numbered steps
cited below are in the ``actors.dfusion`` module docstring; ``actors.dfusion.dfusion`` drives the
``FusionController`` defined here around each UNet call.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from actors.dfusion import DFusionSpec

MASK_NORMALIZE = ("minmax", "max", "none")


# ----- tokens and masks (pure functions) ---------------------------------------------------------
def content_token_positions(tokenizer, prompts: list[str]) -> list[list[int]]:
    """For each prompt, the positions of its content tokens in the padded 77-token sequence: 1..n,
    between BOS (0) and EOS (n + 1); padding and truncated text excluded."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True)
    return [list(range(1, int(sum(mask)) - 1)) for mask in enc["attention_mask"]]


def token_selection(tokenizer, prompts: list[str], positions: tuple[int, ...] | None = None) -> torch.Tensor:
    """Bool [P, S]: the tokens whose cross-attention builds each prompt's mask (``DFusionSpec``)."""
    content = content_token_positions(tokenizer, prompts)
    selected = torch.zeros(len(prompts), tokenizer.model_max_length, dtype=torch.bool)
    for row, tokens in enumerate(content):
        chosen = tokens if positions is None else sorted(set(positions) & set(tokens))
        selected[row, chosen] = True
    return selected


def build_mask(maps: torch.Tensor, selected: torch.Tensor, *, threshold: float,
               normalize: str = "minmax") -> torch.Tensor:
    """The binary fusion mask from averaged cross-attention maps (``actors.dfusion`` docstring, step 1).

    maps: [P, S, h, w] mean attention probability of every text token at every latent position;
    selected: bool [P, S]. Returns float32 [P, h, w] in {0, 1}: the union over selected tokens k of
    ``norm(maps[:, k]) >= threshold``; all zeros for a prompt with no selected token.
    """
    if normalize not in MASK_NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: expected one of {list(MASK_NORMALIZE)}")
    maps = maps.float()
    flat = maps.flatten(2)  # [P, S, hw]
    if normalize == "minmax":
        low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        flat = (flat - low) / (high - low).clamp_min(1e-12)
    elif normalize == "max":
        flat = flat / flat.amax(-1, keepdim=True).clamp_min(1e-12)
    inside = (flat >= threshold) & selected.to(flat.device)[..., None]
    return inside.any(dim=1).float().view(maps.shape[0], *maps.shape[2:])


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary mask [P, h, w] -> [P, h', w'] for a coarser (or equal) layer: area average, then >= 0.5."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return (F.interpolate(mask[:, None], size=size, mode="area")[:, 0] >= 0.5).float()


def fused_self_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_ref: torch.Tensor,
                         value_ref: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(Q K'^T/√d) V' with K' = M K_ref + (1-M) K, V' = M V_ref + (1-M) V (``actors.dfusion`` docstring, step 2).

    query/key/value/key_ref/value_ref: [N, H, L, d]; key_mask: [N, 1, L, 1] in {0, 1} over key tokens.
    With M = 0 this is exactly ``F.scaled_dot_product_attention(query, key, value)``.
    """
    keep = 1 - key_mask
    key = key_mask * key_ref + keep * key
    value = key_mask * value_ref + keep * value
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


# ----- attention processors ----------------------------------------------------------------------
class FusionController:
    """Shared state of one D-Fusion call, read and written by every ``DFusionAttnProcessor``.

    Flags (set by ``dfusion`` around each UNet call): ``record_maps`` (cross-attention maps of the
    selected layers are accumulated into ``map_sum`` [P, S, h, w]), ``record_kv`` (fused self-attention
    layers store their K, V), ``fuse`` (fused layers mix in the stored K, V inside ``mask``).
    With all flags off every processor computes exactly what diffusers' ``AttnProcessor2_0`` does.
    """

    def __init__(self, *, latent_hw: tuple[int, int], selected: torch.Tensor, spec: DFusionSpec):
        self.latent_hw = tuple(latent_hw)
        self.selected = selected
        self.spec = spec
        self.record_maps = False
        self.record_kv = False
        self.fuse = False
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.map_sum: torch.Tensor | None = None
        self.map_count = 0
        self._mask: torch.Tensor | None = None
        self._key_masks: dict[tuple[int, int], torch.Tensor] = {}

    # masks
    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._mask = value
        self._key_masks = {}

    def reset_maps(self) -> None:
        self.map_sum, self.map_count = None, 0

    def mean_maps(self) -> torch.Tensor:
        if self.map_sum is None:
            raise RuntimeError("no cross-attention maps were recorded (no cross-attention layer at the "
                               f"resolutions dfusion.mask_factors={list(self.spec.mask_factors)})")
        return self.map_sum / self.map_count

    def layer_hw(self, tokens: int) -> tuple[int, int]:
        """(h_ℓ, w_ℓ) of a layer with ``tokens`` spatial tokens (same aspect ratio as the latent)."""
        h, w = self.latent_hw
        factor = round(math.sqrt(h * w / tokens))
        if factor < 1 or (h // factor) * (w // factor) != tokens:
            raise ValueError(f"cannot map {tokens} attention tokens onto the {h}x{w} latent grid")
        return h // factor, w // factor

    def key_mask(self, tokens: int, rows: int) -> torch.Tensor:
        """The mask over a layer's key tokens, [rows, 1, L, 1]; rows = k · P (CFG halves share it)."""
        cache_key = (tokens, rows)
        if cache_key not in self._key_masks:
            mask = resize_mask(self._mask, self.layer_hw(tokens)).flatten(1)  # [P, L]
            mask = mask.repeat(rows // mask.shape[0], 1)
            self._key_masks[cache_key] = mask[:, None, :, None]
        return self._key_masks[cache_key]

    def add_maps(self, probs: torch.Tensor) -> None:
        """probs [N, H, L, S] of one cross-attention layer; keeps the conditional rows (the last P)."""
        P = self.selected.shape[0]
        h_l, w_l = self.layer_hw(probs.shape[2])
        factor = self.latent_hw[0] // h_l
        if self.spec.mask_factors and factor not in self.spec.mask_factors:
            return
        maps = probs[-P:].float().mean(dim=1).transpose(1, 2).reshape(P, -1, h_l, w_l)  # [P, S, h_l, w_l]
        if (h_l, w_l) != self.latent_hw:
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)
        self.map_sum = maps if self.map_sum is None else self.map_sum + maps
        self.map_count += 1


def _unet_part(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head)


class DFusionAttnProcessor:
    """A diffusers attention processor for D-Fusion, installed on every UNet attention module.

    It computes attention as ``AttnProcessor2_0`` does, through the module's own ``to_q``/``to_k``/
    ``to_v``/``to_out`` (so peft LoRA layers wrapping them stay active), and, per the controller's
    flags, records cross-attention maps (``attn2``), records K/V or fuses them (``attn1`` in a fused part).
    """

    def __init__(self, controller: FusionController, name: str):
        self.controller = controller
        self.name = name
        self.is_cross = ".attn2." in name or name.endswith("attn2.processor")
        self.is_self = ".attn1." in name or name.endswith("attn1.processor")
        self.fused_layer = self.is_self and _unet_part(name) in controller.spec.fuse_parts

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        ctl = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.is_cross and ctl.record_maps:
            scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            ctl.add_maps(scores.softmax(dim=-1))  # [N, H, L, S]
        if self.fused_layer and ctl.record_kv:
            ctl.kv[self.name] = (key, value)
        if self.fused_layer and ctl.fuse:
            key_ref, value_ref = ctl.kv[self.name]
            if key_ref.shape != key.shape:
                raise RuntimeError(f"{self.name}: the well aligned pass recorded K of shape {tuple(key_ref.shape)}, "
                                   f"the fused pass has {tuple(key.shape)}")
            hidden_states = fused_self_attention(query, key, value, key_ref, value_ref,
                                                 ctl.key_mask(key.shape[2], batch_size).to(key.dtype))
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_fusion(unet, controller: FusionController):
    """Installs a ``DFusionAttnProcessor`` on every attention module of ``unet``; restores the previous
    processors on exit (also on error)."""
    previous = unet.attn_processors
    unet.set_attn_processor({name: DFusionAttnProcessor(controller, name) for name in previous})
    try:
        yield controller
    finally:
        unet.set_attn_processor(previous)

