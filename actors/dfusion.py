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

This module holds the settings, the result and the fused re-denoising (step 3, driving steps 1-2);
token selection, the masks and the attention processor of steps 1-2 are in ``actors.dfusion_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from actors.ddim import ddim_mean_std, gaussian_log_prob
from actors.dfusion_attention import (
    MASK_NORMALIZE,
    FusionController,
    attention_fusion,
    build_mask,
    token_selection,
)
from actors.trajectory import Trajectory

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
