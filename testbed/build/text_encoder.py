"""The shapes world's text encoder: a transformers ``CLIPTextModel`` with the real CLIP BPE tokenizer,
trained contrastively against a small image tower on (render, caption) pairs of the training split.

Objective (CLIP, Radford et al. 2021, Fig. 3, image-to-text direction, with NegCLIP's hard negatives,
Yuksekgonul et al. 2023): per step, B scenes and the set T of distinct captions among the B true
captions plus the hard negatives of each (``negatives.hard_negatives``);
    s_ij = exp(τ) · ⟨f(x_i), g(t_j)⟩ / (‖f(x_i)‖ ‖g(t_j)‖),   L = mean_i CE(s_i·, index of caption_i in T)
f: image tower [B, 3, 32, 32] -> [B, D]; g: projection of the text model's pooled (end-of-text) state,
[|T|, hidden] -> [|T|, D]; τ a learned log temperature. Only the text model and tokenizer are shipped;
the image tower exists to train them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from testbed.build.common import cosine_lr, eval_scenes, render_batch, scene_batch, train_loop
from testbed.build.negatives import candidate_texts, pairwise_wins

HIDDEN = 64
PROJ_DIM = 128
BATCH_SIZE = 64
PEAK_LR = 1e-3


class ImageTower(nn.Module):
    """[B, 3, 32, 32] -> [B, PROJ_DIM]; keeps a 4×4 spatial map before the last layer, so positions
    (needed for the relation family) survive, unlike a global average pool."""

    def __init__(self, dim: int = PROJ_DIM):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
            width = out
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.GELU(), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class ContrastiveHeads(nn.Module):
    """The text projection and the learned log temperature (initialised at CLIP's log(1/0.07))."""

    def __init__(self, hidden: int = HIDDEN, dim: int = PROJ_DIM):
        super().__init__()
        self.text_proj = nn.Linear(hidden, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))


def make_tokenizer(directory: Path):
    """The real CLIP BPE tokenizer (49408 ids, 77 positions), written from open_clip's vocabulary."""
    from transformers import CLIPTokenizer

    from actors.tiny import _write_clip_tokenizer

    _write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                              model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_text_encoder(seed: int):
    """A freshly initialised CLIPTextModel of width ``HIDDEN`` (3 layers, 4 heads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=3,
                            num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # transformers initialises through the global generator
        return CLIPTextModel(config), ImageTower(), ContrastiveHeads()


def encode_text(text_encoder, heads: ContrastiveHeads, tokenizer, captions: list[str]) -> torch.Tensor:
    """Unit-norm text embeddings [N, PROJ_DIM] of ``captions`` (padded to the longest; the causal mask
    makes the states up to end-of-text independent of the padding length)."""
    ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
    pooled = text_encoder(input_ids=ids).pooler_output
    return nn.functional.normalize(heads.text_proj(pooled), dim=-1)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor,
                     log_scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Image-to-text cross-entropy of the module docstring. image_emb [B, D] and text_emb [T, D] unit-norm,
    targets [B] indices into T; returns (loss, stats with the batch's top-1 accuracy)."""
    logits = log_scale.clamp(max=np.log(100.0)).exp() * image_emb @ text_emb.T  # [B, T]; CLIP caps τ at 100
    loss = nn.functional.cross_entropy(logits, targets)
    return loss, {"acc": float((logits.argmax(-1) == targets).float().mean())}


def train_text_encoder(out_dir: Path, *, steps: int, seed: int, batch_size: int = BATCH_SIZE,
                       save_every: int = 200, stop_after: int | None = None):
    """Trains (or resumes) the text encoder to ``steps``; saves out_dir/text_encoder and out_dir/tokenizer.
    Returns (text_encoder, tokenizer, image_tower, heads) for evaluation."""
    tokenizer = make_tokenizer(out_dir / "tokenizer")
    text_encoder, tower, heads = make_text_encoder(seed)
    modules = {"text_encoder": text_encoder, "image_tower": tower, "heads": heads}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=PEAK_LR, weight_decay=0.0)

    def loss_fn(step: int):
        # Scenes come from a stream distinct from the VAE's (offset seed), negatives from the step's rng.
        scenes = scene_batch(seed + 1, step, batch_size)
        texts, target_list = candidate_texts([s.caption for s in scenes], np.random.default_rng([seed, step]),
                                             allow_held_out=False)
        targets = torch.tensor(target_list)
        image_emb = nn.functional.normalize(tower(render_batch(scenes)), dim=-1)
        return contrastive_loss(image_emb, encode_text(text_encoder, heads, tokenizer, texts), targets, heads.log_scale)

    train_loop(name="text_encoder", modules=modules, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "text_encoder.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR, warmup=min(100, max(1, steps // 10))))
    text_encoder.eval()
    text_encoder.save_pretrained(out_dir / "text_encoder")
    return text_encoder, tokenizer, tower, heads


@dataclass(frozen=True)
class PairwiseReport:
    """Fraction of scenes whose image is nearer its true caption than the swapped one, per swap type."""

    accuracy: dict[str, float]
    n: dict[str, int]


@torch.no_grad()
def pairwise_accuracy(text_encoder, tokenizer, tower, heads, *, held_out: bool, n: int = 400) -> PairwiseReport:
    """Pairwise accuracies (colour/shape/count/relation) on ``n`` fixed evaluation scenes."""
    scenes = eval_scenes(n, held_out=held_out, offset=50_000)
    rng = np.random.default_rng(12345)
    image_emb = nn.functional.normalize(tower(render_batch(scenes)), dim=-1)
    accuracy, counts = pairwise_wins(image_emb, [s.caption for s in scenes],
                                     lambda texts: encode_text(text_encoder, heads, tokenizer, texts), rng)
    return PairwiseReport(accuracy=accuracy, n=counts)
