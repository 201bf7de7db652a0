"""Several runs' gold gains side by side (``gard compare RUN [RUN ...]``).

One run's gain says little on its own: on the shapes world a change of seed, or of the last bits of the
rewards, moves a run's gain by several of its standard errors. The measure of a method is the spread of
its gains over seeds, and whether it forgets the prompts it never trained on. For each run this reads
the first evaluation (the base model) and the newest (or the one after ``updates`` optimizer steps) from
``samples/eval_epochNNNN.json``, and its training prompts and gold reward from its ``config.yaml``; then
per evaluation set, and per part of a set where the set mixes prompts the run trained on ("trained") with
prompts it did not ("other"), it gives:

- each run's gain paired image by image, mean(d) ± std(d, ddof=1) / sqrt(n) with d_i = after_i − before_i
  (``cluster/eval_summary.py``);
- over the runs, the mean of the gains and their standard deviation (ddof = 1), the seed-to-seed spread
  that one run's standard error does not show.

Runs evaluated on other images (another evaluation seed or set) can be compared too; the table says
whether the base verdicts agree, i.e. whether every gain is paired against the same base images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cluster.config_loader import prompt_lines
from cluster.eval_summary import SetSummary, paired_summary


class CompareError(ValueError):
    """A run directory that cannot be compared: the message names it and what was expected."""


@dataclass(frozen=True)
class RunEvaluation:
    """One run's base evaluation and a later one (the items of ``samples/eval_epochNNNN.json``); ``updates``
    is None where the later one is a ``gard eval`` output paired against the run's base."""

    name: str
    before: list[dict]
    after: list[dict]
    updates: int | None
    gold: str
    train_prompts: frozenset[str]


