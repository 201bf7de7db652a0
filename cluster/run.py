"""A training job from start to end: the Ray session, the run directory, resuming, ``train()``.

``train`` checks what it can before Ray starts (the config is already validated; the DDIM schedule
here), prepares the run directory (``metrics.jsonl`` and ``config.yaml``), connects to or starts Ray
bound to 127.0.0.1, builds the ``Driver`` and runs it, and removes the reward applications it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from cluster.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_compatible,
    checkpoint_root,
    invalid_checkpoints,
    list_checkpoints,
    load_checkpoint,
)
from cluster.config import Config, ConfigError
from cluster.driver import Driver
from cluster.metrics import write_rows
from cluster.specs import banner
from cluster.stop import StopRequest, stop_on_signals


@contextlib.contextmanager
def ray_session(config: Config):
    """Connects to ``cluster.address`` or starts a local Ray bound to 127.0.0.1; shuts down what it started."""
    # With this set, Ray binds its node address and ports to loopback only (checked with `ss`); set before import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    started = False
    if ray.is_initialized():
        address = "already initialized"
    elif config.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=config.cluster.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        address = config.cluster.address or os.environ["RAY_ADDRESS"]
    else:
        # address="local": a new Ray of our own even when another head runs on this machine (a bare
        # ray.init() would join the newest one, whose workers do not share our paths or resources).
        ray.init(
            address="local",
            num_cpus=config.cluster.local_num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
        started = True
        address = "local (127.0.0.1)"
    try:
        yield address
    finally:
        if started:
            ray.shutdown()
            # Serve handles of this process keep a metrics thread that would log "Ray has not been
            # started" errors from here to the interpreter's exit: nothing is wrong, so say nothing.
            logging.getLogger("ray.serve").setLevel(logging.CRITICAL)


def prepare_run_dir(config: Config, output_dir: str | None, *, resume: Checkpoint | None = None,
                    start_over: bool = False) -> Path:
    """Creates the run directory; metrics.jsonl starts empty, or with the resumed checkpoint's rows (the
    checkpoint holds the rows of record: rows of later epochs, and a damaged last line if the previous
    run was killed mid-write, are replaced, since those epochs run again). ``start_over`` (``--resume
    never``) removes an earlier run's checkpoints there first."""
    run_dir = Path(output_dir or config.output_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output-dir {str(run_dir)!r} is a file, not a directory; pass a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start_over and checkpoint_root(run_dir).is_dir():
            shutil.rmtree(checkpoint_root(run_dir))
        probe = run_dir / f".gard-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"the run directory {str(run_dir)!r} cannot be written ({err.strerror or err}); pass a "
                          f"writable --output-dir") from None
    rows = resume.metrics if resume is not None else []
    write_rows(run_dir / "metrics.jsonl", rows)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def _newest_loadable(run_dir: Path, *, log) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads; each one skipped is named with its reason."""
    for path, problem in invalid_checkpoints(run_dir):
        log(f"gard: warning: skipping {path}: {problem}")
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log(f"gard: warning: skipping {err}")
    return None


def _has_checkpoints(run_dir: Path) -> bool:
    return any(checkpoint_root(run_dir).glob("epoch-*"))


def find_resume_checkpoint(config: Config, *, resume: str | None, output_dir: str | None,
                           log=print) -> Checkpoint | None:
    """``--resume auto``: the newest checkpoint of the run directory that loads (None: a new run; a
    directory whose checkpoints are all corrupt is refused, never overwritten); ``--resume PATH``: that
    checkpoint, or the newest one of that run directory; ``--resume never`` (or no flag on a directory
    without checkpoints): a new run. Refuses a checkpoint whose config would sample or train differently
    (ConfigError naming the fields)."""
    run_dir = output_dir or config.output_dir
    if resume in (None, "never"):
        if resume is None and run_dir and _has_checkpoints(Path(run_dir)):
            raise ConfigError(f"{run_dir} already holds a run with checkpoints; pass --resume auto to continue it, "
                              f"--resume never to start over there (its checkpoints are removed), or a new "
                              f"--output-dir")
        return None
    if resume == "auto":
        if not run_dir:
            raise ConfigError("--resume auto looks for checkpoints in the run directory, but none is set: pass "
                              "--output-dir DIR (or set output_dir) to the directory of the run to continue")
        checkpoint = _newest_loadable(Path(run_dir), log=log)
        if checkpoint is None and _has_checkpoints(Path(run_dir)):
            raise ConfigError(f"--resume auto: {checkpoint_root(Path(run_dir))} holds checkpoints but none is "
                              f"valid (see the warnings above); refusing to start a new run over them. Pass "
                              f"--resume never to start over there, or a new --output-dir")
        if checkpoint is None:
            log(f"gard: no checkpoint in {checkpoint_root(Path(run_dir))}: starting fresh")
            return None
    else:
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"--resume {resume}: no such checkpoint or run directory")
        try:
            checkpoint = (_newest_loadable(path, log=log) if checkpoint_root(path).is_dir()
                          else load_checkpoint(path))
        except CheckpointError as err:  # a wrong --resume PATH is a user error like a bad config (exit 2)
            raise ConfigError(f"--resume {resume}: {err}") from None
        if checkpoint is None:
            raise ConfigError(f"--resume {resume}: {checkpoint_root(path)} holds no valid checkpoint")
    check_compatible(checkpoint, config.to_dict())
    return checkpoint


def train(config: Config, *, output_dir: str | None = None, resume: str | None = None,
          stop: StopRequest | None = None, log=print) -> Path:
    """Runs a whole training job (or continues one: ``resume`` = "auto" or a path); returns the run
    directory. SIGINT/SIGTERM (or ``stop.request``) end it after the current epoch with a checkpoint,
    raising RunInterrupted."""
    checkpoint = find_resume_checkpoint(config, resume=resume, output_dir=output_dir, log=log)
    if checkpoint is not None and output_dir is None and config.output_dir is None:
        output_dir = str(checkpoint.path.parent.parent)  # --resume PATH continues in that run's directory
    if checkpoint is not None and checkpoint.epoch >= config.epochs:
        run_dir = Path(output_dir or config.output_dir)
        log(f"gard: {checkpoint.path} already has {checkpoint.epoch} epochs >= epochs={config.epochs}; "
            f"nothing to train (pass epochs=N with N > {checkpoint.epoch} to continue)")
        return run_dir
    from cluster.preflight import check_logging, check_models

    # Everything that can be checked without Ray, before the run directory is written.
    check_logging(config)
    check_models(config)
    stop = stop or StopRequest()
    with ray_session(config) as address, stop_on_signals(stop, log=log):
        from cluster.placement import check_placement

        # A cluster this process started cannot grow: a run it cannot hold fails now, not silently later.
        check_placement(config, strict=address.startswith("local"), log=log)
        run_dir = prepare_run_dir(config, output_dir, resume=checkpoint, start_over=resume == "never")
        log(banner(config, run_dir, address))
        driver = Driver(config, run_dir=run_dir)
        try:
            log(driver.placement_report())  # which actor runs on which node and GPU
            driver.run(log=log, resume=checkpoint, stop=stop)
        finally:
            driver.shutdown()
    return run_dir
