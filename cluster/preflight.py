"""Checks that need the model files but not Ray: run in the driver before any actor starts.

A bad scheduler found inside an actor would surface as an actor that died at start-up; found here, it
is one paragraph naming the field (exit code 2) and the run directory is not written.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import Config, ConfigError


def check_scheduler(config: Config, *, pretrained: str) -> None:
    """Builds the DDIM scheduler the samplers will use (the model's own config, ``set_alpha_to_one=False``,
    ``sampling.timestep_spacing`` if set) and refuses a schedule with a step of σ_t = 0
    (``actors.ddim.check_ddim_schedule``). A hub id without a local copy is checked in the actors."""
    from diffusers import DDIMScheduler

    from actors.ddim import check_ddim_schedule

    scheduler_dir = Path(pretrained) / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        return
    overrides = {"timestep_spacing": config.sampling.timestep_spacing} if config.sampling.timestep_spacing else {}
    scheduler = DDIMScheduler.from_pretrained(str(scheduler_dir), set_alpha_to_one=False, **overrides)
    scheduler.set_timesteps(config.sampling.num_steps)
    try:
        check_ddim_schedule(scheduler, eta=config.sampling.eta)
    except ValueError as err:
        raise ConfigError(f"policy.pretrained = {config.policy.pretrained!r} with sampling.num_steps = "
                          f"{config.sampling.num_steps}: {err}") from None
