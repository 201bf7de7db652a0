"""LAION aesthetic predictor: a linear MLP head on unit-norm CLIP image embeddings.

The head is improved-aesthetic-predictor's ``MLP`` (no nonlinearities; dropout only in training),
trained on OpenAI CLIP ViT-L/14 embeddings (768-d). Its parameter names match
``sac+logos+ava1-l14-linearMSE.pth`` so that file loads with a plain ``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewards.base import RewardOutput, check_batch
from rewards.clip_encoder import EncoderCache


class AestheticMLP(nn.Module):
    """[B, input_dim] unit-norm CLIP image embeddings -> [B, 1] aesthetic scores (~1-10 for the real head)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_head(path: str | Path, *, expected_dim: int) -> AestheticMLP:
    """Loads an ``AestheticMLP`` state dict file, checking its input dim against the CLIP embed dim."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    first = state.get("layers.0.weight") if isinstance(state, dict) else None
    if first is None:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"aesthetic head {str(path)!r} has no 'layers.0.weight' (found {keys}); expected the "
            "state dict of improved-aesthetic-predictor's MLP"
        )
    input_dim = int(first.shape[1])
    if input_dim != expected_dim:
        raise ValueError(
            f"aesthetic head {str(path)!r} takes {input_dim}-d embeddings but the CLIP model embeds into "
            f"{expected_dim} dims; use the CLIP the head was trained on (ViT-L-14 openai for the LAION head)"
        )
    head = AestheticMLP(input_dim)
    head.load_state_dict(state)
    return head


class Aesthetic:
    """Score_i = head(φ_I(image_i)), φ_I the unit-norm open_clip image embedding.

    clip_model / clip_pretrained / model_config: as ``ClipScore``'s model / pretrained /
    model_config. ViT-L-14 + "openai" is built with QuickGELU, as OpenAI trained it; for a local
    OpenAI checkpoint file pass clip_model="ViT-L-14-quickgelu". head_path: the head's state dict
    file; None = random head weights drawn from ``seed`` (tests, demos).
    Returns ``embeddings={"image": [B, n]}``.
    """

    name = "aesthetic"
    # Batched float kernels: a score moves with the row count of the call (serve.pad_batches pads it).
    batch_shape_sensitive = True

    def __init__(
        self,
        *,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str | None = "openai",
        model_config: str | None = None,
        head_path: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        encoders: EncoderCache | None = None,
    ) -> None:
        # ``encoders``: a cache shared with other CLIP-based rewards of the same process (not a config option).
        self.encoder = (encoders if encoders is not None else EncoderCache()).get(
            model=clip_model, pretrained=clip_pretrained, model_config=model_config, device=device, seed=seed
        )
        if head_path is not None:
            head = load_aesthetic_head(head_path, expected_dim=self.encoder.embed_dim)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = AestheticMLP(self.encoder.embed_dim)
        self.head = head.to(self.encoder.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_batch(images, prompts)
        image_emb = self.encoder.encode_images(images)  # [B, n], unit norm
        scores = self.head(image_emb.to(self.encoder.device)).squeeze(-1).float().cpu()
        return RewardOutput(scores=scores.numpy(), embeddings={"image": image_emb.numpy()})
