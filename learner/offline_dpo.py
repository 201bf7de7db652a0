"""Offline Diffusion-DPO on a preference dataset of image pairs (Wallace et al., CVPR 2024; ``gard dpo``).

Data: a JSONL file, one object per line, ``{"prompt": str, "chosen": path, "rejected": path}`` (image
paths relative to the JSONL file's folder, or absolute). ``load_preferences`` validates every line up
front and names the file, the 1-based line, the field and what was expected.

Training (Diffusion-DPO, Wallace et al., CVPR 2024, eq. 14: the loss
``L(θ) = -E log σ(-β T ω(λ_t) (‖ε^w - ε_θ(x_t^w)‖² - ‖ε^w - ε_ref(x_t^w)‖² - (‖ε^l - ε_θ(x_t^l)‖² - ‖ε^l - ε_ref(x_t^l)‖²)))``
and the paper's pseudo-code), one optimizer step on a batch of B pairs::

    x0_w, x0_l = VAE(chosen), VAE(rejected)             # latents [B, 4, R/8, R/8] (mean · scaling_factor)
    t     ~ U[0, num_train_timesteps)                   # [B], one per pair
    ε     ~ N(0, I)                                     # [B, 4, R/8, R/8], one per pair, shared by w and l
    x_t^w = add_noise(x0_w, ε, t);  x_t^l = add_noise(x0_l, ε, t)
    target = ε  (ε-prediction)  or  v = √ᾱ_t ε - √(1-ᾱ_t) x0  (v-prediction, per image)
    model_err = per_sample_mse(ε_θ(x_t, c, t), target)         # adapters on, with grad      [B] each
    ref_err   = per_sample_mse(ε_ref(x_t, c, t), target)       # adapters off, no grad       [B] each
    L = diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, β)   # learner/dpo.py

No classifier-free guidance (the conditional prediction only, as the authors' training script), the
timestep weight T·ω(λ_t) folded into β, and the error a *mean* over dimensions (``per_sample_mse``;
the authors' script uses the same mean with ``-½ β_script``, i.e. ``β = β_script / 2`` here).
The reference is the same UNet with its LoRA disabled (``Policy.reference()``): no second copy.

Pure-ish: no Ray, no config tree; ``cluster/offline_dpo.py`` wires the config, run directory and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actors.policy import Policy
from actors.seeding import dpo_step_generator
from learner.dpo import denoising_target, diffusion_dpo_loss, per_sample_mse
from learner.precision import GuardedStep, training_dtype

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """A problem in a preference dataset: names the file, the 1-based line, the field and the rule."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` (x0_w) is preferred over ``rejected`` (x0_l) for ``prompt``.

    ``source`` and ``line`` say where the pair was read (for error messages); paths are resolved.
    """

    prompt: str
    chosen: Path
    rejected: Path
    source: Path | None = None
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}" if self.source is not None else f"pair {self.line}"


# ----- dataset ----------------------------------------------------------------------------------------
def _check_image(where: str, field: str, raw: str, base_dir: Path) -> Path:
    """Resolves an image path and checks that PIL recognizes the file (header only, no full decode)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(raw)
    if not path.is_absolute():
        path = base_dir / path
    path = path.resolve()
    if not path.is_file():
        raise PreferenceDataError(
            f"{where}: field {field!r}: image file {raw!r} does not exist (looked for {str(path)!r}; "
            f"relative paths are read from the JSONL file's folder {str(base_dir)!r})"
        )
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parses the header
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise PreferenceDataError(
            f"{where}: field {field!r}: {str(path)!r} is not a readable image ({err}); expected a PNG/JPEG/WebP file"
        ) from None
    return path


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """Reads and validates a preference JSONL file; blank lines are skipped.

    Every line must be a JSON object with exactly the keys ``prompt`` (non-empty string), ``chosen``
    and ``rejected`` (paths of two different, existing image files). Raises ``PreferenceDataError``
    naming the file, the 1-based line number, the field and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{str(path)!r}: no such preference file (expected a JSONL file of "
                                  f'{{"prompt": ..., "chosen": ..., "rejected": ...}} objects)')
    base_dir = path.resolve().parent
    pairs: list[PreferencePair] = []
    for number, raw_line in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}, line {number}"
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PreferenceDataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(
                f"{where}: invalid JSON ({err.msg} at column {err.colno}); expected one object per line "
                f'such as {{"prompt": "a cat", "chosen": "a.png", "rejected": "b.png"}}'
            ) from None
        if not isinstance(record, dict):
            raise PreferenceDataError(f"{where}: expected a JSON object with keys {list(PREFERENCE_KEYS)}, "
                                      f"got a {type(record).__name__}")
        missing = [k for k in PREFERENCE_KEYS if k not in record]
        if missing:
            raise PreferenceDataError(f"{where}: missing field {missing[0]!r} (expected exactly the keys "
                                      f"{list(PREFERENCE_KEYS)})")
        extra = sorted(set(record) - set(PREFERENCE_KEYS))
        if extra:
            raise PreferenceDataError(f"{where}: unknown field {extra[0]!r} (expected exactly the keys "
                                      f"{list(PREFERENCE_KEYS)})")
        for key in PREFERENCE_KEYS:
            if not isinstance(record[key], str):
                what = "the prompt text" if key == "prompt" else "an image path"
                raise PreferenceDataError(f"{where}: field {key!r}: expected a string ({what}), got "
                                          f"{type(record[key]).__name__} {record[key]!r}")
        if not record["prompt"].strip():
            raise PreferenceDataError(f"{where}: field 'prompt': expected a non-empty string, got {record['prompt']!r}")
        chosen = _check_image(where, "chosen", record["chosen"], base_dir)
        rejected = _check_image(where, "rejected", record["rejected"], base_dir)
        if chosen == rejected:
            raise PreferenceDataError(f"{where}: fields 'chosen' and 'rejected' name the same image "
                                      f"{str(chosen)!r}; a preference pair needs two different images")
        pairs.append(PreferencePair(prompt=record["prompt"], chosen=chosen, rejected=rejected,
                                    source=path, line=number))
    if not pairs:
        raise PreferenceDataError(f"{path}: the dataset is empty (no non-blank lines); expected at least one "
                                  f'{{"prompt": ..., "chosen": ..., "rejected": ...}} object')
    return pairs


def load_image(path: Path, *, resolution: int, where: str = "", field: str = "") -> torch.Tensor:
    """An image file -> float32 [3, R, R] in [-1, 1]: RGB, shorter side resized to R, center crop.

    (The authors' script: Resize(R) + CenterCrop(R) + Normalize([0.5], [0.5]).)
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            if size != (w, h):
                image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise PreferenceDataError(f"{where}: field {field!r}: cannot decode image {str(path)!r} ({err})") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


# ----- trainer ---------------------------------------------------------------------------------------
def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one optimizer step, a function of (seed, step) only (resumable)."""
    return dpo_step_generator(seed, step=step)


class OfflineDpoTrainer:
    """Trains the policy's LoRA with offline Diffusion-DPO (Wallace et al., CVPR 2024) on preference pairs.

    A plain class (no Ray). Latents of the pair images are encoded with the policy's VAE the first
    time a pair is drawn and cached on the CPU (float32 [4, R/8, R/8] per image: 64 KiB at 512 px).
    """

    def __init__(
        self,
        *,
        policy: Policy,
        pairs: Sequence[PreferencePair],
        beta: float,
        learning_rate: float,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_weight_decay: float = 1e-4,
        adam_eps: float = 1e-8,
        max_grad_norm: float = 1.0,
        batch_size: int = 4,
        seed: int = 0,
        mixed_precision: str = "no",
    ):
        if not pairs:
            raise ValueError("pairs is empty: offline DPO needs at least one preference pair")
        if not beta > 0:
            raise ValueError(f"beta={beta!r} is invalid: the DPO temperature must be > 0")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        prediction_type = policy.scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type={prediction_type!r} is not supported: expected "
                             f"'epsilon' or 'v_prediction'")
        self.policy = policy
        self.pairs = list(pairs)
        self.beta = float(beta)
        self.max_grad_norm = float(max_grad_norm)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(policy.scheduler.config.num_train_timesteps)
        for module in self.policy.adapted.values():
            module.train()
        self._params = [p for _, p in policy.named_trainable_parameters()]
        if not self._params:
            raise ValueError("the policy has no trainable (LoRA) parameters")
        if policy.dtype != getattr(torch, training_dtype(mixed_precision)):
            raise ValueError(f"train.mixed_precision={mixed_precision!r} needs the policy loaded in "
                             f"{training_dtype(mixed_precision)}, got {policy.dtype}")
        self.optimizer = torch.optim.AdamW(
            self._params, lr=learning_rate, betas=(adam_beta1, adam_beta2),
            weight_decay=adam_weight_decay, eps=adam_eps,
        )
        self.stepper = GuardedStep(self._params, self.optimizer, mixed_precision=mixed_precision,
                                   device_type=policy.device.type, max_grad_norm=max_grad_norm)
        self._latents: dict[tuple[int, str], torch.Tensor] = {}
        self._prompt_embeds: dict[str, torch.Tensor] = {}

    # ----- inputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, items: list[tuple[int, str]]) -> None:
        """VAE-encodes the (pair index, 'chosen'|'rejected') images not cached yet: latent_dist.mean · s."""
        todo = [item for item in dict.fromkeys(items) if item not in self._latents]
        if not todo:
            return
        resolution = self.policy.spec.resolution
        pixels = torch.stack([
            load_image(getattr(self.pairs[i], field), resolution=resolution, where=self.pairs[i].where, field=field)
            for i, field in todo
        ])  # [N, 3, R, R] in [-1, 1]
        vae = self.policy.vae
        latents = vae.encode(pixels.to(self.policy.device, self.policy.dtype)).latent_dist.mean
        latents = (latents * vae.config.scaling_factor).float().cpu()  # [N, 4, R/8, R/8]
        for item, latent in zip(todo, latents, strict=True):
            self._latents[item] = latent

    def latents(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_w, x0_l), each float32 [B, 4, R/8, R/8] on the policy device."""
        items = [(i, f) for i in indices for f in ("chosen", "rejected")]
        self._encode(items)
        device = self.policy.device
        x0_w = torch.stack([self._latents[(i, "chosen")] for i in indices]).to(device)
        x0_l = torch.stack([self._latents[(i, "rejected")] for i in indices]).to(device)
        return x0_w, x0_l

    @torch.no_grad()
    def prompt_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings [B, 77, D] of the (frozen) text encoder, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_embeds]
        if missing:
            for prompt, embeds in zip(missing, self.policy.encode_prompts(missing), strict=True):
                self._prompt_embeds[prompt] = embeds
        return torch.stack([self._prompt_embeds[p] for p in prompts])

    def _embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 77, D]: cached when the text encoder is frozen; with a trained text-encoder LoRA
        (TexForce) encoded anew under the current context, so gradients reach it."""
        if self.policy.trains_text_encoder:
            return self.policy.encode_prompts(list(prompts))
        return self.prompt_embeds(prompts)

    def draw(self, step: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Pair indices [B], timesteps [B] (int64) and noise [B, 4, h, w] of one step (CPU generator).

        Indices without replacement within a step (with replacement when B > number of pairs).
        """
        gen = step_generator(self.seed, step)
        n = len(self.pairs)
        if self.batch_size <= n:
            indices = torch.randperm(n, generator=gen)[: self.batch_size]
        else:
            indices = torch.randint(0, n, (self.batch_size,), generator=gen)
        timesteps = torch.randint(0, self.num_train_timesteps, (self.batch_size,), generator=gen)
        size = self.policy.spec.resolution // self.policy.vae_scale_factor
        noise = torch.randn((self.batch_size, self.policy.latent_channels, size, size), generator=gen)
        return indices.tolist(), timesteps, noise

    # ----- the update --------------------------------------------------------------------------
    def _predict(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The conditional UNet output (no CFG) -> float32, same shape as ``latents``."""
        policy = self.policy
        autocast = (
            torch.autocast(policy.device.type, dtype=policy.dtype) if policy.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            return policy.unet(latents.to(policy.dtype), timesteps, embeds).sample.float()

    def losses(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss [] (with grad into the LoRA) and its stats for the batch of ``step``."""
        indices, timesteps, noise = self.draw(step)
        device = self.policy.device
        x0_w, x0_l = self.latents(indices)
        noise, timesteps = noise.to(device), timesteps.to(device)
        scheduler = self.policy.scheduler
        x0 = torch.cat([x0_w, x0_l])                        # [2B, 4, h, w]: winners, then losers
        eps = torch.cat([noise, noise])                     # the same ε for w and l (Wallace et al.)
        t = torch.cat([timesteps, timesteps])
        noisy = scheduler.add_noise(x0, eps, t)
        target = denoising_target(scheduler, x0, eps, t)
        prompts = [self.pairs[i].prompt for i in indices]
        embeds = self._embeds(prompts).to(device)
        embeds = torch.cat([embeds, embeds])                # [2B, 77, D]
        model_err = per_sample_mse(self._predict(noisy, t, embeds), target)   # [2B]
        with torch.no_grad(), self.policy.reference():
            ref_embeds = torch.cat([self._embeds(prompts)] * 2).to(device) if self.policy.trains_text_encoder \
                else embeds
            ref_err = per_sample_mse(self._predict(noisy, t, ref_embeds), target)  # [2B]
        b = len(indices)
        return diffusion_dpo_loss(model_err[:b], model_err[b:], ref_err[:b], ref_err[b:], beta=self.beta)

    def step(self, step_index: int) -> dict[str, float]:
        """One AdamW step on the batch of ``step_index``: loss, implicit_acc, reward_margin, grad_norm,
        skipped (1 when the loss or the gradient norm was not finite and the step was not applied),
        skipped_in_row, loss_scale (fp16)."""
        start = time.perf_counter()
        for module in self.policy.adapted.values():
            module.train()
        self.stepper.zero_grad()
        loss, stats = self.losses(step_index)
        self.stepper.backward(loss)
        result = self.stepper.step(loss_finite=bool(torch.isfinite(loss)))
        return {
            "loss": loss.item(),
            "implicit_acc": stats["implicit_acc"].item(),
            "reward_margin": stats["reward_margin"].item(),
            "grad_norm": result.grad_norm,
            "skipped": float(result.skipped),
            "skipped_in_row": float(self.stepper.skipped_in_row),
            "loss_scale": self.stepper.loss_scale,
            "step_s": time.perf_counter() - start,
        }


def window_means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means of the step stats over a window of steps (``<key>_mean``)."""
    keys = ("loss", "implicit_acc", "reward_margin", "grad_norm")
    rows = [r for r in rows if not r.get("skipped")]  # a skipped step's stats are not finite
    return {f"{k}_mean": (sum(r[k] for r in rows) / len(rows)) if rows else math.nan for k in keys}
