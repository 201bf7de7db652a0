"""Shared fixtures: one torch thread, offline hub, a tiny SD pipeline saved once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Serve handles keep a metrics thread after their module's cluster is shut down; with auto-connect
# on, its next call would silently start a fresh local Ray in the test process, and the next module's
# ray.init would then fail. Every test starts the Ray it needs explicitly.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A tiny ε-prediction StableDiffusionPipeline directory (random weights, built from configs)."""
    from actors.tiny import build_tiny_sd

    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """The same tiny pipeline with a v-prediction scheduler."""
    from actors.tiny import build_tiny_sd

    return str(build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(*, attempts: int = 3) -> None:
    """A new local Ray on 127.0.0.1 with 2 CPUs. On a loaded machine its start can time out waiting for
    the GCS; each failed attempt is cleaned up and retried after a pause."""
    import time

    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level="WARNING", log_to_driver=False)
            return
        except Exception:  # noqa: BLE001 - Ray raises several types for a start that did not finish
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(10 * attempt)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return _free_port()


@pytest.fixture(scope="module")
def module_port() -> int:
    """A free TCP port on 127.0.0.1 for the services one test module starts."""
    return _free_port()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs for one test module (Serve, if a test started it, removed)."""
    import ray
    from ray import serve

    start_local_ray()
    yield
    serve.shutdown()
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    """Serve handles made in this process keep a metrics thread after their module's Ray is shut down; at
    interpreter exit it logs "Ray has not been started" errors that are not test results. Quiet it."""
    import logging

    logging.getLogger("ray.serve").setLevel(logging.CRITICAL)


def actor_pid(actor) -> int:
    """The actor's process id; a call that reaches an actor while Ray restarts it (ActorUnavailableError,
    "the actor was restarted") is asked again, for up to 120 s."""
    import time

    import ray

    deadline = time.monotonic() + 120
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
