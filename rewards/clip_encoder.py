"""One open_clip model, loaded once, that turns uint8 images and prompts into unit-norm embeddings.

Shared by ``clip_score`` and ``aesthetic`` so the loading rules and the image
preprocessing exist once. Preprocessing runs batched in torch (no PIL loop) and follows open_clip's
eval transform: resize (bicubic, antialias) per the model's ``resize_mode``, center crop or pad to
``model.visual.image_size``, scale to [0, 1], normalize with the model's mean/std.

``open_clip`` is imported lazily: importing ``rewards`` (config validation, JPEG-only workers) must not
pay for open_clip/torchvision.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_RESIZE_MODES = ("shortest", "longest", "squash")
TEXT_ROWS = 8  # rows of every text-tower call: fixed, so that an embedding does not depend on its batch


def register_model_config(model: str, model_config: str | Path) -> None:
    """Registers an open_clip model-config JSON so ``create_model(model)`` finds it.

    open_clip 3.3 names a registered config by its file stem, so ``model`` must equal that stem.
    Registering the same file twice is skipped (open_clip keeps a list of config paths).
    """
    import open_clip

    path = Path(model_config)
    if not path.is_file():
        raise FileNotFoundError(f"model_config={str(path)!r}: no such open_clip model-config JSON file")
    if path.stem != model:
        raise ValueError(
            f"model_config {str(path)!r} registers the open_clip model {path.stem!r} (open_clip names a "
            f"config by its file stem), but model={model!r}; pass model={path.stem!r}"
        )
    if open_clip.get_model_config(model) == json.loads(path.read_text()):
        return
    open_clip.add_model_config(path)


def _needs_quick_gelu(model: str, pretrained: str | None) -> bool:
    """True when a pretrained tag was trained with QuickGELU but the model config lacks it.

    open_clip 3.3 only warns about this mismatch (e.g. ViT-L-14 + "openai", the CLIP the LAION
    aesthetic head was trained on); building with plain GELU would give wrong embeddings.
    """
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    model_cfg = open_clip.get_model_config(model) or {}
    return bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)


def load_clip_model(
    *, model: str, pretrained: str | None, model_config: str | None, device: str, seed: int
) -> tuple[torch.nn.Module, object]:
    """Creates an open_clip model in eval mode with frozen weights, and its tokenizer.

    pretrained: an open_clip tag, a local checkpoint file, or None for random weights; random
    weights are drawn from ``torch.manual_seed(seed)`` inside ``fork_rng`` so two instances match
    and the caller's RNG stream is left untouched.
    """
    import open_clip

    if model_config is not None:
        register_model_config(model, model_config)
    if model not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model!r}; pass model_config=<path to its JSON> for a custom model"
        )
    # Weights are initialized on the CPU and moved afterwards, so forking the CPU RNG is enough.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            clip = open_clip.create_model(
                model,
                pretrained=pretrained,
                device=device,
                force_quick_gelu=_needs_quick_gelu(model, pretrained),
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"could not load open_clip model={model!r} pretrained={pretrained!r}: {err}. "
                "Without network access pass a local checkpoint file as pretrained (or None for random "
                "weights)."
            ) from err
    clip.eval().requires_grad_(False)
    return clip, open_clip.get_tokenizer(model)


def _target_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def preprocess_images(
    images: np.ndarray,
    *,
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    fill_color: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized float32 [B, 3, h, w] with (h, w) = ``size``.

    resize_mode (open_clip's eval transform): "shortest" scales the shorter side to fit and center
    crops; "longest" scales the longer side to fit and pads with ``fill_color``; "squash" resizes to
    ``size`` ignoring the aspect ratio.
    """
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not supported; expected one of {_RESIZE_MODES}")
    target_h, target_w = _target_size(size)
    x = torch.from_numpy(np.array(images, copy=True)).to(device)  # a copy: Ray hands out read-only arrays
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # [B, 3, H, W] in [0, 1]
    height, width = x.shape[-2:]
    if resize_mode == "squash":
        new_h, new_w = target_h, target_w
    else:
        pick = min if resize_mode == "longest" else max
        scale = pick(target_h / height, target_w / width)
        new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, antialias=True, align_corners=False)
        # Bicubic overshoots; open_clip's PIL path rounds to uint8, i.e. clips to [0, 1].
        x = x.clamp(0.0, 1.0)
    if (new_h, new_w) != (target_h, target_w):
        x = _center_crop_or_pad(x, target_h, target_w, fill=fill_color / 255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _center_crop_or_pad(x: torch.Tensor, target_h: int, target_w: int, *, fill: float) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, target_h, target_w]: center crop larger sides, center pad smaller ones."""
    height, width = x.shape[-2:]
    pad_h, pad_w = max(target_h - height, 0), max(target_w - width, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
        height, width = x.shape[-2:]
    # Same rounding as torchvision's CenterCrop.
    top, left = round((height - target_h) / 2.0), round((width - target_w) / 2.0)
    return x[..., top : top + target_h, left : left + target_w]


class ClipEncoder:
    """An open_clip model with batched preprocessing; every output is unit-norm float32 on the CPU."""

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        model_config: str | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        import open_clip

        self.model_name = model
        self.device = torch.device(device)
        self.model, self.tokenizer = load_clip_model(
            model=model, pretrained=pretrained, model_config=model_config, device=device, seed=seed
        )
        cfg = self.model.visual.preprocess_cfg
        self.image_size = _target_size(self.model.visual.image_size)
        self._preprocess = dict(
            size=self.image_size,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill_color=cfg.get("fill_color", 0),
        )
        # Every open_clip config carries embed_dim (open_clip skips configs without it).
        self.embed_dim = int(open_clip.get_model_config(model)["embed_dim"])
        self._last_images: tuple | None = None
        self.cache_hits = 0

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> model input float32 [B, 3, h, w] on the model's device."""
        return preprocess_images(images, device=self.device, **self._preprocess)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> unit-norm image embeddings float32 [B, embed_dim] (CPU).

        The last batch's embeddings are kept: when clip_score and aesthetic share this encoder, the
        second reward scoring the same images does not encode them again.
        """
        if images.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        key = (images.shape, hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=16).digest())
        if self._last_images is not None and self._last_images[0] == key:
            self.cache_hits += 1
            return self._last_images[1].clone()
        feats = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1).cpu()
        self._last_images = (key, feats)
        return feats.clone()

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> unit-norm text embeddings float32 [B, embed_dim] (CPU).

        Batches usually repeat each prompt (several samples per prompt), so each distinct prompt is
        encoded once and gathered back into batch order. The distinct prompts are encoded in calls of
        exactly TEXT_ROWS rows (the last prompt repeated): the number of distinct prompts in a batch
        varies with how it was merged, and the text tower's float result for a prompt moved in the
        last bit with the row count of the call (measured on the shapes CLIP), so a prompt's embedding
        would have depended on its neighbours.
        """
        if len(prompts) == 0:
            return torch.zeros(0, self.embed_dim)
        unique = list(dict.fromkeys(prompts))
        parts = []
        for start in range(0, len(unique), TEXT_ROWS):
            chunk = unique[start:start + TEXT_ROWS]
            tokens = self.tokenizer(chunk + [chunk[-1]] * (TEXT_ROWS - len(chunk))).to(self.device)
            parts.append(self.model.encode_text(tokens).float()[:len(chunk)])
        feats = F.normalize(torch.cat(parts), dim=-1).cpu()
        index = {prompt: i for i, prompt in enumerate(unique)}
        return feats[torch.tensor([index[p] for p in prompts])]


class EncoderCache:
    """One ClipEncoder per (model, pretrained, config, device, seed), shared by the rewards built with it.

    Owned by whoever builds a group of rewards (a reward worker, a Serve replica): clip_score and
    aesthetic configured with the same CLIP model then hold one copy of its weights.
    """

    def __init__(self) -> None:
        self._encoders: dict[tuple, ClipEncoder] = {}

    def get(self, *, model: str, pretrained: str | None, model_config: str | None = None, device: str = "cpu",
            seed: int = 0) -> ClipEncoder:
        key = (model, pretrained, model_config, device, seed)
        if key not in self._encoders:
            self._encoders[key] = ClipEncoder(model=model, pretrained=pretrained, model_config=model_config,
                                              device=device, seed=seed)
        return self._encoders[key]

    def __len__(self) -> int:
        return len(self._encoders)

    def values(self) -> list[ClipEncoder]:
        return list(self._encoders.values())
