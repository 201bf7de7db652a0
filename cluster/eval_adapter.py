"""``gard eval [ADAPTER] --config CONFIG``: one evaluation of a trained adapter (or of the base model),
exactly as a run evaluates.

The command builds the run's actors from CONFIG (``Driver``: the same samplers and reward stage), lets the
learner load the adapter as ``policy.init_adapter``, broadcasts its weights to the samplers and runs one
``Evaluator.evaluate()``: the evaluation set of CONFIG's ``evaluation`` section, sampled with the fixed
seeds of ``evaluation.seed`` and scored with the training and gold rewards. So the final adapter of a run,
evaluated with that run's config, gives the run's last ``eval/`` metrics, and the base model gives its
``eval/..._initial`` ones.

ADAPTER is a run directory (its ``lora/``; without one, the ``lora/`` of its newest valid checkpoint), a
checkpoint directory, a LoRA directory (``pytorch_lora_weights.safetensors``), or omitted: the base model.
The output directory gets ``eval_metrics.json`` (the adapter, the evaluation section, every ``eval/``
metric), ``eval.png`` (the labelled grid) and ``eval.json`` (each image's set, prompt and rewards).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.adapter_record import RECORD_FILE
from cluster.checkpoint import checkpoint_root, invalid_checkpoints, is_valid, latest_checkpoint
from cluster.config import Config, ConfigError

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METRICS_FILE = "eval_metrics.json"
GRID_STEM = "eval"  # eval.png and eval.json
EXPECTED = ("expected a run directory (with lora/ or checkpoints/), a checkpoint directory, a LoRA directory "
            f"(with {WEIGHTS_FILE}), or no ADAPTER to evaluate the base model")
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")  # key=value; a path such as runs/lr=1e-3 is not one


@dataclass
class AdapterSource:
    """What ``gard eval`` evaluates: ``lora`` (None: the base model) and where its output goes by default."""

    lora: Path | None
    default_output: Path | None  # None: runs/eval-<config name>-<time>
    record: dict | None = None  # the adapter's gard_adapter.json, when it has one


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The positional arguments of ``gard eval`` -> (ADAPTER or None, the key=value overrides);
    ConfigError when more than one is not an override."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    paths = [item for item in items if not _OVERRIDE.match(item)]
    if len(paths) > 1:
        raise ConfigError(f"gard eval takes one ADAPTER, got {len(paths)}: {paths}; {EXPECTED} (overrides are "
                          f"key=value)")
    return (paths[0] if paths else None), overrides


def _record(lora: Path) -> dict | None:
    try:
        record = json.loads((lora / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _newer_checkpoint_note(run_dir: Path, record: dict | None) -> str | None:
    """A note when ``run_dir/lora`` is older than the run's newest checkpoint (a continued run that stopped
    early keeps the earlier final adapter)."""
    newest = latest_checkpoint(run_dir)
    epoch = record.get("epoch") if record else None
    if newest is None or not isinstance(epoch, int) or int(newest.name.split("-")[1]) <= epoch:
        return None
    return (f"gard: note: {run_dir / 'lora'} is the adapter after epoch {epoch}, but {newest} is newer; pass "
            f"that checkpoint as ADAPTER to evaluate it")


def resolve_adapter(adapter: str | None, *, log=print) -> AdapterSource:
    """ADAPTER -> the LoRA directory to evaluate; ConfigError naming ADAPTER for anything else."""
    if adapter is None:
        return AdapterSource(lora=None, default_output=None)
    path = Path(adapter)
    if not path.exists():
        raise ConfigError(f"ADAPTER = {adapter!r}: no such file or directory; {EXPECTED}")
    if not path.is_dir():
        raise ConfigError(f"ADAPTER = {adapter!r} is a file, not a directory; {EXPECTED}")
    path = path.resolve()
    if (path / WEIGHTS_FILE).is_file():
        return AdapterSource(lora=path, default_output=None, record=_record(path))
    if is_valid(path):  # <run>/checkpoints/epoch-NNNNNN: beside the run's own evaluation, named after it
        return AdapterSource(lora=path / "lora", default_output=path.parent.parent / f"eval-{path.name}",
                             record=_record(path / "lora"))
    if (path / "lora" / WEIGHTS_FILE).is_file():
        record = _record(path / "lora")
        if (note := _newer_checkpoint_note(path, record)) is not None:
            log(note)
        return AdapterSource(lora=path / "lora", default_output=path / "eval", record=record)
    if checkpoint_root(path).is_dir():
        for bad, problem in invalid_checkpoints(path):
            log(f"gard: warning: skipping {bad}: {problem}")
        newest = latest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"ADAPTER = {adapter!r} is a run directory without lora/ whose checkpoints/ holds no "
                              f"valid checkpoint (see the warnings above); {EXPECTED}")
        log(f"gard: {path} has no lora/ (the run did not finish): evaluating its newest checkpoint {newest}")
        return AdapterSource(lora=newest / "lora", default_output=path / "eval", record=_record(newest / "lora"))
    raise ConfigError(f"ADAPTER = {adapter!r} holds neither {WEIGHTS_FILE}, nor lora/{WEIGHTS_FILE}, nor "
                      f"checkpoints/; {EXPECTED}")


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuses, before anything runs, an output path that is a file, an earlier evaluation (unless
    ``overwrite``) and a directory that cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {str(out)!r} is a file, not a directory; pass a directory path")
    if (out / METRICS_FILE).exists() and not overwrite:
        raise ConfigError(f"{out / METRICS_FILE} already exists (an earlier evaluation); pass --overwrite to "
                          f"replace it, or another --output-dir")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {str(out)!r} cannot be written ({existing} is not a writable directory); "
                          f"pass a writable --output-dir")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def write_outputs(result, *, out: Path, config: Config, source: AdapterSource) -> Path:
    """``eval.png``/``eval.json`` (``save_eval``) and, last, ``eval_metrics.json``; returns the latter."""
    from cluster.evaluation import save_eval

    out.mkdir(parents=True, exist_ok=True)
    save_eval(result, run_dir=out, updates=0, stem=out / GRID_STEM)
    payload = {
        "adapter": None if source.lora is None else str(source.lora),
        "adapter_record": source.record,
        "pretrained": config.policy.pretrained,
        "config_name": config.name,
        "evaluation": config.evaluation.to_yaml(),
        "metrics": {key: _finite(value) for key, value in sorted(result.metrics.items())},
        "grid": f"{GRID_STEM}.png",
    }
    tmp = out / f".{METRICS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out / METRICS_FILE)
    return out / METRICS_FILE


def summary(metrics: dict[str, float]) -> str:
    """Each metric on its own line, sorted by name, values aligned (a space where a sign would be)."""
    width = max((len(key) for key in metrics), default=0)
    return "\n".join(f"  {key:<{width}}  {value: .6g}" for key, value in sorted(metrics.items()))


def _check_base_model(config: Config, *, pretrained: str, source: AdapterSource, log) -> None:
    """A warning when the adapter's record names another base model (it loads, but draws other images)."""
    base = (source.record or {}).get("base_model")
    if not isinstance(base, dict) or config.policy.pretrained == base.get("pretrained") \
            or pretrained == base.get("resolved"):
        return
    log(f"gard: warning: {source.lora} was trained on {base.get('pretrained')!r} ({base.get('resolved')}), but "
        f"policy.pretrained = {config.policy.pretrained!r}; evaluating it on the configured base model")


