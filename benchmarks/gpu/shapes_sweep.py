"""A sweep of shapes-world runs on one accelerator: variants of a config trained side by side, judged by the ground truth.

Each variant is one ``shapes_on_device.py`` process (the plain Sampler, Learner and RewardStage, no Ray)
with its own config overrides, all started together on the same device: the tiny models are bound by
kernel-launch latency, so one GPU runs many of them at once at nearly the speed of one. Every variant
evaluates the same fixed-seed images (the config's ``evaluation`` section, by default the *validation
draw*: ``evaluation.seed=777``, 64 images per prompt, never the demo's evaluation images, so nothing is
chosen on the images a result is reported on) before training and after every ``--eval-every`` epochs.

At ``--deadline-s`` the variants still running are stopped; what they evaluated so far is kept (each run
saves its curve after every evaluation). Writes ``sweep.json`` (every variant's curve and epochs) and
``sweep.md`` (a table of each set's paired gain ± s.e. after every evaluation) into ``--out``.

Usage: python benchmarks/gpu/shapes_sweep.py --device cuda --out OUT [--variants FILE.json] [overrides]
FILE.json: {"name": ["key=value", ...], ...}; without it, ``DDPO_VARIANTS``.
``--report SWEEP.json ...`` reads finished sweeps instead and prints one row per variant and evaluation
point: the held-out gain's mean ± std over the seeds that ran it (variants are the same when their
config and their overrides other than ``seed=`` are), each seed's gain, and the seen set's mean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "benchmarks" / "gpu" / "shapes_on_device.py"
DDPO_CONFIG = REPO / "configs" / "shapes_ddpo_heldout.yaml"
# The validation draw of the 12 held-out prompts, and the seen prompts to watch forgetting.
VALIDATION = ["evaluation.seed=777", "evaluation.images_per_prompt=64",
              "evaluation.prompt_files={heldout: prompts/shapes_heldout.txt, seen: prompts/shapes_seen.txt}"]

# Larger batches than the CPU presets' (same samples per epoch, same gradient): on a GPU the tiny models
# cost per kernel launch, not per image. Changes which seeds each image gets, the same for every variant.
GPU_LAYOUT = ["sampling.batch_size=128", "sampling.batches_per_sampler=1", "evaluation.batch_size=128",
              "train.micro_batch_size=640"]

# DDPO (PPO on the reward CLIP, configs/shapes_ddpo_heldout.yaml) around the preset, one knob at a time.
# Why each: the preset moves the held-out set by a quarter of Diffusion-DPO's gain ("DDPO with 256 samples
# per epoch" in BENCHMARKS.md), and its 64-sample gradient steps are mostly noise ("Gradient noise").
DDPO_VARIANTS: dict[str, list[str]] = {
    "preset_s0": [],
    "preset_s1": ["seed=1"],
    "preset_s2": ["seed=2"],
    "lr_1e-2": ["train.learning_rate=1e-2"],
    "lr_1e-3": ["train.learning_rate=1e-3"],
    "clip_1e-1": ["train.clip_range=1e-1"],  # almost unclipped: is PPO's clip what holds the update back?
    "one_step_lr_1e-2": ["train.updates_per_epoch=1", "train.learning_rate=1e-2"],  # one 256-sample step
    "two_steps": ["train.updates_per_epoch=2"],
    "adv_batch": ["train.advantage=batch"],
    "adv_per_group": ["train.advantage=per_group"],  # Flow-GRPO's: the prompt's samples of this epoch
    "stat_buffer_32": ["train.stat_buffer_size=32"],
    # 512 samples per epoch, half their steps trained: the same training cost (sizes as in GPU_LAYOUT)
    "half_steps_512": ["train.timestep_fraction=0.5", "sampling.batches_per_sampler=2"],
    "kl_0.1": ["train.kl_beta=0.1"],  # DPOK
    "inner_2_128": ["train.inner_epochs=2", "sampling.batch_size=64"],  # each sample twice, same training cost
}


def load_variants(path: Path | None) -> dict[str, list[str]]:
    """``{name: [override, ...]}`` from a JSON file (or the built-in DDPO grid); a malformed one is refused."""
    if path is None:
        return dict(DDPO_VARIANTS)
    variants = json.loads(Path(path).read_text())
    if not isinstance(variants, dict) or not variants:
        raise SystemExit(f"shapes_sweep: {path} must hold a non-empty JSON object {{name: [override, ...]}}")
    for name, overrides in variants.items():
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise SystemExit(f"shapes_sweep: variant name {name!r} in {path}: letters, digits, '_', '-', '.' only")
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise SystemExit(f"shapes_sweep: variant {name!r} in {path}: expected a list of 'key=value' strings, "
                             f"got {overrides!r}")
    return variants


def read_run(run_dir: Path) -> dict:
    """One variant's result: the finished JSON, else the partial one its run saved after each epoch."""
    for name in ("shapes_on_device.json", "epochs.json"):
        if (run_dir / name).exists():
            result = json.loads((run_dir / name).read_text())
            result.setdefault("done", name == "shapes_on_device.json")
            return result
    return {"curve": [], "epochs": [], "done": False}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per variant and evaluation point: each set's paired gain ± s.e., the last training reward."""
    sets = list(dict.fromkeys(n for r in results.values() for point in r["curve"] for n in point["gains"]))
    lines = ["| variant | epochs | " + " | ".join(sets) + " | reward, last epoch | s / epoch | finished |",
             "| --- | --- | " + " | ".join("---" for _ in sets) + " | --- | --- | --- |"]
    for name, result in results.items():
        epochs = result["epochs"]
        reward = f"{epochs[-1]['reward_mean']:.4f}" if epochs else "–"
        seconds = f"{sum(e['seconds'] for e in epochs) / len(epochs):.1f}" if epochs else "–"
        for point in result["curve"] or [{"epochs": 0, "gains": {}}]:
            cells = [f"{point['gains'][s]['gain']:+.3f} ± {point['gains'][s]['se']:.3f}" if s in point["gains"]
                     else "–" for s in sets]
            lines.append(f"| {name} | {point['epochs']} | " + " | ".join(cells)
                         + f" | {reward} | {seconds} | {'yes' if result['done'] else 'no'} |")
    return "\n".join(lines) + "\n"


