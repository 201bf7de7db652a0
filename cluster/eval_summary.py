"""A run's gold result in a few lines: per evaluation set, the gold reward before training and after the
last evaluation, each with its standard error, and the gain paired image by image.

The evaluation images have fixed seeds, so image i after training is drawn from the same noise as image i
before it: the gain's standard error is that of the per-image differences d_i = after_i - before_i,
std(d, ddof=1) / sqrt(n), smaller than the two means' errors combined when the verdicts are correlated.
Pure functions of the ``samples/eval_epochNNNN.json`` items (``cluster/evaluation.py``: each image's set,
prompt and gold scores), plus the file-level wrapper the driver calls when a run ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.best_adapter import BEST_DIR, best_record
from cluster.eval_metrics import mean_and_se

SUMMARY_FILE = "eval_summary.json"


@dataclass(frozen=True)
class SetSummary:
    """One evaluation set's gold reward: before (the base model) and after, means ± standard errors, and
    the paired gain over its n images."""

    n: int
    before: float
    before_se: float
    after: float
    after_se: float
    gain: float
    gain_se: float


def paired_summary(before: list[dict], after: list[dict], *, gold: str) -> dict[str, SetSummary]:
    """{set: SetSummary} from two evaluations' items (the same images in the same order: set and prompt
    must match item by item) and the gold reward's name; images a reward could not score (None) are left
    out of both sides."""
    if len(before) != len(after):
        raise ValueError(f"the two evaluations hold {len(before)} and {len(after)} images; a paired summary "
                         f"needs the same fixed-seed evaluation set on both sides")
    pairs: dict[str, list[tuple[float, float]]] = {}
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if (b.get("set"), b["prompt"]) != (a.get("set"), a["prompt"]):
            raise ValueError(f"evaluation image {i} is ({b.get('set')!r}, {b['prompt']!r}) before and "
                             f"({a.get('set')!r}, {a['prompt']!r}) after; the two evaluations are not the same set")
        scores = (b.get("gold", {}).get(gold), a.get("gold", {}).get(gold))
        if None not in scores:
            pairs.setdefault(b.get("set", "all"), []).append(scores)
    out = {}
    for name, values in pairs.items():
        (before_mean, before_se), (after_mean, after_se) = (mean_and_se([v[k] for v in values]) for k in (0, 1))
        gain, gain_se = mean_and_se([a - b for b, a in values])
        out[name] = SetSummary(n=len(values), before=before_mean, before_se=before_se, after=after_mean,
                               after_se=after_se, gain=gain, gain_se=gain_se)
    return out


def summary_lines(summary: dict[str, SetSummary], *, gold: str, updates: int) -> list[str]:
    """Human-readable lines, one per set."""
    lines = [f"gold ({gold}) before training -> after {updates} updates, paired over the same fixed-seed images:"]
    for name, s in summary.items():
        lines.append(f"  {name:10s} {s.before:.3f} ± {s.before_se:.3f} -> {s.after:.3f} ± {s.after_se:.3f}   "
                     f"gain {s.gain:+.3f} ± {s.gain_se:.3f} (n = {s.n})")
    return lines


def summarise_run(run_dir: Path, *, gold: str) -> list[str]:
    """Writes ``eval_summary.json`` (the first evaluation against the newest) into ``run_dir`` and returns
    its lines; no lines when the run has fewer than two evaluations."""
    by_updates = {int(f.stem.removeprefix("eval_epoch")): f for f in (Path(run_dir) / "samples").glob("eval_epoch*.json")}
    updates = max(by_updates, default=0)  # by number: 10000 after 9999
    if 0 not in by_updates or updates == 0:
        return []
    summary = paired_summary(json.loads(by_updates[0].read_text()), json.loads(by_updates[updates].read_text()), gold=gold)
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(
        {"gold": gold, "updates": updates, "sets": {name: asdict(s) for name, s in summary.items()}}, indent=1))
    lines = summary_lines(summary, gold=gold, updates=updates)
    if (best := best_record(run_dir)) is not None:  # evaluation.keep_best
        lines.append(f"best adapter: {Path(run_dir) / BEST_DIR} ({best['metric']} {best['value']:.4g} after "
                     f"{best['updates']} updates)")
    return lines
