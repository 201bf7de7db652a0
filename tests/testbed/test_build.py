"""The shapes world's model builders: deterministic and bit-identically resumable training, the manifest
check, and the assembled pipeline loading through diffusers' own ``from_pretrained`` (tiny step counts)."""

from __future__ import annotations

import shutil

import pytest
import torch

from testbed.build.cli import build
from testbed.build.manifest import ManifestError, check_manifest, write_manifest
from testbed.build.negatives import candidate_texts, hard_negatives, pairwise_wins
from testbed.judge import parse_caption

torch.set_num_threads(1)


def _same_state(a, b) -> bool:
    """Bitwise equality of two saved training states (weights and optimizer moments)."""
    sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    if sa["step"] != sb["step"]:
        return False
    for key in sa["modules"]:
        for name, tensor in sa["modules"][key].items():
            if not torch.equal(tensor, sb["modules"][key][name]):
                return False
    for pid, moments in sa["optimizer"]["state"].items():
        for name, value in moments.items():
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(sb["optimizer"]["state"][pid][name])):
                return False
    return True


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A full build with 2 steps per model and tiny batches (weights nearly random; the plumbing is real)."""
    out = tmp_path_factory.mktemp("build")
    pipeline = build(out, steps=2, seed=0, batch_size=4, pool_size=16)
    return out, pipeline


def test_hard_negatives_change_one_attribute_and_stay_in_the_grammar():
    rng = __import__("numpy").random.default_rng(0)
    negatives = hard_negatives("a red circle left of a blue square", rng)
    assert set(negatives) == {"colour", "shape", "relation"}
    assert negatives["relation"] == "a red circle right of a blue square"
    assert hard_negatives("two red circles", rng)["count"] in ("a red circle", "three red circles")
    for negative in negatives.values():
        parse_caption(negative)  # a ValueError if it left the grammar


def test_candidate_texts_index_each_caption_once_with_its_negatives():
    rng = __import__("numpy").random.default_rng(0)
    texts, targets = candidate_texts(["a red circle", "a red circle", "two blue squares"], rng, allow_held_out=False)
    assert len(texts) == len(set(texts))
    assert [texts[t] for t in targets] == ["a red circle", "a red circle", "two blue squares"]
    assert targets[0] == targets[1] == 0


def test_pairwise_wins_count_the_true_caption_beating_each_swap():
    """A text embedding that knows colours but not shapes: colour swaps are always won, shape swaps never
    (the true caption and its shape swap embed the same, and a tie is not a win)."""
    colours = ["red", "green", "blue", "yellow"]

    def encode(texts):
        return torch.stack([torch.eye(4)[[c in t for c in colours].index(True)] for t in texts])

    rng = __import__("numpy").random.default_rng(0)
    captions = ["a red circle", "a blue square", "a yellow triangle"]
    image_emb = encode(captions)
    accuracy, counts = pairwise_wins(image_emb, captions, encode, rng)
    assert accuracy["colour"] == 1.0 and accuracy["shape"] == 0.0
    assert counts["colour"] == counts["shape"] == 3


def test_same_seed_gives_the_same_weights(tmp_path, tiny_build):
    from testbed.build.vae import train_vae

    for run in ("a", "b"):
        train_vae(tmp_path / run, steps=3, seed=5, batch_size=4, scaling_scenes=8)
    assert _same_state(tmp_path / "a" / "state" / "vae.pt", tmp_path / "b" / "state" / "vae.pt")
    train_vae(tmp_path / "c", steps=3, seed=6, batch_size=4, scaling_scenes=8)
    assert not _same_state(tmp_path / "a" / "state" / "vae.pt", tmp_path / "c" / "state" / "vae.pt")


@pytest.mark.parametrize("model", ["vae", "text_encoder", "unet", "reward_clip", "captioner"])
def test_a_resumed_build_is_bit_identical_to_an_uninterrupted_one(tmp_path, tiny_build, model):
    out, _ = tiny_build
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    if model == "unet":  # the UNet needs the other two: reuse the module's build for both runs
        for target in (whole, pieces):
            for sub in ("vae", "text_encoder", "tokenizer"):
                shutil.copytree(out / sub, target / sub)
    build(whole, only=model, steps=4, seed=1, batch_size=4, pool_size=16)
    build(pieces, only=model, steps=4, seed=1, batch_size=4, pool_size=16, stop_after=2)
    assert not _same_state(whole / "state" / f"{model}.pt", pieces / "state" / f"{model}.pt")
    build(pieces, only=model, steps=4, seed=1, batch_size=4, pool_size=16)
    assert _same_state(whole / "state" / f"{model}.pt", pieces / "state" / f"{model}.pt")


def test_the_manifest_names_a_modified_missing_or_unlisted_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.bin").write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    write_manifest(tmp_path)
    check_manifest(tmp_path)
    (tmp_path / "unet" / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ManifestError, match=r"unet/w\.bin does not match .*python -m testbed\.build"):
        check_manifest(tmp_path)
    (tmp_path / "unet" / "w.bin").unlink()
    with pytest.raises(ManifestError, match=r"unet/w\.bin is listed .* but missing.*python -m testbed\.build"):
        check_manifest(tmp_path)
    write_manifest(tmp_path)
    (tmp_path / "extra.txt").write_text("x")
    with pytest.raises(ManifestError, match="does not list"):
        check_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        check_manifest(tmp_path)


def test_the_assembled_pipeline_loads_with_diffusers_and_makes_32px_images(tiny_build):
    from diffusers import StableDiffusionPipeline

    _, pipeline = tiny_build
    check_manifest(pipeline)
    assert all(p.suffix != ".bin" for p in pipeline.rglob("*"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True, dtype=torch.float32)
    assert pipe.safety_checker is None and pipe.scheduler.config.steps_offset == 1
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    images = pipe(["a red circle", "two blue squares"], num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    from safetensors.torch import load_file

    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (pipeline / part).glob("*.safetensors")
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}  # shipped as fp16


def test_the_exported_captioner_loads_back_in_transformers_with_the_trained_weights(tiny_build):
    """The fp16 export (vision keys renamed to vLLM's layout) loads through transformers' own
    ``from_pretrained`` with every weight in place: its logits equal the trained model's up to fp16."""
    from testbed.build.captioner import PROMPT, load_captioner, make_captioner, training_images
    from testbed.build.common import TrainState

    out, _ = tiny_build
    loaded, processor = load_captioner(out / "captioner_fp16")  # checks the manifest
    trained, _ = make_captioner(seed=12345)  # other initial weights, then the trained ones
    trained.load_state_dict(TrainState.load(out / "state" / "captioner.pt").modules["llava"])
    images, _ = training_images(0, 0, 2)
    inputs = processor(images=list(images), text=[PROMPT] * 2, return_tensors="pt")
    with torch.no_grad():
        a, b = loaded(**inputs).logits, trained.eval()(**inputs).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=0), (a - b).abs().max()


