"""The evaluation's gold rewards, held in process: scores of the evaluation images by rewards the
policy is not trained on, and the CLIP Recall@1 hits.

A plain class (the reward stage builds it on its first evaluation, so runs without evaluation rewards
build nothing). The gold rewards always run here, whatever ``reward_service.backend`` the training
rewards use: an evaluation is a few small batches, and a gold reward needs no Serve deployment.
Results are plain numpy arrays in a dict, so nothing but numpy crosses Ray.
"""

from __future__ import annotations

import numpy as np

from rewards.base import RewardOutput
from rewards.clip_encoder import EncoderCache
from rewards.registry import build_reward


def recall_hits(image_emb: np.ndarray, text_emb: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """CLIP Recall@1 of prompt retrieval: image_emb float [B, n] and text_emb float [C, n] (unit-norm rows,
    C candidate prompts), targets int [B] (the index of each image's own prompt) -> bool [B], true where
    argmax_c <image_i, text_c> is image i's own prompt (ties go to the first candidate)."""
    similarity = np.asarray(image_emb, dtype=np.float64) @ np.asarray(text_emb, dtype=np.float64).T  # [B, C]
    return similarity.argmax(axis=1) == np.asarray(targets)


class GoldScorer:
    """Holds the evaluation rewards (``specs``: name -> options for ``build_reward``) and the recall reward
    (``recall``: (name, options), a reward that returns image embeddings and has ``embed_texts``)."""

    def __init__(self, *, specs: dict[str, dict], recall: tuple[str, dict] | None = None,
                 encoders: EncoderCache | None = None) -> None:
        encoders = encoders if encoders is not None else EncoderCache()  # CLIP rewards share one encoder
        self.rewards = {name: build_reward(name, encoders=encoders, **(options or {})) for name, options in specs.items()}
        self.recall_name = None if recall is None else recall[0]
        self.recall = None
        if recall is not None:
            name, options = recall
            self.recall = self.rewards.get(name) or build_reward(name, encoders=encoders, **(options or {}))

    def evaluate(self, *, images: np.ndarray, prompts: list[str], candidates: list[str]) -> dict:
        """B images uint8 [B, H, W, 3] of ``prompts`` [B] -> {"scores": {reward: float32 [B]}, "checks":
        {reward: {check: float32 [B]}} (the rewards that return their score's parts), "recall_hit": bool [B]
        or None}; recall retrieves each image's prompt among ``candidates`` (every evaluation
        prompt, each once), which must hold every prompt of the batch."""
        outputs: dict[str, RewardOutput] = {name: reward(images, prompts) for name, reward in self.rewards.items()}
        hits = None
        if self.recall is not None:
            missing = sorted(set(prompts) - set(candidates))
            if missing:
                raise ValueError(f"recall candidates must hold every prompt of the batch; missing {missing}")
            out = outputs.get(self.recall_name) or self.recall(images, prompts)
            if "image" not in out.embeddings:
                raise ValueError(f"the recall reward {self.recall_name!r} returned no image embeddings; Recall@1 "
                                 f"needs a reward that embeds images and texts (clip_score)")
            text_emb = self.recall.embed_texts(list(candidates))
            index = {prompt: i for i, prompt in enumerate(candidates)}
            hits = recall_hits(out.embeddings["image"], text_emb, np.array([index[p] for p in prompts]))
        return {"scores": {name: np.asarray(out.scores, dtype=np.float32) for name, out in outputs.items()},
                "checks": {name: dict(out.checks) for name, out in outputs.items() if out.checks},
                "recall_hit": hits}
