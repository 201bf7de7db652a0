"""The shapes world's captioner: a tiny ``LlavaForConditionalGeneration`` trained to caption world images,
shipped as ``tiny:shapes-llava`` for the ``llava_bertscore`` reward (which serves it with vLLM).

Like the reward model it is trained on broader data than the generator it judges: renders of *every*
kind (one scene in three holds a held-out kind), half of them degraded (box blur, pixel noise;
``reward_clip.degrade``) so that it also captions a diffusion model's soft samples. Half of the scenes
are of the relation family (a quarter single, a quarter count): two objects, their kinds and their
relation are most of what there is to learn.

Architecture (``ARCH``, built by ``rewards.tiny_llava``, the one source of the LLaVA layout vLLM loads):
a CLIP ViT of 32 px images with patch 4 (64 patch tokens: a relation needs where each object is),
width 64, 4 layers, all of them read by the projector (``vision_feature_layer`` -1); llava-1.5's
two-layer projector; a Llama LM of width 128, 4 layers, 2 heads of head_dim 64 with a KV head each. Tokenizer: a byte-level BPE
trained on every caption of the grammar and the question prompt, so each word is one token.

Objective: teacher-forced next-token cross-entropy on the caption tokens only (the prompt and padding
are masked with -100), for the sequence
    <s> "USER: " <image>×64 "\\n{question} ASSISTANT:" " {caption}" </s>
which is ``llava_bertscore``'s default prompt (``DEFAULT_PROMPT_TEMPLATE`` with ``DEFAULT_QUESTION``)
followed by the ground-truth caption and EOS; so greedy decoding after the prompt emits the caption
and stops.
"""

from __future__ import annotations

import numpy as np
import torch

from rewards.llava_bertscore import DEFAULT_PROMPT_TEMPLATE, DEFAULT_QUESTION
from rewards.tiny_llava import LlavaArch, build_model, build_processor, build_tokenizer, save_llava
from testbed.build.common import _STRIDE, cosine_lr, train_loop
from testbed.build.reward_clip import degrade
from testbed.world import (
    COLORS,
    COUNT_WORDS,
    KINDS,
    RELATIONS,
    SHAPES,
    Scene,
    caption_for,
    render,
    scene_for_seed,
)

# Two LM layers with one KV head named the first object of a relation but rarely the second (a quarter of
# the pairs right): finding "the other object" takes depth, so four layers and a KV head per query head.
ARCH = LlavaArch(vision_hidden=64, vision_layers=4, vision_heads=2, vision_intermediate=128, patch_size=4,
                 vision_feature_layer=-1, text_layers=4, text_kv_heads=2)
PROMPT = DEFAULT_PROMPT_TEMPLATE.format(question=DEFAULT_QUESTION)
# 256 byte symbols and 5 specials leave room for every word of the grammar and the prompt as one token.
VOCAB_SIZE = 384
BATCH_SIZE = 32
PEAK_LR = 2e-3
MAX_NEW_TOKENS = 16  # the longest caption is 9 words
SEED_OFFSET = 202  # the captioner's draws are apart from every other model's (seed + 0..3, seed + 101)
IGNORE = -100  # the label cross-entropy skips


def grammar_captions() -> list[str]:
    """Every caption of the world's grammar (single, count, relation; held-out kinds included)."""
    captions = [caption_for("single", [k]) for k in KINDS]
    captions += [caption_for("count", [k], count=n) for k in KINDS for n in COUNT_WORDS]
    captions += [caption_for("relation", [a, b], relation=r) for a in KINDS for b in KINDS for r in RELATIONS
                 if a != b]
    return captions


def make_tokenizer():
    """The captioner's BPE: trained on the grammar's captions (as the model emits them, after a space)
    and the prompt, repeated so that its words merge too; deterministic (the trainer has no randomness)."""
    vocabulary = " ".join([*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *COUNT_WORDS.values(), *RELATIONS])
    corpus = [" " + c for c in grammar_captions()] + [PROMPT] * 50 + [vocabulary] * 50
    return build_tokenizer(corpus, vocab_size=VOCAB_SIZE)


def make_captioner(seed: int):
    """(model, processor): a freshly initialised captioner (float32) and its ``LlavaProcessor``."""
    tokenizer = make_tokenizer()
    return build_model(ARCH, tokenizer, seed=seed), build_processor(ARCH, tokenizer)


