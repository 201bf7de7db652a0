"""A tiny LLaVA with random weights that a real vLLM engine loads, for tests and the CPU demo.

No download: the model is built from configs:
- vision tower: CLIP ViT, hidden 32, 32 px images, patch 8 -> 16 patch tokens (+ CLS, dropped by
  the "default" feature-select strategy, as in llava-1.5), 2 layers;
- language model: Llama, hidden 128, 2 query heads and 1 KV head of head_dim 64 (vLLM's CPU
  attention rejects head_dim 16), 2 layers;
- tokenizer: byte-level BPE trained here on a small built-in corpus with the ``tokenizers`` library,
  special tokens ``<unk> <s> </s> <pad> <image>``; BOS is prepended like llava-1.5's Llama tokenizer;
- processor: ``LlavaProcessor`` (CLIPImageProcessor at 32 px) that expands one ``<image>`` into the
  16 image tokens, so vLLM's prompt-replacement check agrees with the model.

Prompts use llava-1.5's plain format, ``"USER: <image>\\n{question} ASSISTANT:"`` (no chat template).

The pieces (``LlavaArch``, ``build_tokenizer``, ``build_model``, ``build_processor``, ``save_llava``) are
also what the shapes world's trained captioner is built from (``testbed/build/captioner.py``), so the
layout vLLM loads is defined once.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_SIZE = 32
BPE_VOCAB_SIZE = 512  # 256 byte symbols + specials + ~250 merges: short word pieces, tiny embedding
# Bump when the builder's output changes, so a cached directory from an older builder is not reused.
TINY_LLAVA_VERSION = 1


@dataclass(frozen=True)
class LlavaArch:
    """The sizes of a tiny LLaVA: a CLIP ViT tower, llava-1.5's two-layer projector and a Llama LM.

    The defaults are the random-weight ``tiny:llava``. ``head_dim`` stays 64: vLLM's CPU attention
    rejects 16. ``vision_feature_layer`` picks the tower's hidden state the projector reads (-2, as in
    llava-1.5, skips the last layer; -1 uses every layer, which a tower of a few layers needs).
    """

    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    patch_size: int = 8
    vision_feature_layer: int = -2
    text_hidden: int = 128
    text_heads: int = 2
    text_kv_heads: int = 1
    head_dim: int = 64
    text_layers: int = 2
    text_intermediate: int = 256

    @property
    def num_image_tokens(self) -> int:
        """Patch tokens per image: the CLS token is dropped by the "default" feature-select strategy."""
        return (IMAGE_SIZE // self.patch_size) ** 2


TINY_ARCH = LlavaArch()
PATCH_SIZE = TINY_ARCH.patch_size
NUM_IMAGE_TOKENS = TINY_ARCH.num_image_tokens

# Caption-like English, so the BPE merges are word pieces and random-weight output reads as text.
_CORPUS = [
    "The image contains a photo of a cat sitting on a red sofa.",
    "A dog runs across a green field under a blue sky.",
    "A man rides a horse on the beach at sunset.",
    "Two children are playing with a ball in the park.",
    "A bowl of fruit with apples, bananas and oranges on a wooden table.",
    "A city street at night with cars, lights and tall buildings.",
    "Mountains covered in snow behind a calm lake.",
    "A woman is reading a book in a small cafe.",
    "A bird is flying over the ocean near the shore.",
    "What is going on in this image? Answer concisely.",
    "USER: ASSISTANT: The picture shows an animal, a person and a landscape.",
    "A hedgehog, a raccoon and a monkey are eating food together.",
]


def build_tokenizer(corpus: list[str], *, vocab_size: int = BPE_VOCAB_SIZE):
    """Byte-level BPE (``PreTrainedTokenizerFast``) trained on ``corpus``, BOS prepended, ``<image>``
    special; every byte stays encodable, so text outside the corpus tokenizes too (in more pieces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
    )


def build_model(arch: LlavaArch, tokenizer, *, seed: int):
    """A float32 ``LlavaForConditionalGeneration`` of ``arch`` for ``tokenizer``'s vocabulary, initialised
    from torch's global generator seeded with ``seed`` (transformers initialises through it)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        image_size=IMAGE_SIZE,
        patch_size=arch.patch_size,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        intermediate_size=arch.vision_intermediate,
        projection_dim=arch.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=arch.text_hidden,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads,
        head_dim=arch.head_dim,
        num_hidden_layers=arch.text_layers,
        intermediate_size=arch.text_intermediate,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=arch.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=arch.vision_feature_layer,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_processor(arch: LlavaArch, tokenizer):
    """``LlavaProcessor`` (CLIPImageProcessor at 32 px) that expands one ``<image>`` into the
    ``arch.num_image_tokens`` image tokens, so vLLM's prompt-replacement check agrees with the model."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=arch.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
    )


def save_llava(model, processor, directory: str | Path, *, dtype=None) -> Path:
    """Writes ``model`` (cast to ``dtype`` if given, e.g. torch.float16 for a shipped copy) and its
    processor into ``directory`` in the llava-hf layout vLLM loads (vision keys renamed)."""
    directory = Path(directory)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(directory)
    _rename_vision_keys(directory)
    processor.save_pretrained(directory)
    return directory


def _rename_vision_keys(model_dir: Path) -> None:
    """transformers 5.19 saves the CLIP tower as ``…vision_tower.<x>``; vLLM's LLaVA loader wants
    ``vision_tower.vision_model.<x>`` (the layout of llava-hf checkpoints). Rewrites the file(s)."""
    from safetensors.torch import load_file, save_file

    for file in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(file))
        renamed = {}
        for key, value in tensors.items():
            head, sep, rest = key.partition("vision_tower.")
            if sep and not rest.startswith("vision_model."):
                key = f"{head}vision_tower.vision_model.{rest}"
            renamed[key] = value.contiguous()
        save_file(renamed, str(file), metadata={"format": "pt"})
        index = file.with_name(file.name + ".index.json")
        if index.exists():  # only sharded checkpoints have one; keep its weight map consistent
            data = json.loads(index.read_text())
            data["weight_map"] = {
                (k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                 if "vision_tower." in k and "vision_tower.vision_model." not in k else k): v
                for k, v in data["weight_map"].items()
            }
            index.write_text(json.dumps(data, indent=2))


def build_tiny_llava(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Builds the tiny LLaVA into ``out_dir`` and returns it; an existing complete build is reused.

    The directory holds config.json, model.safetensors (~1 MB, float32), the tokenizer files and
    the processor config: what ``vllm.LLM(model=out_dir)`` and ``AutoProcessor`` load offline.
    Written to a temporary sibling directory and renamed into place, so a crash or a concurrent
    builder never leaves a half-written ``out_dir`` behind (the loser of a race keeps the winner's).
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = build_tokenizer(_CORPUS * 4)
        model = build_model(TINY_ARCH, tokenizer, seed=seed)
        save_llava(model, build_processor(TINY_ARCH, tokenizer), tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
            # Another process finished the same build first; use its directory.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