def _run_record(run_dir: Path) -> tuple[dict, str, dict[int, Path]]:
    """A run directory's config.yaml, its gold reward, and its evaluation files by updates applied."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        hint = (" It is a gard eval output: name, with --base, the run whose evaluation before training it is "
                "paired against" if (run_dir / "eval_metrics.json").is_file() else "")
        raise CompareError(f"{str(run_dir)!r} is not a run directory: it has no config.yaml (expected the "
                           f"directory gard train wrote).{hint}")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    gold = (config.get("evaluation") or {}).get("gold")
    if not gold:
        raise CompareError(f"{str(run_dir)!r}: its config.yaml names no evaluation.gold reward, so its "
                           f"evaluations have no gold verdict to compare")
    found = {int(f.stem.removeprefix("eval_epoch")): f for f in (run_dir / "samples").glob("eval_epoch*.json")}
    return config, gold, found


def _train_prompts(config: dict, split_prompts: list[str] | None) -> frozenset[str]:
    return frozenset(((config.get("prompts") or {}).get("train") or []) if split_prompts is None else split_prompts)


def load_run(run_dir: Path, *, updates: int | None = None, split_prompts: list[str] | None = None) -> RunEvaluation:
    """The run's evaluation before training and its newest one (or the one after ``updates`` steps).
    ``split_prompts``: the prompts that count as "trained" in place of the run's own training prompts,
    so that runs trained on different prompts are split into the same parts."""
    run_dir = Path(run_dir)
    config, gold, found = _run_record(run_dir)
    later = sorted(k for k in found if k > 0)
    if 0 not in found or not later:
        raise CompareError(f"{str(run_dir)!r} holds evaluations after {sorted(found)} updates; a comparison "
                           f"needs the one before training (0) and at least one after it")
    chosen = later[-1] if updates is None else updates
    if chosen not in later:
        raise CompareError(f"{str(run_dir)!r} has no evaluation after {updates} updates; it has {later}")
    before, after = (json.loads(found[k].read_text()) for k in (0, chosen))
    try:
        paired_summary(before, after, gold=gold)  # the same images in the same order on both sides
    except ValueError as err:
        raise CompareError(f"{str(run_dir)!r}, evaluations after 0 and {chosen} updates: {err}") from None
    return RunEvaluation(name=run_dir.name, before=before, after=after, updates=chosen, gold=gold,
                         train_prompts=_train_prompts(config, split_prompts))


# The evaluation fields that fix which images an evaluation draws: a `gard eval` output and a run's base
# evaluation are paired image by image only when these, and the pretrained model, are the same.
_SAME_IMAGES = ("seed", "images_per_prompt", "batch_size", "prompts", "gold")


def load_eval_output(eval_dir: Path, *, base_run: Path, split_prompts: list[str] | None = None) -> RunEvaluation:
    """An adapter's ``gard eval`` output (``eval_metrics.json`` and ``eval.json``: a fused or exported LoRA
    has no run directory) as the "after" side, paired against ``base_run``'s evaluation before training,
    which must draw the same images: the same pretrained model and evaluation seed, prompts, images per
    prompt and batch size. The run's training prompts stand for the "trained" part, unless ``split_prompts``."""
    eval_dir, base_run = Path(eval_dir), Path(base_run)
    try:
        record = json.loads((eval_dir / "eval_metrics.json").read_text(encoding="utf-8"))
        after = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
        evaluation, pretrained = record["evaluation"], record["pretrained"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompareError(f"{str(eval_dir)!r}: not a readable gard eval output ({type(err).__name__}: {err}); "
                           f"expected the --output-dir of gard eval, holding eval_metrics.json and eval.json") from None
    config, gold, found = _run_record(base_run)
    if 0 not in found:
        raise CompareError(f"{str(base_run)!r} holds evaluations after {sorted(found)} updates; a comparison "
                           f"needs the one before training (0)")
    base_evaluation, base_pretrained = config.get("evaluation") or {}, (config.get("policy") or {}).get("pretrained")
    differ = [f"evaluation.{f} {evaluation.get(f)!r} against {base_evaluation.get(f)!r}" if f != "prompts"
              else "the evaluation prompts" for f in _SAME_IMAGES if evaluation.get(f) != base_evaluation.get(f)]
    if pretrained != base_pretrained:
        differ.append(f"pretrained {pretrained!r} against {base_pretrained!r}")
    if differ:
        raise CompareError(f"{str(eval_dir)!r} cannot be paired with the base evaluation of {str(base_run)!r}: "
                           f"they differ in {', '.join(differ)}. Name as --base a run evaluated on the same "
                           f"images (run gard eval with that run's config.yaml)")
    before = json.loads(found[0].read_text())
    try:
        paired_summary(before, after, gold=gold)
    except ValueError as err:
        raise CompareError(f"{str(eval_dir)!r} against the base evaluation of {str(base_run)!r}: {err}") from None
    return RunEvaluation(name=eval_dir.name if eval_dir.name != "eval" else eval_dir.parent.name,
                         before=before, after=after, updates=None, gold=gold,
                         train_prompts=_train_prompts(config, split_prompts))


def read_prompt_list(path: Path) -> list[str]:
    """The prompts of a prompt file, read as the config loader reads one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CompareError(f"--split-by {str(path)!r}: cannot be read as a UTF-8 prompt file ({err})") from None
    prompts = prompt_lines(text)
    if not prompts:
        raise CompareError(f"--split-by {str(path)!r} holds no prompts (one prompt per line expected)")
    return prompts


def _parts(run: RunEvaluation, *, by_prompt: bool) -> dict[str, tuple[list[dict], list[dict], str | None]]:
    """{row label: (before items, after items, the prompt of a prompt's row else None)}, per set in
    first-seen order: the set; its trained and its other prompts (the parts that hold any); with
    ``by_prompt`` each prompt, as "<set> / <prompt>"."""
    sets: dict[str, dict[str, tuple[list[dict], list[dict], str | None]]] = {}
    for b, a in zip(run.before, run.after, strict=True):
        name = b.get("set", "all")
        trained = b["prompt"] in run.train_prompts
        rows = sets.setdefault(name, {label: ([], [], None) for label in (name, f"{name} [trained]", f"{name} [other]")})
        labels = [(name, None), (f"{name} [{'trained' if trained else 'other'}]", None)]
        if by_prompt:
            labels.append((f"{name} / {b['prompt']}", b["prompt"]))
        for label, prompt in labels:
            rows.setdefault(label, ([], [], prompt))
            rows[label][0].append(b)
            rows[label][1].append(a)
    return {label: items for rows in sets.values() for label, items in rows.items() if items[0]}


def _summary(label: str, before: list[dict], after: list[dict], gold: str) -> SetSummary:
    relabelled = [[{**item, "set": label} for item in side] for side in (before, after)]
    return paired_summary(*relabelled, gold=gold)[label]


@dataclass(frozen=True)
class ComparedRow:
    """One row of the comparison: its images and base accuracy over the runs that have it (min, max: they
    differ where the runs' training prompts split a set differently), each run's paired gain (None where
    the run has no such row), and the mean and standard deviation of the gains over the runs that have it."""

    label: str
    n: tuple[int, int]
    base: tuple[float, float]
    gains: list[SetSummary | None]
    mean_gain: float
    std_gain: float


def compare_runs(runs: list[RunEvaluation], *, by_prompt: bool = False) -> tuple[list[ComparedRow], bool]:
    """(rows in first-seen order, whether every run's base evaluation is the same images with the same
    verdicts)."""
    if not runs:
        raise CompareError("no run to compare: name one or more run directories")
    golds = {run.gold for run in runs}
    if len(golds) > 1:
        raise CompareError(f"the runs' gold rewards differ ({sorted(golds)}); their verdicts are not comparable")
    per_run, prompt_of = [], {}
    for run in runs:
        parts = _parts(run, by_prompt=by_prompt)
        per_run.append({label: _summary(label, before, after, run.gold) for label, (before, after, _) in parts.items()})
        prompt_of.update({label: prompt for label, (_, _, prompt) in parts.items() if prompt is not None})
    # A set's [trained] / [other] rows are shown when some run trained on part of it (for a run that trained
    # on none of it, "[other]" is the whole set, so runs with other training prompts stay comparable).
    mixed = {label.removesuffix(" [trained]") for summaries in per_run for label in summaries
             if label.endswith(" [trained]") and label.replace("[trained]", "[other]") in summaries}
    labels = [label for label in dict.fromkeys(label for summaries in per_run for label in summaries)
              if not label.endswith((" [trained]", " [other]")) or label.rsplit(" [", 1)[0] in mixed]
    rows = []
    for label in labels:
        gains = [summaries.get(label) for summaries in per_run]
        if label in prompt_of:  # a prompt's row says whether the runs that have it trained on it
            trained = [prompt_of[label] in run.train_prompts for run, g in zip(runs, gains, strict=True) if g is not None]
            label += " (trained)" if all(trained) else " (trained by some)" if any(trained) else ""
        present = [g.gain for g in gains if g is not None]
        ns, bases = [g.n for g in gains if g is not None], [g.before for g in gains if g is not None]
        rows.append(ComparedRow(label=label, n=(min(ns), max(ns)), base=(min(bases), max(bases)), gains=gains,
                                mean_gain=float(np.mean(present)),
                                std_gain=float(np.std(present, ddof=1)) if len(present) >= 2 else math.nan))
    base_keys = [[(i.get("set"), i["prompt"], i.get("gold", {}).get(run.gold)) for i in run.before] for run in runs]
    return rows, all(keys == base_keys[0] for keys in base_keys[1:])


def _cell(value: float, spread: float) -> str:
    return f"{value:+.3f}" if math.isnan(spread) else f"{value:+.3f} ± {spread:.3f}"


def comparison_table(runs: list[RunEvaluation], rows: list[ComparedRow], *, same_base: bool,
                     split_by: str | None = None) -> str:
    """A markdown table: base accuracy, each run's gain ± its paired s.e., the mean ± std over runs.
    ``split_by``: the file whose prompts stood for the runs' training prompts, if any."""
    head = ["evaluation set", "images", "base",
            *(f"{r.name} ({'gard eval' if r.updates is None else f'after {r.updates}'})" for r in runs),
            "mean ± std over runs"]
    parts = (f"the set's prompts listed in {split_by} / the others" if split_by
             else "the set's prompts the run trained on / did not")
    lines = [f"gold: {runs[0].gold}; gain paired image by image ± its s.e.; \"[trained]\" / \"[other]\": {parts}",
             "every run's base evaluation is the same images with the same verdicts" if same_base else
             "the runs' base evaluations differ (another evaluation seed or set): each gain is paired within its run",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        n = str(row.n[0]) if row.n[0] == row.n[1] else f"{row.n[0]}-{row.n[1]}"
        base = f"{row.base[0]:.3f}" if row.base[0] == row.base[1] else f"{row.base[0]:.3f}-{row.base[1]:.3f}"
        cells = [row.label, n, base,
                 *("–" if g is None else _cell(g.gain, g.gain_se) for g in row.gains),
                 _cell(row.mean_gain, row.std_gain)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_json(runs: list[RunEvaluation], rows: list[ComparedRow], *, same_base: bool) -> dict:
    return {"gold": runs[0].gold, "same_base": same_base,
            "runs": [{"name": r.name, "updates": r.updates} for r in runs],
            "rows": [{"label": row.label, "n": list(row.n), "base": list(row.base), "mean_gain": row.mean_gain,
                      "std_gain": None if math.isnan(row.std_gain) else row.std_gain,
                      "gains": [None if g is None else {"gain": g.gain, "se": g.gain_se, "n": g.n} for g in row.gains]}
                     for row in rows]}