def encode_batch(processor, images: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
    """The teacher-forcing batch of uint8 images [B, 32, 32, 3] and their B captions:
    input_ids, attention_mask, labels [B, L] (prompt, then " caption</s>", right-padded; labels are
    IGNORE except on the caption and EOS) and pixel_values [B, 3, 32, 32] (the processor's, as vLLM's)."""
    tokenizer = processor.tokenizer
    prompt = processor(images=list(images), text=[PROMPT] * len(images), return_tensors="pt")
    answers = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for c in captions]
    width = max(len(a) for a in answers)
    prompt_ids = prompt["input_ids"]  # [B, P]: identical rows (one prompt, one image each)
    answer_ids = torch.full((len(answers), width), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(answers), width), dtype=torch.long)
    for i, a in enumerate(answers):
        answer_ids[i, :len(a)] = torch.tensor(a)
        answer_mask[i, :len(a)] = 1
    input_ids = torch.cat([prompt_ids, answer_ids], dim=1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids.masked_fill(answer_mask == 0, IGNORE)], 1)
    attention_mask = torch.cat([prompt["attention_mask"], answer_mask], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": prompt["pixel_values"]}


FAMILY_CYCLE = ("single", "relation", "count", "relation")  # scene i of a batch: FAMILY_CYCLE[i // 2 % 4]


def scene_batch(seed: int, step: int, batch_size: int) -> list[Scene]:
    """The captioner's scenes of one step: families in ``FAMILY_CYCLE`` by pairs (``degrade`` blurs every
    other image, so each family gets as many clean images as degraded ones; with a family per index
    instead, the singles and counts would all be degraded and the relations all clean), every third scene
    with a held-out kind (``codec_scene_batch``'s seed space, so a pure function of (seed, step, i))."""
    base = (seed * _STRIDE + step) * batch_size
    return [scene_for_seed(base + i, family=FAMILY_CYCLE[i // 2 % len(FAMILY_CYCLE)], held_out=i % 3 == 2)
            for i in range(batch_size)]


def training_images(seed: int, step: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [B, 32, 32, 3] renders of one step's scenes (every kind; every other one degraded), captions."""
    scenes = scene_batch(seed + SEED_OFFSET, step, batch_size)
    rng = np.random.default_rng([seed + SEED_OFFSET, step])
    return degrade(np.stack([render(s) for s in scenes]), rng), [s.caption for s in scenes]


def train_captioner(out_dir, *, steps: int, seed: int, batch_size: int = BATCH_SIZE, save_every: int = 200,
                    stop_after: int | None = None):
    """Trains (or resumes, from out_dir/state/captioner.pt) the captioner to ``steps``; returns
    (model, processor), the model in float32 and eval mode."""
    model, processor = make_captioner(seed + SEED_OFFSET)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)

    def loss_fn(step: int):
        images, captions = training_images(seed, step, batch_size)
        batch = encode_batch(processor, images, captions)
        out = model(**batch)
        # Token accuracy of the teacher-forced caption (logit t predicts token t + 1).
        predicted = out.logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        return out.loss, {"token_acc": float((predicted[mask] == target[mask]).float().mean())}

    train_loop(name="captioner", modules={"llava": model}, optimizer=optimizer, loss_fn=loss_fn, steps=steps,
               state_path=out_dir / "state" / "captioner.pt", save_every=save_every, stop_after=stop_after,
               lr_at=lambda s: cosine_lr(s, total=steps, peak=PEAK_LR, warmup=min(100, max(1, steps // 10))))
    return model.eval(), processor


def export(out_dir, model, processor):
    """The shipped form: out_dir/captioner_fp16 (llava-hf layout, fp16 safetensors, manifest.json)."""
    import shutil

    from testbed.build.manifest import write_manifest

    target = out_dir / "captioner_fp16"
    if target.exists():
        shutil.rmtree(target)  # a rebuild replaces the whole directory, so no stale file survives
    save_llava(model, processor, target, dtype=torch.float16)
    write_manifest(target)
    return target


def load_captioner(directory, *, check: bool = True):
    """(model float32 eval, processor) from a shipped captioner directory, after its manifest check."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from testbed.build.manifest import check_manifest

    if check:
        check_manifest(directory)
    model = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(directory, local_files_only=True)


@torch.no_grad()
def caption_images(model, processor, images: np.ndarray, *, batch_size: int = 64) -> list[str]:
    """uint8 [N, 32, 32, 3] -> N captions: greedy decoding after the prompt (transformers ``generate``),
    stripped, as ``llava_bertscore`` strips vLLM's."""
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        inputs = processor(images=list(chunk), text=[PROMPT] * len(chunk), return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        captions += [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return captions

