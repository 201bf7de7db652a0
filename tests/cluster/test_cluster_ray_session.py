"""`gard train` without cluster.address starts its own Ray even when another head runs on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")

PROBE = """
import ray
from cluster.config import load_config
from cluster.run import ray_session
config = load_config(None, ["prompts.train=[a]", "cluster.local_num_cpus=1"])
with ray_session(config) as address:
    print("SESSION", address, ray.get_runtime_context().gcs_address)
"""


@pytest.mark.slow  # outside the default suite's time budget: make test-slow
def test_a_plain_run_does_not_join_another_head_on_the_machine(free_port):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    # --block keeps the head in the foreground, so ending this process group stops exactly this head
    # (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={free_port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 240, []
        while time.monotonic() < deadline:  # a busy machine may take a while to start a head
            line = head.stdout.readline()
            seen.append(line)
            if "Ray runtime started" in line or (not line and head.poll() is not None):
                break
        assert any("Ray runtime started" in x for x in seen), "".join(seen)[-3000:]
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=240)
        assert probe.returncode == 0, probe.stderr[-3000:]
        line = next(x for x in probe.stdout.splitlines() if x.startswith("SESSION"))
        assert "local (127.0.0.1)" in line and f":{free_port}" not in line, line
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
