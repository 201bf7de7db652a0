"""``gard serve``: the reward applications of a config, up until interrupted, then removed."""

from __future__ import annotations

import signal
import threading

from cluster.config import Config
from cluster.run import ray_session
from cluster.specs import deploy_config_rewards, resolve_reward_specs
from rewards.serve import remove_rewards


def serve_forever(config: Config, *, stop: threading.Event | None = None, log=print) -> int:
    """Deploys one app per reward, prints the endpoints, waits for SIGINT/SIGTERM (or ``stop``)."""
    stop = stop or threading.Event()
    rs = config.reward_service
    with ray_session(config):
        # After ray.init, which installs its own SIGTERM handler in the driver.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        specs, _ = resolve_reward_specs(config.rewards, cache_dir=config.cache_dir)
        deployed = deploy_config_rewards(config, specs, reuse_running=False)
        try:
            for name in specs:
                log(f"gard serve: {name:<24} POST http://{rs.http_host}:{rs.http_port}/{name}")
            log("gard serve: up; Ctrl-C or SIGTERM removes the applications and exits")
            stop.wait()
        finally:
            remove_rewards(deployed.started)
            log(f"gard serve: removed {', '.join(deployed.started) or 'nothing'}")
    return 0
