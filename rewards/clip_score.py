"""CLIP score: cosine of open_clip image and prompt embeddings.

Also returns both unit-norm embeddings, ``{"image": [B, n], "text": [B, n]}``, which the GARD
volume term (GARD eq. 12-13) uses as ``φ_I(x0)`` and ``φ_T(prompt)``.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput, check_batch
from rewards.clip_encoder import EncoderCache


class ClipScore:
    """Score_i = <φ_I(image_i), φ_T(prompt_i)> with unit-norm open_clip embeddings, in [-1, 1].

    model / pretrained: an open_clip architecture and an open_clip tag or a local checkpoint file
    (None = random weights drawn from ``seed``). model_config: a model-config JSON to register
    first (tiny test models; its file stem must equal ``model``).
    """

    name = "clip_score"
    # Batched float kernels: a score moves with the row count of the call (serve.pad_batches pads it).
    batch_shape_sensitive = True

    def __init__(
        self,
        *,
        model: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        model_config: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        encoders: EncoderCache | None = None,
    ) -> None:
        # ``encoders``: a cache shared with other CLIP-based rewards of the same process (not a config option).
        self.encoder = (encoders if encoders is not None else EncoderCache()).get(
            model=model, pretrained=pretrained, model_config=model_config, device=device, seed=seed
        )

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-norm CLIP text embeddings [B, n] (e.g. of LLaVA captions: a third volume modality)."""
        return np.asarray(self.encoder.encode_texts(list(texts)), dtype=np.float32)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_batch(images, prompts)
        image_emb = self.encoder.encode_images(images)  # [B, n], unit norm
        text_emb = self.encoder.encode_texts(prompts)  # [B, n], unit norm
        scores = (image_emb * text_emb).sum(dim=-1)
        return RewardOutput(
            scores=scores.numpy(),
            embeddings={"image": image_emb.numpy(), "text": text_emb.numpy()},
        )