def test_the_unet_needs_the_vae_built_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--only vae"):
        build(tmp_path, only="unet", steps=1, batch_size=2, pool_size=4)


def test_resolve_pretrained_names_the_build_command_for_an_unknown_variant():
    from actors.tiny import resolve_pretrained

    with pytest.raises(ValueError, match="tiny:shapes"):
        resolve_pretrained("tiny:nope", cache_dir="unused")


def test_tiny_shapes_is_refused_when_its_manifest_is_missing_or_stale(tmp_path, monkeypatch):
    import testbed.build.manifest as manifest
    from actors.tiny import resolve_pretrained

    monkeypatch.setattr(manifest, "SHAPES_WEIGHTS", tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"no manifest\.json.*python -m testbed\.build"):
        resolve_pretrained("tiny:shapes", cache_dir=tmp_path)
    write_manifest(tmp_path)
    assert resolve_pretrained("tiny:shapes", cache_dir="unused") == str(tmp_path)
    (tmp_path / "model_index.json").write_text('{"edited": 1}')
    with pytest.raises(ManifestError, match="model_index.json does not match"):
        resolve_pretrained("tiny:shapes", cache_dir=tmp_path)


def test_the_shipped_models_match_their_manifests_and_are_fp16_and_small():
    from safetensors.torch import load_file

    from actors.tiny import resolve_pretrained
    from rewards.tiny import shapes_clip_options
    from testbed.build.manifest import SHAPES_CLIP_WEIGHTS, SHAPES_LLAVA_WEIGHTS, SHAPES_WEIGHTS

    path = resolve_pretrained("tiny:shapes", cache_dir="unused")
    assert path == str(SHAPES_WEIGHTS)
    options = shapes_clip_options()  # checks the reward model's manifest
    assert {t.dtype for t in load_file(options["pretrained"]).values()} == {torch.float16}
    shipped = [p for d in (SHAPES_WEIGHTS, SHAPES_CLIP_WEIGHTS, SHAPES_LLAVA_WEIGHTS) for p in d.rglob("*")
               if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) < 25 * 2**20


def test_the_reward_model_prefers_the_true_caption_on_held_out_kinds():
    """clip_score with the shipped reward model, against the ground truth: on renders with a held-out kind,
    the true caption outscores its colour swap and its shape swap (the binding an RL run must learn)."""
    import numpy as np

    from rewards.registry import build_reward
    from rewards.tiny import shapes_clip_options
    from testbed.build.common import eval_scenes
    from testbed.build.negatives import swap
    from testbed.world import render

    reward = build_reward("clip_score", **shapes_clip_options())
    scenes = eval_scenes(120, held_out=True, offset=300_000)
    images = np.stack([render(s) for s in scenes])
    rng = np.random.default_rng(0)
    true = reward(images, [s.caption for s in scenes]).scores
    for kind in ("colour", "shape"):
        swapped = [swap(s.caption, kind, rng, allow_held_out=True) for s in scenes]
        keep = [i for i, c in enumerate(swapped) if c is not None]
        wrong = reward(images[keep], [swapped[i] for i in keep]).scores
        assert np.mean(true[keep] > wrong) >= 0.9, kind


def test_the_base_pipeline_follows_seen_prompts_far_above_chance():
    """The shipped pipeline draws what single-object prompts of seen kinds ask for: judge accuracy well
    above the shuffled-caption chance level (fixed seeds; n = 60)."""
    from diffusers import StableDiffusionPipeline

    from testbed.build.evaluate import evaluate_prompt_sets
    from testbed.build.manifest import SHAPES_WEIGHTS
    from testbed.world import HELD_OUT, KINDS, caption_for

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_WEIGHTS, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption_for("single", [k]) for k in KINDS if k not in HELD_OUT]
    table = evaluate_prompt_sets(pipe, {"seen": prompts}, per_prompt=6, seed=0)["seen"]["all"]
    assert table["n"] == 60
    assert table["correct"] > table["chance_shuffled"] + 4 * max(table["se"], 0.03), table
