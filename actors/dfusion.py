"""D-Fusion: visually consistent, trainable preference pairs by mask-guided self-attention fusion.

Hu, Zhang & Kuang, "D-Fusion: Direct Preference Optimization for Aligning Diffusion Models with
Visually Consistent Samples" (ICML 2025, arXiv 2505.22002). The operations below follow the method as
the paper describes it (§3: cross-attention mask extraction, then self-attention fusion while the
poorly aligned sample is denoised again) and the authors' release (``run_sample.py``,
``diffusers/models/attention_processor.py``, ``unet_2d_condition.py``), written anew for this code
base. Where we deviate, it says so.

Given, for one prompt, a poorly aligned sample (the *base*, p) and a well aligned one (the
*reference*, g), both stored DDIM trajectories x_T..x_0 of the same policy, D-Fusion builds a third
sample f that follows g inside a mask and p elsewhere, and keeps f's denoising trajectory so that
(f ≻ p) is a DPO pair whose two images differ only where the alignment does (visual consistency).

Notation: T DDIM steps, step i = 0..T-1 is the transition x_{t_i} -> x_{t_{i+1}} (``Trajectory``);
P pairs; latents [P, C, h, w]; a UNet attention layer ℓ works on L_ℓ = h_ℓ w_ℓ spatial tokens with
H heads of width d; S = 77 text tokens. With classifier-free guidance the UNet batch is N = 2P rows
(unconditional rows first, as ``Policy.guided_output`` stacks them), else N = P.

1. **Cross-attention mask** (§3.2, "mask extraction"). While g's stored trajectory is replayed
   (teacher-forced: the UNet is evaluated at g's own states x^g_{t_i}, so nothing is resampled), every
   cross-attention layer ℓ (``attn2``) at a selected resolution records, for the conditional rows,

       A_ℓ,i = mean_heads softmax(Q K_text^T / √d)          [P, S, h_ℓ, w_ℓ]

   upsampled (bilinear) to the latent size [P, S, h, w]. The maps are averaged over those layers and
   over the steps (``mask_steps="all"``: all T steps of g, one mask for the whole re-denoising; or
   ``"current"``: step i's maps only, a new mask every step, as the release does), giving Ā [P, S, h, w].
   Only the chosen prompt tokens count (``token_positions``; default: every content token of the
   prompt, i.e. positions 1..n between BOS and EOS, never BOS/EOS/padding). Each chosen token's map is
   normalized over space (``mask_normalize``: min-max by default) and thresholded; the mask is the
   union over the chosen tokens (the release thresholds each item token and takes ``any``):

       M = ∪_{k chosen} [ norm(Ā_k) >= threshold ]            [P, h, w] in {0, 1}

   Layers at a coarser resolution use M area-downsampled and re-binarized at 0.5 (majority).

2. **Self-attention fusion** (§3.2, "self-attention fusion"). f starts at p's x_T. At every step i
   the UNet runs at g's state and records each fused self-attention layer's (``attn1``) keys and
   values K^g, V^g [N, H, L_ℓ, d]; then it runs at f's state, where every such layer uses its own
   queries and, *at the key/value positions inside the mask*, g's keys and values:

       K' = M ⊙ K^g + (1 - M) ⊙ K^f,    V' = M ⊙ V^g + (1 - M) ⊙ V^f      (M over the L_ℓ key tokens)
       SA(f) = softmax(Q^f K'^T / √d) V'

   Queries stay f's own everywhere, so f's layout is kept and its tokens read the well aligned
   content where the mask is on. With an empty mask SA(f) is the plain self-attention; with a full
   mask it is softmax(Q^f K^g^T / √d) V^g (mutual self-attention: f queries g), which equals g's own
   attention only where Q^f = Q^g, e.g. when f and g are the same state. Fused layers: the UNet
   decoder (mid and up blocks) by default, as the release's ``inject_l = 3-6`` for SD; fused steps:
   i in [⌊fuse_start·T⌋, ⌈fuse_end·T⌉) (the release fuses steps 2..19 of 20: fuse_start = 0.1).

3. **Trajectory** (§3.3, "retaining the trajectory"). f is denoised with p's own noise. For η > 0
   p's step noise is recovered exactly from its stored trajectory, ε_i = (x^p_{i+1} - μ^p_i)/σ_i, where
   μ^p_i is the plain policy's DDIM mean at x^p_i (``actors.ddim.ddim_mean_std``), and

       x^f_{i+1} = μ^f_i + σ_i ε_i = x^p_{i+1} + (μ^f_i - μ^p_i)

   with μ^f_i the DDIM mean of the *fused* network at x^f_i (the release re-draws the same noise from
   p's seed instead; the difference form needs no seed and is exact: with an empty mask μ^f = μ^p
   bit for bit, so f = p). The stored log-probs are those of f's transitions under the **plain**
   (unfused) policy, the distribution the learner evaluates and trains:

       log p_θ(x^f_{i+1} | x^f_i) = log N(x^f_{i+1}; μ_θ(x^f_i), σ_i² I)   (dimension mean)

   so ``ddim_step_with_logprob(..., prev_sample=x^f_{i+1})`` under the same weights reproduces them.

Cost per pair batch: with ``mask_steps="all"`` T UNet calls to collect the maps, then per fused step
4 (g with recording, p, f fused, f plain) and per unfused step 1-2. D-Fusion draws no random numbers:
it is a deterministic function of the two trajectories and the weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.trajectory import Trajectory

MASK_NORMALIZE = ("minmax", "max", "none")
MASK_STEPS = ("all", "current")
UNET_PARTS = ("down", "mid", "up")


@dataclass(frozen=True)
class DFusionSpec:
    """D-Fusion settings (the ``dfusion`` config section).

    token_positions: positions in the tokenized prompt (0 = BOS, content from 1) whose cross-attention
        builds the mask; positions outside a prompt's content are ignored for that prompt. None: every
        content token (BOS, EOS and padding never count).
    mask_threshold: a token's normalized map >= this is inside the mask (min-max: 0 = everywhere,
        > 1 = nowhere).
    mask_normalize: per token over space: ``minmax`` (A - min)/(max - min), ``max`` A/max, ``none``
        raw attention probabilities (the release: threshold 0.05 on SD).
    mask_steps: ``all`` (one mask from the maps averaged over all T steps of the well aligned sample) or
        ``current`` (step i's maps build step i's mask).
    mask_factors: latent-to-layer downsampling factors of the cross-attention layers that contribute
        (the release: 4, the 16x16 layers of SD at 512 px); empty: every cross-attention layer.
    fuse_parts: UNet parts whose self-attention is fused (``down``, ``mid``, ``up``).
    fuse_start, fuse_end: fused steps i in [floor(fuse_start T), ceil(fuse_end T)).
    """

    token_positions: tuple[int, ...] | None = None
    mask_threshold: float = 0.5
    mask_normalize: str = "minmax"
    mask_steps: str = "all"
    mask_factors: tuple[int, ...] = ()
    fuse_parts: tuple[str, ...] = ("mid", "up")
    fuse_start: float = 0.1
    fuse_end: float = 1.0

    def __post_init__(self):
        if self.mask_normalize not in MASK_NORMALIZE:
            raise ValueError(f"dfusion.mask_normalize={self.mask_normalize!r}: expected one of {list(MASK_NORMALIZE)}")
        if self.mask_steps not in MASK_STEPS:
            raise ValueError(f"dfusion.mask_steps={self.mask_steps!r}: expected one of {list(MASK_STEPS)}")
        bad = [p for p in self.fuse_parts if p not in UNET_PARTS]
        if bad or not self.fuse_parts:
            raise ValueError(f"dfusion.fuse_parts={list(self.fuse_parts)!r}: expected a non-empty list out of "
                             f"{list(UNET_PARTS)}")
        if not 0 <= self.fuse_start < self.fuse_end <= 1:
            raise ValueError(f"dfusion.fuse_start={self.fuse_start}, fuse_end={self.fuse_end}: expected "
                             f"0 <= fuse_start < fuse_end <= 1")
        if any(f < 1 or f & (f - 1) for f in self.mask_factors):
            raise ValueError(f"dfusion.mask_factors={list(self.mask_factors)!r}: expected powers of two >= 1")
        if self.token_positions is not None and any(p < 1 for p in self.token_positions):
            raise ValueError(f"dfusion.token_positions={list(self.token_positions)!r}: content positions start "
                             f"at 1 (0 is BOS)")

    def fused_steps(self, num_steps: int) -> range:
        """Indices i of the fused denoising steps."""
        return range(math.floor(self.fuse_start * num_steps), math.ceil(self.fuse_end * num_steps))


@dataclass
class DFusionResult:
    """P fused samples.

    trajectory:    the fused samples' ``Trajectory`` (latents [P, T+1, C, h, w] float32, log_probs [P, T]
                   under the plain policy, the poorly aligned rows' prompts and timesteps)
    images:        uint8 [P, H, W, 3], decoded x^f_0
    mask:          float32 [P, h, w] at latent resolution: the mask (``all``), or its mean over the fused
                   steps (``current``)
    mask_fraction: float32 [P], the mean of ``mask`` per sample
    unet_calls:    guided UNet evaluations made (each one CFG batch)
    """

    trajectory: Trajectory
    images: np.ndarray
    mask: np.ndarray
    mask_fraction: np.ndarray
    unet_calls: int


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
    """The binary fusion mask from averaged cross-attention maps (module docstring, step 1).

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
    """softmax(Q K'^T/√d) V' with K' = M K_ref + (1-M) K, V' = M V_ref + (1-M) V (module docstring, step 2).

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


# ----- the fused re-denoising --------------------------------------------------------------------
def _check_pair(poor: Trajectory, good: Trajectory, timesteps: np.ndarray) -> None:
    if len(poor) == 0 or len(poor) != len(good):
        raise ValueError(f"D-Fusion needs as many well aligned as poorly aligned samples (>= 1), got "
                         f"{len(good)} and {len(poor)}")
    if list(poor.prompts) != list(good.prompts):
        bad = next(i for i, (a, b) in enumerate(zip(poor.prompts, good.prompts, strict=True)) if a != b)
        raise ValueError(f"D-Fusion pairs samples of one prompt; row {bad} pairs {poor.prompts[bad]!r} with "
                         f"{good.prompts[bad]!r}")
    if poor.latents.shape != good.latents.shape:
        raise ValueError(f"latent shapes differ: poor {poor.latents.shape}, good {good.latents.shape}")
    for name, traj in (("poor", poor), ("good", good)):
        if not np.array_equal(np.asarray(traj.timesteps), timesteps):
            raise ValueError(f"the {name} trajectory's timesteps {list(traj.timesteps)} differ from the policy's "
                             f"DDIM schedule {list(timesteps)} (sampling.num_steps changed?)")


@torch.no_grad()
def dfusion(policy, *, poor: Trajectory, good: Trajectory, spec: DFusionSpec,
            policy_version: int = 0) -> DFusionResult:
    """Builds P fused samples from P (poorly aligned, well aligned) trajectory pairs of the same prompts.

    Args:
        policy: an ``actors.policy.Policy`` (its current adapter is the policy; it should be the one
            that sampled ``poor`` and ``good``, else p's recovered noise is that of the current weights).
        poor, good: Trajectories with latents [P, T+1, C, h, w] on the policy's DDIM schedule, row p of
            both for the same prompt.
        spec: mask and fusion settings.
        policy_version: stamped on the fused trajectory (the adapter version in use).

    Returns a ``DFusionResult`` (see the module docstring for the exact computation).
    """
    scheduler, eta = policy.scheduler, policy.spec.eta
    timesteps = scheduler.timesteps
    _check_pair(poor, good, timesteps.cpu().numpy())
    device = policy.device
    P, n_states = poor.latents.shape[:2]
    T = n_states - 1
    x_poor = torch.from_numpy(np.ascontiguousarray(poor.latents)).to(device, torch.float32)
    x_good = torch.from_numpy(np.ascontiguousarray(good.latents)).to(device, torch.float32)
    prompts = list(poor.prompts)
    embeds = policy.encode_prompts(prompts)
    negative = policy.negative_embeds(P)
    selected = token_selection(policy.tokenizer, prompts, spec.token_positions).to(device)
    controller = FusionController(latent_hw=tuple(x_poor.shape[-2:]), selected=selected, spec=spec)
    fused_steps = set(spec.fused_steps(T))
    calls = 0

    def mean_at(x: torch.Tensor, t: torch.Tensor, *, fuse: bool = False, record: bool = False,
                maps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ [P, C, h, w], σ) of the DDIM step at x under the (fused or plain) guided network."""
        nonlocal calls
        controller.fuse, controller.record_kv, controller.record_maps = fuse, record, maps
        try:
            output = policy.guided_output(x, t, embeds, negative)
        finally:
            controller.fuse = controller.record_kv = controller.record_maps = False
        calls += 1
        return ddim_mean_std(scheduler, output, t, x, eta=eta)

    def mask_now() -> torch.Tensor:
        return build_mask(controller.mean_maps(), selected, threshold=spec.mask_threshold,
                          normalize=spec.mask_normalize)

    states = [x_poor[:, 0]]
    log_probs = []
    mask_sum = torch.zeros(P, *controller.latent_hw, device=device)
    with attention_fusion(policy.unet, controller):
        if spec.mask_steps == "all":  # step 1 over the whole well aligned trajectory
            for i, t in enumerate(timesteps):
                mean_at(x_good[:, i], t, maps=True)
            controller.mask = mask_now()
        x_f = x_poor[:, 0]
        for i, t in enumerate(timesteps):
            mean_p, std = mean_at(x_poor[:, i], t)
            fuse = i in fused_steps
            if fuse:
                per_step = spec.mask_steps == "current"
                if per_step:
                    controller.reset_maps()
                if per_step or controller.mask.any():  # g's keys and values at this step
                    mean_at(x_good[:, i], t, record=True, maps=per_step)
                if per_step:
                    controller.mask = mask_now()
                mask_sum += controller.mask
                fuse = bool(controller.mask.any())  # an empty mask fuses nothing: the plain network
            if fuse:
                mean_f = mean_at(x_f, t, fuse=True)[0]
                mean_plain = mean_at(x_f, t)[0]  # the log-prob is taken under the unfused policy
            elif torch.equal(x_f, x_poor[:, i]):
                mean_f = mean_plain = mean_p
            else:
                mean_f = mean_plain = mean_at(x_f, t)[0]
            controller.kv = {}
            x_next = x_poor[:, i + 1] + (mean_f - mean_p)  # = μ^f + σ ε^p (module docstring, step 3)
            log_probs.append(gaussian_log_prob(x_next, mean_plain, std).cpu())
            states.append(x_next)
            x_f = x_next
    images = policy.decode(x_f)
    mask = (mask_sum / max(len(fused_steps), 1)).cpu().numpy().astype(np.float32)
    trajectory = Trajectory(
        latents=torch.stack([s.float().cpu() for s in states], dim=1).numpy(),
        log_probs=torch.stack(log_probs, dim=1).numpy().astype(np.float32),
        timesteps=timesteps.cpu().numpy().astype(np.int64),
        prompts=prompts,
        policy_version=int(policy_version),
        seed=int(poor.seed),
    )
    return DFusionResult(trajectory=trajectory, images=images, mask=mask,
                         mask_fraction=mask.reshape(P, -1).mean(axis=1), unet_calls=calls)