def run_sweep(*, variants: dict[str, list[str]], config: Path, device: str, out: Path, eval_every: int,
              common: list[str], deadline_s: float) -> dict[str, dict]:
    """Start every variant at once; stop what still runs at the deadline; return each variant's result."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = {}
    for name, overrides in variants.items():
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(RUNNER), "--device", device, "--config", str(config), "--out", str(run_dir),
                   "--eval-every", str(eval_every), *common, *overrides]
        (run_dir / "command.txt").write_text(" ".join(command) + "\n")
        log = (run_dir / "log.txt").open("w")
        procs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log)
    started = time.monotonic()
    while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() - started < deadline_s:
        time.sleep(2.0)
    stopped = set()
    for name, (proc, log) in procs.items():
        if proc.poll() is None:  # past the deadline: keep what it evaluated so far
            stopped.add(name)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    results = {}
    for name, (proc, _) in procs.items():
        result = read_run(out / name)
        result["returncode"] = proc.returncode
        result["stopped_at_deadline"] = name in stopped
        result["overrides"] = variants[name]
        results[name] = result
    return results


def failed_variants(results: dict[str, dict]) -> list[str]:
    """The variants that exited non-zero by themselves: a crash after some evaluations is still a failure
    (its partial curve stays in the results); a variant the deadline stopped is not."""
    return [name for name, r in results.items() if r["returncode"] != 0 and not r.get("stopped_at_deadline")]


def by_seed(sweeps: list[dict]) -> dict[tuple[str, ...], dict[int, dict]]:
    """Every run of the sweeps, keyed by its config's name and its overrides without ``seed=``, then by its
    seed (default 0)."""
    grouped: dict[tuple[str, ...], dict[int, dict]] = {}
    for sweep in sweeps:
        config = Path(sweep.get("config", "")).stem
        for result in sweep["variants"].values():
            seeds = [int(o.split("=", 1)[1]) for o in result["overrides"] if o.startswith("seed=")]
            key = (config, *sorted(o for o in result["overrides"] if not o.startswith("seed=")))
            grouped.setdefault(key, {})[seeds[-1] if seeds else 0] = result
    return grouped


def seed_table(sweeps: list[dict], *, gain_set: str = "heldout", other_set: str = "seen") -> str:
    """Per variant and evaluation point: ``gain_set``'s gain mean ± std over seeds (ddof 1), each seed's, and
    ``other_set``'s mean gain."""
    lines = [f"| config | overrides | seeds | epochs | {gain_set}: mean ± std over seeds | each seed | "
             f"{other_set}: mean |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (config, *overrides), runs in by_seed(sweeps).items():
        points: dict[int, list[tuple[float, float]]] = {}
        for _, result in sorted(runs.items()):
            for point in result["curve"]:
                gains = point["gains"]
                points.setdefault(point["epochs"], []).append(
                    (gains[gain_set]["gain"], gains[other_set]["gain"] if other_set in gains else float("nan")))
        for epochs, values in sorted(points.items()):
            gain = np.array([v[0] for v in values])
            spread = f" ± {gain.std(ddof=1):.3f}" if len(gain) > 1 else ""
            lines.append(f"| {config} | {' '.join(overrides) or '–'} | {len(gain)} | {epochs} | "
                         f"{gain.mean():+.3f}{spread} | " + " / ".join(f"{g:+.3f}" for g in gain)
                         + f" | {np.mean([v[1] for v in values]):+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config", type=Path, default=DDPO_CONFIG)
    parser.add_argument("--variants", type=Path, default=None, help="JSON {name: [override, ...]}")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="the sweep's directory (required unless --report)")
    parser.add_argument("--report", type=Path, nargs="+", default=None, help="finished sweep.json files to tabulate")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=480.0)
    parser.add_argument("--preset-layout", action="store_true",
                        help="keep the config's batch sizes (default: GPU_LAYOUT's larger ones)")
    parser.add_argument("--no-validation-draw", action="store_true",
                        help="evaluate the config's own evaluation images instead of the validation draw")
    parser.add_argument("overrides", nargs="*", help="overrides for every variant, key=value")
    args = parser.parse_args(argv)
    if args.report:
        print(seed_table([json.loads(Path(f).read_text()) for f in args.report]), end="")
        return 0
    if args.out is None:
        parser.error("--out is required to run a sweep")
    variants = load_variants(args.variants)
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in variants]
        if unknown:
            raise SystemExit(f"shapes_sweep: --only names {unknown}, not variants; valid: {sorted(variants)}")
        variants = {n: variants[n] for n in wanted}
    common = (([] if args.preset_layout else GPU_LAYOUT) + ([] if args.no_validation_draw else VALIDATION)
              + args.overrides)
    config = args.config.resolve()
    started = time.perf_counter()
    results = run_sweep(variants=variants, config=config, device=args.device, out=args.out,
                        eval_every=args.eval_every, common=common, deadline_s=args.deadline_s)
    table = markdown_table(results)
    print(table, flush=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
               # named from the repository root: the results say nothing of the machine
               "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else config.name,
               "common": common, "wall_s": time.perf_counter() - started, "variants": results}
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=1))
    (args.out / "sweep.md").write_text(table)
    failed = failed_variants(results)
    for name in failed:
        print(f"{name} failed (exit {results[name]['returncode']}); last lines of its log:\n"
              + "\n".join((args.out / name / "log.txt").read_text().splitlines()[-15:]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
