"""Every method against the shapes world's ground truth, on equal budgets of reward queries.

Each row trains the shipped shapes pipeline (``tiny:shapes``) from the same base config
(``configs/shapes_dpo.yaml``: the 4 prompts of ``configs/prompts/shapes_tune.txt``, the shapes reward
CLIP, online Diffusion-DPO) with one method's overrides, for as many epochs as the reward-query budget
allows (B² rollouts query n_branch leaves per prompt, so they get fewer epochs), and reads the run's last
evaluation: the judge's accuracy on the training prompts, on all seen and on all held-out prompts (and
per caption family), the CLIP score, diversity and CLIP Recall@1. The base model's row is the first
evaluation of the first method's runs (before any update; the same fixed evaluation seeds).

Seeds: run ``k`` uses ``seed=k`` and ``evaluation.seed=1234+k`` (fresh sampling noise and fresh
evaluation images per seed), so a row's spread covers both.

Every method can also run from another base config with evaluation sets of its own, such as ``make
demo``'s job (``--base-config configs/shapes_dpo_heldout.yaml --gain-set heldout``: trained on the 12
held-out prompts, the paired gain read on them).

Usage:
    python benchmarks/methods.py [--budget 2560] [--seeds 3] [--methods ddpo_is,gard_k2] [--out runs/methods]
    python benchmarks/methods.py --base-config configs/shapes_dpo_heldout.yaml --gain-set heldout --budget 1920 \
        --seeds 1 --out runs/methods_heldout
    python benchmarks/methods.py --methods ddpo_sf --seeds 1 --learning-rates 3e-4,1e-3   # a sweep's rows
    python benchmarks/methods.py --table runs/methods      # the markdown table of finished runs
Fusion rows (``FUSIONS``) train nothing: they fuse two rows' seed-0 adapters with ``gard fuse-lora`` and
evaluate the result with ``gard eval`` on the first input's evaluation set and seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "shapes_dpo.yaml"

# method -> (overrides of the base config, seeds it gets: "many" = --seeds, 1 = one)
# DDPO's settings: the ones measured on the training prompts (README, "The shapes world")
DDPO = ["train.algorithm=ppo", "train.learning_rate=3e-3", "train.clip_range=1e-2"]
# The shapes world's captioner in a vLLM engine inside the reward stage, scored by BERTScore against the prompt.
def _caption(weight: float) -> str:
    return (f"llava_bertscore: {{weight: {weight}, model: 'tiny:shapes-llava', bertscore_model: minilm, max_tokens: 12, "
            "gpu_memory_utilization: 0.15, dtype: float32, enforce_eager: true, serve: {num_cpus: 0.1}}")


CLIP = "clip_score: {weight: 1.0, model: 'tiny:shapes-clip', serve: {num_cpus: 0.25}}"
GARD_RAMP = ["volume.gamma=0.0", "volume.gamma_end=0.1", "volume.ramp_epochs=20"]
METHODS: dict[str, tuple[list[str], str | int]] = {
    "diffusion_dpo": ([], "many"),  # the base config's method: the denoising form on ranked pairs
    "ddpo_is": (DDPO, "many"),
    "ddpo_sf": ([*DDPO, "train.algorithm=pg"], 1),
    "dpok": ([*DDPO, "train.kl_beta=0.01"], 1),
    "gard_k2": ([*DDPO, *GARD_RAMP], "many"),
    # the same CLIP reward; the volume also spans the caption's embedding (the caption reward weighs 0)
    "gard_k3": ([*DDPO, *GARD_RAMP, "volume.modalities=[text, image, caption]", f"rewards={{{CLIP}, {_caption(0.0)}}}"], "many"),
    # DDPO on the caption reward alone; the CLIP score is still measured, as an evaluation reward
    "ddpo_caption": ([*DDPO, f"rewards={{{_caption(1.0)}}}",
                      "evaluation.rewards={shapes_judge: {mode: correct}, clip_score: {model: 'tiny:shapes-clip'}}"], 1),
    "b2": ([*DDPO, "b2.enabled=true", "b2.tau_start=7", "b2.tau_end=10", "b2.num_stages=4", "b2.n_branch=4",
            "sampling.batch_size=4"], "many"),
    "dpo_best_worst": (["train.algorithm=dpo"], 1),  # the trajectory form
    "dpo_dfusion": (["train.algorithm=dpo", "dpo.pair_source=dfusion"], 1),
    "rwr": (["train.algorithm=rwr"], 1),
    "texforce_te": ([*DDPO, "policy.train_targets=[text_encoder]"], 1),
    "texforce_unet_te": ([*DDPO, "policy.train_targets=[unet,text_encoder]"], 1),
}
# Rows that train nothing: the fusion (gard fuse-lora, exact) of two rows' seed-0 adapters, evaluated with
# gard eval on the first input's evaluation set and seeds; its base is that run's base.
FUSIONS = {"lora_fusion_clip_caption": (("ddpo_is", 0.5), ("ddpo_caption", 0.5))}
# The metric columns after the first, which is the judge's accuracy on the gain set (columns() below)
OTHER_COLUMNS = ["eval/gold_seen", "eval/gold_heldout", "eval/gold_heldout/single", "eval/gold_heldout/count",
                 "eval/gold_heldout/relation", "eval/clip_score", "eval/llava_bertscore", "eval/diversity/heldout",
                 "eval/recall_at_1/heldout"]


def columns(gain_set: str) -> list[str]:
    """The table's metric columns: the gain set's judge accuracy first, then OTHER_COLUMNS without it."""
    first = f"eval/gold_{gain_set}"
    return [first, *(c for c in OTHER_COLUMNS if c != first)]


COLUMNS = columns("tune")  # the default base config's: its training prompts are the set "tune"


def samples_per_epoch(overrides: list[str], *, base_config: Path = BASE_CONFIG) -> int:
    from cluster.config import load_config

    return load_config(base_config, overrides).samples_per_epoch


def run_name(method: str, learning_rate: float | None) -> str:
    """A row's name: the method, and the learning rate when the sweep overrides the method's own."""
    return method if learning_rate is None else f"{method}@lr{learning_rate:g}"


def run_one(method: str, seed: int, *, budget: int, out: Path, learning_rate: float | None = None,
            base_config: Path = BASE_CONFIG) -> Path:
    """Trains one (method, seed[, learning rate]) from ``base_config`` with ``gard train`` in a subprocess;
    returns its run directory."""
    overrides = METHODS[method][0] + [f"seed={seed}", f"evaluation.seed={1234 + seed}", "logging.progress=false"]
    if learning_rate is not None:
        overrides.append(f"train.learning_rate={learning_rate:g}")
    epochs = max(1, budget // samples_per_epoch(overrides, base_config=base_config))
    run_dir = out / f"{run_name(method, learning_rate)}-s{seed}"
    if (run_dir / "lora").exists():
        return run_dir  # finished earlier: the table reads it again
    start = time.time()
    cmd = [sys.executable, "-m", "cluster", "train", str(base_config), "--output-dir", str(run_dir),
           "--resume", "auto", f"epochs={epochs}", *overrides]
    print(f"[methods] {run_dir.name}: {epochs} epochs", flush=True)
    with open(out / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    (run_dir / "wall_s.txt").write_text(f"{time.time() - start:.1f}\n")
    return run_dir


def fuse_one(name: str, *, out: Path) -> Path:
    """The fusion row ``name``: fuses its inputs' seed-0 adapters into ``out/<name>-s0/lora`` and evaluates
    it with the first input's config (``eval_metrics.json``); returns the directory."""
    inputs = FUSIONS[name]
    run_dir = out / f"{name}-s0"
    if (run_dir / "eval_metrics.json").exists():
        return run_dir
    sources = [out / f"{method}-s0" for method, _ in inputs]
    for source in sources:
        if not (source / "lora").exists():
            raise SystemExit(f"[methods] {name} fuses {source.name}, which has not finished: run its method first")
    gard = [sys.executable, "-m", "cluster"]
    fused_rank = sum(yaml.safe_load((source / "config.yaml").read_text())["policy"]["lora_rank"] for source in sources)
    # exact fusion: the fused rank is the sum of the inputs' ranks, alpha = rank keeps their scale of 1
    subprocess.run([*gard, "fuse-lora", *(f"{src / 'lora'}:{w}" for src, (_, w) in zip(sources, inputs, strict=True)),
                    "--out", str(run_dir / "lora"), "--overwrite"], check=True, cwd=REPO)
    subprocess.run([*gard, "eval", str(run_dir / "lora"), "--config", str(sources[0] / "config.yaml"),
                    "--output-dir", str(run_dir / "eval"), "--overwrite", f"policy.lora_rank={fused_rank}",
                    f"policy.lora_alpha={fused_rank}"], check=True, cwd=REPO)
    (run_dir / "eval_metrics.json").write_text((run_dir / "eval" / "eval_metrics.json").read_text())
    (run_dir / "fusion.json").write_text(json.dumps({"inputs": [src.name for src in sources]}))
    return run_dir