def evaluate_adapter(config: Config, *, adapter: str | None, output_dir: str | None = None,
                     overwrite: bool = False, log=print) -> Path:
    """``gard eval``: checks everything it can before Ray starts (ADAPTER, the output directory and
    ``train``'s model checks with the adapter as ``policy.init_adapter``), evaluates on the run's actors
    and writes the outputs; returns the output directory."""
    from cluster.preflight import check_models
    from cluster.run import ray_session

    source = resolve_adapter(adapter, log=log)
    if source.lora is None and config.policy.init_adapter:
        log(f"gard: evaluating the base model; policy.init_adapter = {config.policy.init_adapter} is not loaded "
            f"(pass it as ADAPTER to evaluate it)")
    config.policy.init_adapter = None if source.lora is None else str(source.lora)
    config.cluster.num_learners = 1  # nothing is trained: one learner loads and publishes the adapter
    out = Path(output_dir) if output_dir else (
        source.default_output or Path(f"runs/eval-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    check_output_dir(out, overwrite=overwrite)
    try:
        pretrained = check_models(config)
    except ConfigError as err:  # the adapter's ranks or alphas: say which argument it came from
        if source.lora is not None and str(err).startswith("policy.init_adapter"):
            raise ConfigError(f"ADAPTER = {adapter!r}: {err}") from None
        raise
    _check_base_model(config, pretrained=pretrained, source=source, log=log)
    with ray_session(config) as address:
        from cluster.driver import Driver
        from cluster.evaluation import eval_items
        from cluster.placement import check_placement

        check_placement(config, strict=address.startswith("local"), log=log)
        e = config.evaluation
        log(f"gard eval: {source.lora or 'the base model'} on {config.policy.pretrained}: "
            f"{len(eval_items(config))} images ({', '.join(f'{n} {len(p)}' for n, p in e.prompts.items())} prompts "
            f"x {e.images_per_prompt}, seed {e.seed}), {config.sampling.num_steps} DDIM steps; ray {address}")
        driver = Driver(config, run_dir=out)
        try:
            log(driver.placement_report())  # which actor runs on which node and GPU, as `gard train` prints
            driver.broadcast()  # the learner's weights (the adapter it loaded) on every sampler
            result = driver.evaluator.evaluate()
        finally:
            driver.shutdown()
    write_outputs(result, out=out, config=config, source=source)
    log(summary(result.metrics))
    return out
