"""deploy/cluster_launcher.yaml: the keys the Ray cluster launcher requires, node types that exist, the
image of deploy/Dockerfile with no setup commands, the dashboard on the head's loopback with token
authentication, enough GPUs for the preset; then Ray's own launcher schema (ray-schema.json, after
the provider's defaults are filled in, as `ray up` does).
"""

from __future__ import annotations

import copy

import pytest
from deploy_checks import check_launcher, gpu_image, load_yaml, preset_gpus


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load_yaml("deploy/cluster_launcher.yaml")


@pytest.fixture(scope="module")
def needs() -> dict:
    return {"image": gpu_image(), "gpus_needed": preset_gpus("configs/sd15_aesthetic.yaml")}


def test_launcher_config_is_complete(launcher, needs):
    assert check_launcher(launcher, **needs) == []


def _drop(key):
    return lambda c: c.pop(key)


@pytest.mark.parametrize("mutate, expected", [
    (_drop("max_workers"), "the launcher config lacks `max_workers`"),
    (_drop("head_node_type"), "the launcher config lacks `head_node_type`"),
    (lambda c: c.update(head_node_type="ray.head.default"), "head_node_type 'ray.head.default' is none of"),
    (lambda c: c["available_node_types"]["gpu"].pop("resources"), "available_node_types.gpu lacks `resources`"),
    (lambda c: c["available_node_types"]["gpu"].update(min_workers=2), "min_workers add up to more than max_workers"),
    (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=4), "offer 4 GPUs, the preset asks for 8"),
    (lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU="8"), "Ray's launcher refuses the config"),
    (lambda c: c["docker"].update(image="rayproject/ray:latest"), "docker.image 'rayproject/ray:latest' is not"),
    (_drop("setup_commands"), "`setup_commands` must be []"),
    (lambda c: c.update(head_setup_commands=["pip install boto3"]), "`head_setup_commands` must be []"),
    (lambda c: c.update(head_start_ray_commands=[x.replace("127.0.0.1", "0.0.0.0") for x in c["head_start_ray_commands"]]),
     "must bind the dashboard to 127.0.0.1"),
    (lambda c: c.update(worker_start_ray_commands=[x.replace("RAY_AUTH_MODE=token ", "")
                                                   for x in c["worker_start_ray_commands"]]),
     "worker_start_ray_commands must start Ray with RAY_AUTH_MODE=token"),
    (_drop("file_mounts"), "file_mounts must copy ~/.ray/auth_token"),
    (lambda c: c.update(max_workres=1), "Ray's launcher refuses the config: Additional properties are not allowed"),
])
def test_a_realistic_mistake_is_named(launcher, needs, mutate, expected):
    config = copy.deepcopy(launcher)
    mutate(config)
    problems = check_launcher(config, **needs)
    assert any(expected in p for p in problems), problems
