"""``python -m testbed.build``: trains the shapes world's VAE, text encoder and UNet in that order, then the
reward model and the captioner (each resumable from its last saved training state under OUT/state),
assembles the fp16 pipeline at OUT/pipeline, the reward model at OUT/reward_clip_fp16 and the captioner
at OUT/captioner_fp16, each with its manifest, and appends what it measured to OUT/report.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

MODELS = ("vae", "text_encoder", "unet", "reward_clip", "captioner")
# Step counts of the shipped build (see testbed/weights/BUILD_REPORT.md for their wall times).
DEFAULT_STEPS = {"vae": 600, "vae_decoder": 400, "text_encoder": 2000, "unet": 4000, "reward_clip": 1500,
                 "captioner": 3200}


def _record(out: Path, key: str, value: dict) -> None:
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[key] = value
    path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"[build] {key}: {json.dumps(value)}", file=sys.stderr, flush=True)


def _load(out: Path, what: str):
    """A model an earlier run of the build saved under OUT; a clear error if that run never happened."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    path = out / what
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the {what} is built before the models that use it. "
                                f"Run `python -m testbed.build --out {out} --only {what}` first (or without --only).")
    if what == "vae":
        return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return (CLIPTextModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32),
            CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True))


def build(out: Path, *, only: str | None = None, steps: int | None = None, seed: int = 0,
          evaluate: bool = False, batch_size: int | None = None, pool_size: int | None = None,
          stop_after: int | None = None) -> Path | None:
    """Runs the build (see the module docstring); returns the pipeline directory when the UNet was built."""
    from testbed.build.common import count_params

    out.mkdir(parents=True, exist_ok=True)
    todo = MODELS if only is None else (only,)
    vae = text = None
    sizes = ({} if batch_size is None else {"batch_size": batch_size}) | {"stop_after": stop_after}
    for name in todo:
        n = steps if steps is not None else DEFAULT_STEPS[name]
        t0 = time.time()
        if name == "vae":
            from testbed.build.vae import evaluate_vae, finetune_decoder, train_vae

            vae = train_vae(out, steps=n, seed=seed, **sizes)
            if stop_after is not None and stop_after < n:
                return None  # the decoder stage and the models after need the first stage finished
            decoder_steps = steps if steps is not None else DEFAULT_STEPS["vae_decoder"]
            vae = finetune_decoder(out, vae, steps=decoder_steps, seed=seed, **sizes)
            info = {"params": count_params(vae), "steps": n, "decoder_steps": decoder_steps,
                    "wall_s": round(time.time() - t0, 1)}
            if evaluate:
                info |= dataclasses.asdict(evaluate_vae(vae, steps=n))
        elif name == "text_encoder":
            from testbed.build.text_encoder import pairwise_accuracy, train_text_encoder

            encoder, tokenizer, tower, heads = train_text_encoder(out, steps=n, seed=seed, **sizes)
            text = (encoder, tokenizer)
            info = {"params": count_params(encoder), "steps": n, "wall_s": round(time.time() - t0, 1)}
            if evaluate:
                for held_out in (False, True):
                    report = pairwise_accuracy(encoder, tokenizer, tower, heads, held_out=held_out)
                    info["pairwise_" + ("held_out" if held_out else "seen")] = dataclasses.asdict(report)
        elif name == "reward_clip":
            from testbed.build.reward_clip import export, pairwise_accuracy, train_reward_clip

            model, tokenizer = train_reward_clip(out, steps=n, seed=seed, **sizes)
            info = {"params": count_params(model), "steps": n, "wall_s": round(time.time() - t0, 1),
                    "shipped": str(export(out, model).relative_to(out))}
            if evaluate:
                info |= dataclasses.asdict(pairwise_accuracy(model, tokenizer))
        elif name == "captioner":
            from testbed.build.captioner import export as export_captioner
            from testbed.build.captioner import train_captioner

            model, processor = train_captioner(out, steps=n, seed=seed, **sizes)
            info = {"params": count_params(model), "steps": n, "wall_s": round(time.time() - t0, 1),
                    "shipped": str(export_captioner(out, model, processor).relative_to(out))}
            if evaluate:
                from testbed.build.captioner_eval import evaluate_captioner

                info |= evaluate_captioner(model, processor)
        else:
            from testbed.build.unet import assemble_pipeline, train_unet

            vae = vae if vae is not None else _load(out, "vae")
            encoder, tokenizer = text if text is not None else _load(out, "text_encoder")
            unet = train_unet(out, vae, encoder, tokenizer, steps=n, seed=seed, **sizes,
                              **({} if pool_size is None else {"pool_size": pool_size}))
            info = {"params": count_params(unet), "steps": n, "wall_s": round(time.time() - t0, 1)}
            target = assemble_pipeline(out, vae, encoder, tokenizer, unet)
            info["pipeline_bytes"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        _record(out, name, info)
        if stop_after is not None and stop_after < n and name not in ("unet", "reward_clip", "captioner"):
            print(f"[build] stopped {name} at step {stop_after} of {n}; rerun to resume", file=sys.stderr)
            return None  # the models after this one need it finished (a stopped UNet is still assembled)
    return out / "pipeline" if "unet" in todo else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.build", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="build directory (models, training state, report)")
    parser.add_argument("--only", choices=MODELS, help="build one model (the UNet needs the other two built)")
    parser.add_argument("--steps", type=int, help=f"training steps per model (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every draw of the build")
    parser.add_argument("--eval", action="store_true", help="also measure each model built (the captioner: exact match and the judge)")
    parser.add_argument("--batch-size", type=int, help="batch size of every model (default: each model's own)")
    parser.add_argument("--pool-size", type=int, help="training scenes the UNet's latent pool holds")
    parser.add_argument("--stop-after", type=int, help="end this run at that step (rerun to resume)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive number of training steps, got {args.steps}")
    torch.set_num_threads(args.threads)
    path = build(args.out, only=args.only, steps=args.steps, seed=args.seed, evaluate=args.eval,
                 batch_size=args.batch_size, pool_size=args.pool_size, stop_after=args.stop_after)
    if path is not None:
        print(f"pipeline: {path}")
    return 0