def read_run(run_dir: Path, *, metric_columns: list[str] = COLUMNS) -> dict:
    """The last evaluation's metrics, the first row's ``_initial`` ones (the base model), the reward
    queries and the wall time of one finished run (a fusion row: its evaluation, its first input's base,
    and the reward queries of all its inputs)."""
    if (run_dir / "fusion.json").exists():
        inputs = [read_run(run_dir.parent / name, metric_columns=metric_columns)
                  for name in json.loads((run_dir / "fusion.json").read_text())["inputs"]]
        metrics = json.loads((run_dir / "eval_metrics.json").read_text())["metrics"]
        return {"final": {k: metrics.get(k) for k in metric_columns}, "base": inputs[0]["base"],
                "reward_queries": sum(r["reward_queries"] for r in inputs), "wall_s": None}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next(row for row in reversed(rows) if "eval/gold_seen" in row)
    initial = {k[: -len("_initial")]: v for k, v in rows[0].items() if k.endswith("_initial")}
    wall = run_dir / "wall_s.txt"
    return {"final": {k: last.get(k) for k in metric_columns}, "base": {k: initial.get(k) for k in metric_columns},
            "reward_queries": int(sum(row.get("reward/n_scored", 0) for row in rows)),
            "wall_s": float(wall.read_text()) if wall.exists() else None}


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def table(out: Path, *, gain_set: str = "tune") -> str:
    """Markdown: one row per method (mean ± std over its seeds), the base row first; the paired gain is
    read on the evaluation set ``gain_set`` (the training prompts)."""
    metric_columns = columns(gain_set)
    runs: dict[str, list[dict]] = {}
    order = {method: i for i, method in enumerate([*METHODS, *FUSIONS])}

    def row_of(run_dir: Path) -> str:  # "ddpo_is" or "ddpo_is@lr0.001"
        return run_dir.name.rsplit("-s", 1)[0]

    for run_dir in sorted(out.glob("*-s*"), key=lambda d: (order.get(row_of(d).split("@")[0], 99), row_of(d), d.name)):
        if run_dir.is_dir() and (run_dir / "lora").exists():
            runs.setdefault(row_of(run_dir), []).append(read_run(run_dir, metric_columns=metric_columns))
    # The gain on the training prompts, paired within each run (its last evaluation minus its own evaluation
    # before training): a method that changes sampling.batch_size (B²) changes the evaluation chunks and so
    # the evaluation images, so its base differs from the base row's.
    def gain(r: dict) -> float | None:
        after, before = r["final"].get(metric_columns[0]), r["base"].get(metric_columns[0])
        return None if after is None or before is None else after - before

    header = ["method", "seeds", f"gold_{gain_set} gain (paired)", *(c.removeprefix("eval/") for c in metric_columns),
              "reward queries", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    if runs:
        base = next(iter(runs.values()))
        lines.append("| base | " + " | ".join([str(len(base)), "0", *(_mean_std([r["base"][c] for r in base])
                                                                           for c in metric_columns),
                                                 "0", "–"]) + " |")
    for method, results in runs.items():
        cells = [_mean_std([gain(r) for r in results]),
                 *(_mean_std([r["final"][c] for r in results]) for c in metric_columns)]
        walls = [r["wall_s"] for r in results if r["wall_s"] is not None]
        wall = f"{sum(walls) / len(walls):.0f}" if walls else "–"
        lines.append(f"| {method} | {len(results)} | " + " | ".join(cells)
                     + f" | {results[0]['reward_queries']} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=2560, help="reward queries per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the rows marked 'many'")
    parser.add_argument("--methods", default=",".join([*METHODS, *FUSIONS]),
                        help=f"comma-separated, out of {[*METHODS, *FUSIONS]} (a fusion after the rows it fuses)")
    parser.add_argument("--learning-rates", default="",
                        help="comma-separated learning rates to sweep, each a row of its own (default: each "
                             "method's own); sweep on the training prompts' gold, never on the held-out ones")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "methods")
    parser.add_argument("--table", type=Path, help="only print the table of the runs under this directory")
    parser.add_argument("--base-config", type=Path, default=BASE_CONFIG,
                        help="the config every method's overrides apply to (default: configs/shapes_dpo.yaml)")
    parser.add_argument("--gain-set", default="tune",
                        help="the evaluation set the paired gain is read on: the base config's training prompts "
                             "(tune for the default; heldout for configs/shapes_dpo_heldout.yaml)")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(args.table, gain_set=args.gain_set))
        return 0
    from cluster.config import load_config

    base = load_config(args.base_config)  # a config error here names the field, before any run starts
    if args.gain_set not in base.evaluation.prompts:
        parser.error(f"--gain-set: {args.gain_set!r} is not an evaluation set of {args.base_config}; "
                     f"expected one of {sorted(base.evaluation.prompts)}")
    unknown = [m for m in args.methods.split(",") if m not in METHODS and m not in FUSIONS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; valid: {[*METHODS, *FUSIONS]}")
    try:
        rates = [float(x) for x in args.learning_rates.split(",") if x.strip()] or [None]
    except ValueError:
        parser.error(f"--learning-rates: expected comma-separated numbers, got {args.learning_rates!r}")
    if any(r is not None and not (math.isfinite(r) and r > 0) for r in rates):
        parser.error(f"--learning-rates: expected positive finite numbers, got {args.learning_rates!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        if method in FUSIONS:  # after the rows it fuses (list them first in --methods)
            fuse_one(method, out=args.out)
            continue
        seeds = args.seeds if METHODS[method][1] == "many" else METHODS[method][1]
        for rate in rates:
            for seed in range(seeds):
                run_one(method, seed, budget=args.budget, out=args.out, learning_rate=rate,
                        base_config=args.base_config)
    print(table(args.out, gain_set=args.gain_set))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
