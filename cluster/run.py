"""A training job from start to end: the Ray session, the run directory, resuming, ``train()``.

``train`` checks what it can before Ray starts (the config is already validated; the DDIM schedule
here), prepares the run directory (``metrics.jsonl`` and ``config.yaml``), connects to or starts Ray
bound to 127.0.0.1, builds the ``Driver`` and runs it, and removes the reward applications it started.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import yaml

from actors.tiny import resolve_pretrained
from cluster.checkpoint import Checkpoint, check_compatible, latest_checkpoint, load_checkpoint
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
        ray.init(
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


def prepare_run_dir(config: Config, output_dir: str | None, *, resume: Checkpoint | None = None) -> Path:
    """Creates the run directory; metrics.jsonl starts empty, or with the resumed checkpoint's rows (the
    checkpoint holds the rows of record: rows of later epochs, and a damaged last line if the previous
    run was killed mid-write, are replaced, since those epochs run again)."""
    run_dir = Path(output_dir or config.output_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = resume.metrics if resume is not None else []
    write_rows(run_dir / "metrics.jsonl", rows)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def find_resume_checkpoint(config: Config, *, resume: str, output_dir: str | None, log=print) -> Checkpoint | None:
    """``--resume auto``: the newest valid checkpoint of the output directory (None: start fresh);
    ``--resume PATH``: that checkpoint, or the newest one of that run directory. Refuses a checkpoint
    whose config would sample or train differently (ConfigError naming the fields)."""
    if resume == "auto":
        run_dir = output_dir or config.output_dir
        if not run_dir:
            raise ConfigError("--resume auto looks for checkpoints in the run directory, but none is set: pass "
                              "--output-dir DIR (or set output_dir) to the directory of the run to continue")
        path = latest_checkpoint(Path(run_dir))
        if path is None:
            log(f"gard: no checkpoint in {Path(run_dir) / 'checkpoints'}: starting fresh")
            return None
    else:
        path = Path(resume)
        if (path / "checkpoints").is_dir():  # a run directory: its newest checkpoint
            path = latest_checkpoint(path) or path / "checkpoints"
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError as err:  # a wrong --resume PATH is a user error like a bad config (exit 2)
        raise ConfigError(f"--resume {resume}: {err}") from None
    check_compatible(checkpoint, config.to_dict())
    return checkpoint


def train(config: Config, *, output_dir: str | None = None, resume: str | None = None,
          stop: StopRequest | None = None, log=print) -> Path:
    """Runs a whole training job (or continues one: ``resume`` = "auto" or a path); returns the run
    directory. SIGINT/SIGTERM (or ``stop.request``) end it after the current epoch with a checkpoint,
    raising RunInterrupted."""
    checkpoint = None
    if resume:
        checkpoint = find_resume_checkpoint(config, resume=resume, output_dir=output_dir, log=log)
        if checkpoint is not None and output_dir is None and config.output_dir is None:
            output_dir = str(checkpoint.path.parent.parent)  # --resume PATH continues in that run's directory
    if checkpoint is not None and checkpoint.epoch >= config.epochs:
        run_dir = Path(output_dir or config.output_dir)
        log(f"gard: {checkpoint.path} already has {checkpoint.epoch} epochs >= epochs={config.epochs}; "
            f"nothing to train (pass epochs=N with N > {checkpoint.epoch} to continue)")
        return run_dir
    from cluster.preflight import check_scheduler

    check_scheduler(config, pretrained=resolve_pretrained(config.policy.pretrained, cache_dir=config.cache_dir))
    run_dir = prepare_run_dir(config, output_dir, resume=checkpoint)
    stop = stop or StopRequest()
    with ray_session(config) as address, stop_on_signals(stop, log=log):
        log(banner(config, run_dir, address))
        driver = Driver(config, run_dir=run_dir)
        try:
            driver.run(log=log, resume=checkpoint, stop=stop)
        finally:
            driver.shutdown()
    return run_dir
