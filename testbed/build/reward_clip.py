"""The shapes world's reward model: an open_clip ``CLIP`` (ViT image tower, transformer text tower, the real
CLIP BPE tokenizer), trained contrastively on renders of *every* kind, held-out ones included, the way a
real reward model is trained on broader data than the generator it judges.

It differs from the pipeline's text encoder in everything but the tokenizer: another seed stream,
another architecture (a ViT against a conv tower, open_clip's text transformer against transformers'
``CLIPTextModel``), another objective (symmetric), and it sees the held-out kinds. So ``clip_score`` with
it is an independent reward, not the generator grading its own homework.

Objective (CLIP, Radford et al. 2021, Fig. 3, symmetric, plus NegCLIP's hard negatives, Yuksekgonul et
al. 2023): per step, B scenes and the set T of distinct captions among the B true captions and one
attribute-swap negative per applicable swap of each (``negatives.hard_negatives``);
    s_ij = exp(τ) · ⟨f(x_i), g(t_j)⟩   (unit-norm f, g),
    L = ½ mean_i CE(s_i·, caption_i) + ½ mean_i CE(s_·caption_i restricted to the B images, i)
(the second term: each true caption against the batch's images; duplicate captions count every image
that carries them as a positive). Images: [B, 3, 32, 32] through ``rewards.clip_encoder.preprocess_images``
(exactly what ``clip_score`` feeds the model), half of them degraded (box blur, Gaussian pixel noise) so
the reward stays meaningful on a diffusion model's soft samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from testbed.build.common import codec_scene_batch, cosine_lr, eval_scenes, train_loop
from testbed.build.negatives import candidate_texts, pairwise_wins
from testbed.world import render

MODEL_NAME = "shapes-clip"  # open_clip names a registered config by its file stem
# The longest caption of the grammar is 11 tokens with start and end: 20 positions cost a quarter of 77.
CONFIG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
WEIGHTS_FILE = "open_clip_model.safetensors"
BATCH_SIZE = 64
PEAK_LR = 1e-3
SEED_OFFSET = 101  # the reward model's draws are apart from every generator model's (seed + 0..3)
# Mean and std of OpenAI CLIP, which open_clip's preprocess_cfg defaults to for a custom config.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    return path


def make_model(directory: Path, seed: int):
    """A freshly initialised open_clip model of ``CONFIG`` (registered from directory/shapes-clip.json)."""
    import open_clip

    from rewards.clip_encoder import register_model_config

    register_model_config(MODEL_NAME, write_config(directory))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # open_clip initialises through the global generator
        model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def degrade(images: np.ndarray, rng: np.random.Generator, *, every: int = 2) -> np.ndarray:
    """uint8 [B, 32, 32, 3]: every ``every``-th image (the first, then each ``every`` after; 1 = all)
    box-blurred (3×3) with Gaussian pixel noise (σ 0-12 levels), the softness of a diffusion sample."""
    out = images.astype(np.float32)
    for i in range(0, len(out), every):
        padded = np.pad(out[i], ((1, 1), (1, 1), (0, 0)), mode="edge")
        out[i] = sum(padded[dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)) / 9.0
        out[i] += rng.normal(0.0, rng.uniform(0, 12), out[i].shape)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def _pixels(images: np.ndarray) -> torch.Tensor:
    from rewards.clip_encoder import preprocess_images

    return preprocess_images(images, size=32, mean=MEAN, std=STD)


def symmetric_loss(model, images: np.ndarray, captions: list[str], tokenizer, rng: np.random.Generator):
    """The loss of the module docstring for uint8 images [B, 32, 32, 3] and their B captions."""
    texts, target_list = candidate_texts(captions, rng, allow_held_out=True)
    targets = torch.tensor(target_list)
    image_emb = nn.functional.normalize(model.encode_image(_pixels(images)), dim=-1)  # [B, D]
    text_emb = nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)  # [T, D]
    logits = model.logit_scale.clamp(max=float(np.log(100.0))).exp() * image_emb @ text_emb.T  # [B, T]
    i2t = nn.functional.cross_entropy(logits, targets)
    positive = (targets[None, :] == targets[:, None]).float()  # [B caption, B image]: same caption
    t2i_logits = logits[:, targets].T  # [B captions (true ones, per image), B images]
    t2i = -(torch.log_softmax(t2i_logits, dim=-1) * positive / positive.sum(-1, keepdim=True)).sum(-1).mean()
    return 0.5 * (i2t + t2i), {"acc": float((logits.argmax(-1) == targets).float().mean())}


def train_reward_clip(out_dir: Path, *, steps: int, seed: int, batch_size: int = BATCH_SIZE,
                      save_every: int = 200, stop_after: int | None = None):
    """Trains (or resumes) the reward model to ``steps``; saves out_dir/reward_clip/{shapes-clip.json,
    open_clip_model.safetensors} (float32; ``export`` writes the shipped fp16 copy). Returns (model, tokenizer)."""
    target = out_dir / "reward_clip"
    model, tokenizer = make_model(target, seed + SEED_OFFSET)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)

    def loss_fn(step: int):
        scenes = codec_scene_batch(seed + SEED_OFFSET, step, batch_size, held_out_every=3)
        rng = np.random.default_rng([seed + SEED_OFFSET, step])
        images = degrade(np.stack([render(s) for s in scenes]), rng)
        return symmetric_loss(model, images, [s.caption for s in scenes], tokenizer, rng)

    train_loop(name="reward_clip", modules={"clip": model}, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "reward_clip.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR, warmup=min(100, max(1, steps // 10))))
    model.eval()
    save_weights(model, target / WEIGHTS_FILE, dtype=torch.float32)
    return model, tokenizer


def save_weights(model, path: Path, *, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))


def export(out_dir: Path, model) -> Path:
    """The shipped form: out_dir/reward_clip_fp16/{shapes-clip.json, fp16 safetensors, manifest.json}."""
    from testbed.build.manifest import write_manifest

    target = out_dir / "reward_clip_fp16"
    write_config(target)
    save_weights(model, target / WEIGHTS_FILE, dtype=torch.float16)
    write_manifest(target)
    return target


@dataclass(frozen=True)
class RewardClipReport:
    """Pairwise accuracy (image nearer its caption than the one-attribute swap) per swap, on clean renders
    of fixed evaluation scenes with seen kinds and with held-out kinds."""

    seen: dict[str, float]
    held_out: dict[str, float]
    n: int


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, *, n: int = 400) -> RewardClipReport:
    result = {}
    for held_out in (False, True):
        scenes = eval_scenes(n, held_out=held_out, offset=70_000)
        rng = np.random.default_rng(54321)
        image_emb = nn.functional.normalize(model.encode_image(_pixels(np.stack([render(s) for s in scenes]))), dim=-1)
        accuracy, _ = pairwise_wins(image_emb, [s.caption for s in scenes], lambda texts: nn.functional.normalize(
            model.encode_text(tokenizer(texts)), dim=-1), rng)
        result[held_out] = {k: round(v, 3) for k, v in accuracy.items()}
    return RewardClipReport(seen=result[False], held_out=result[True], n=n)
