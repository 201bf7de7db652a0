"""``gard dpo``: offline Diffusion-DPO (Wallace et al., CVPR 2024) on a preference JSONL, in one process (no Ray).

Wires the config tree to ``learner.offline_dpo``: validates ``dpo.dataset``, builds the policy
(``tiny:sd`` resolves to a local tiny pipeline), prints the banner, trains ``dpo.steps`` AdamW steps of
``dpo.batch_size`` pairs, writes ``metrics.jsonl`` (+ TensorBoard) every ``dpo.log_every`` steps and
saves the adapter in diffusers format to ``<run_dir>/lora`` (``pipe.load_lora_weights(run_dir / "lora")``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import torch

from actors.tiny import resolve_pretrained
from cluster.adapter_record import record_files
from cluster.config import Config, ConfigError
from cluster.metrics import open_writer
from cluster.preflight import check_logging
from cluster.run import prepare_run_dir
from cluster.specs import policy_spec
from learner.offline_dpo import OfflineDpoTrainer, PreferenceDataError, load_preferences, window_means
from learner.precision import TrainingStalledError, training_dtype


def load_dataset(config: Config) -> list:
    """``dpo.dataset`` -> validated preference pairs; user errors become ``ConfigError``."""
    dataset = config.dpo.dataset
    if not dataset:
        raise ConfigError(
            "dpo.dataset is not set: gard dpo needs a preference JSONL file (one "
            '{"prompt": ..., "chosen": IMAGE, "rejected": IMAGE} object per line); pass dpo.dataset=PATH '
            "(for a synthetic demo set see configs/dpo_demo.yaml)"
        )
    path = Path(dataset)
    if not path.is_file():
        raise ConfigError(f"dpo.dataset = {dataset!r}: no such file (expected a preference JSONL file; "
                          f"relative paths are read from the current directory {str(Path.cwd())!r})")
    try:
        return load_preferences(path)
    except PreferenceDataError as err:
        raise ConfigError(f"dpo.dataset: {err}") from None


def banner(config: Config, *, run_dir: Path, device: str, n_pairs: int, n_prompts: int) -> str:
    d, t = config.dpo, config.train
    seen = d.steps * d.batch_size
    return "\n".join([
        "=" * 72,
        f"gard dpo: {config.name}  ->  {run_dir}",
        f"  policy              : {config.policy.pretrained} (LoRA r={config.policy.lora_rank}, train precision {config.train.mixed_precision},"
        f" {device}), {config.sampling.resolution}px",
        f"  dataset             : {d.dataset}: {n_pairs} pairs, {n_prompts} distinct prompts",
        f"  steps               : {d.steps} x {d.batch_size} pairs = {seen} pairs"
        f" ({seen / n_pairs:.2f} passes over the data), seed {config.seed}",
        f"  Diffusion-DPO       : beta {d.beta}, t ~ U[0, T), one noise per pair shared by chosen and rejected",
        f"  optimizer           : AdamW lr {t.learning_rate}, betas ({t.adam_beta1}, {t.adam_beta2}),"
        f" weight decay {t.adam_weight_decay}, grad clip {t.max_grad_norm}",
        f"  logging             : metrics every {d.log_every} steps",
        "=" * 72,
    ])


def run_offline_dpo(config: Config, *, output_dir: str | None = None, log=print) -> Path:
    """Runs offline Diffusion-DPO for ``config.dpo.steps`` steps; returns the run directory."""
    from actors.policy import Policy

    pairs = load_dataset(config)
    check_logging(config)
    torch.set_num_threads(config.cluster.torch_threads)
    try:
        pretrained = resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir)
    except ValueError as err:
        raise ConfigError(f"policy.pretrained: {err}") from None
    spec = policy_spec(config, pretrained=pretrained, num_gpus=1 if torch.cuda.is_available() else 0)
    # The trainer's precision is train.mixed_precision (no sampler here): bf16, or fp16 with loss scaling.
    spec = dataclasses.replace(spec, dtype=training_dtype(config.train.mixed_precision))
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("policy.device = 'cuda' but no CUDA device is visible; use policy.device=auto or cpu")
    run_dir = prepare_run_dir(config, output_dir)
    log(banner(config, run_dir=run_dir, device=spec.device, n_pairs=len(pairs),
               n_prompts=len({p.prompt for p in pairs})))
    policy = Policy(spec)
    if config.policy.init_adapter:
        try:
            policy.load_lora(config.policy.init_adapter)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    t = config.train
    trainer = OfflineDpoTrainer(
        policy=policy, pairs=pairs, beta=config.dpo.beta, learning_rate=t.learning_rate,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_weight_decay=t.adam_weight_decay,
        adam_eps=t.adam_eps, max_grad_norm=t.max_grad_norm, batch_size=config.dpo.batch_size, seed=config.seed,
        mixed_precision=t.mixed_precision,
    )
    writer = open_writer(config, run_dir=run_dir, resuming=False)

    def save_lora(steps: int) -> Path:  # the adapter, and the record of its base model (cluster/adapter_record.py)
        lora_dir = policy.save_lora(run_dir / "lora")
        for name, data in record_files(config, pretrained=pretrained, progress={"dpo_steps": steps}).items():
            (lora_dir / name).write_bytes(data)
        return lora_dir

    steps, every = config.dpo.steps, config.dpo.log_every
    window: list[dict[str, float]] = []
    first_mean = last_mean = None
    start = time.perf_counter()
    try:
        for step in range(steps):
            try:
                stats = trainer.step(step)
            except PreferenceDataError as err:  # an image whose header parsed but whose data does not decode
                raise ConfigError(f"dpo.dataset: {err}") from None
            window.append(stats)
            if stats["skipped_in_row"] >= t.max_skipped_steps:
                lora_dir = save_lora(step + 1)
                raise TrainingStalledError(
                    f"offline DPO: {int(stats['skipped_in_row'])} steps in a row (up to step {step + 1}) were skipped "
                    f"because the loss or the gradient norm was not finite (train.max_skipped_steps = "
                    f"{t.max_skipped_steps}, loss scale {stats['loss_scale']:g}); the adapter as of the last applied "
                    f"step is in {lora_dir}. Lower train.learning_rate or dpo.beta, or use train.mixed_precision=bf16")
            if (step + 1) % every == 0 or step + 1 == steps:
                means = window_means(window)
                row = {"step": step + 1, "dpo/loss": stats["loss"], "dpo/implicit_acc": stats["implicit_acc"],
                       "dpo/reward_margin": stats["reward_margin"], "train/grad_norm": stats["grad_norm"],
                       "train/loss_scale": stats["loss_scale"],
                       "train/skipped_steps": int(sum(r["skipped"] for r in window)),
                       **{f"dpo/{k}": v for k, v in means.items()}, "dpo/window_steps": len(window),
                       "time/step_s": sum(r["step_s"] for r in window) / len(window),
                       "time/elapsed_s": time.perf_counter() - start}
                writer.write(row)
                first_mean = first_mean or means
                last_mean = means
                log(f"step {step + 1:>5}/{steps}  loss {means['loss_mean']:.4f}  implicit_acc "
                    f"{means['implicit_acc_mean']:.3f}  reward_margin {means['reward_margin_mean']:+.3f}  grad_norm "
                    f"{means['grad_norm_mean']:.3f}  ({row['time/step_s']:.2f}s/step)")
                window = []
    finally:
        with warnings.catch_warnings():  # close() also plots the (here empty) reward curve
            warnings.simplefilter("ignore", UserWarning)
            writer.close()
    lora_dir = save_lora(steps)
    log(f"gard dpo: done: {steps} steps in {time.perf_counter() - start:.1f}s; loss {first_mean['loss_mean']:.4f} -> "
        f"{last_mean['loss_mean']:.4f}, implicit_acc {first_mean['implicit_acc_mean']:.3f} -> "
        f"{last_mean['implicit_acc_mean']:.3f} (first and last logging windows); LoRA -> {lora_dir}")
    return run_dir
