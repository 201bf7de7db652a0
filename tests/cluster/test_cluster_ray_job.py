"""`ray job submit` and `ray job stop` against a local head, as the README shows them: the stop ends the
job gracefully (a checkpoint, the Serve applications removed) and a second submit with --resume auto
finishes the run. Slow (a head with its dashboard, two jobs): `pytest -m slow`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _wait_for(predicate, *, timeout_s: float, what: str, poll_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def head(tmp_path, free_port):
    """A Ray head with its dashboard on 127.0.0.1 (ended with its process group, not `ray stop`)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port + 1 if free_port < 65000 else free_port - 1
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = []
        _wait_for(lambda: seen.append(proc.stdout.readline()) or any("Ray runtime started" in x for x in seen),
                  timeout_s=300, what="the head", poll_s=0)
        yield {"address": f"http://127.0.0.1:{dashboard_port}", "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def _ray(head, *args, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=head["env"], capture_output=True, text=True,
                          timeout=timeout_s)


def _submit(head, *train_args: str) -> str:
    proc = _ray(head, "job", "submit", "--address", head["address"], "--working-dir", ".", "--runtime-env",
                "deploy/runtime_env.yaml", "--no-wait", "--", "python", "-m", "cluster", "train", "configs/jpeg_demo.yaml",
                *train_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"(raysubmit_\w+)", proc.stdout + proc.stderr).group(1)


def _status(head, job: str) -> str:
    proc = _ray(head, "job", "status", "--address", head["address"], job)  # Ray's CLI logger writes to stderr
    text = proc.stdout + proc.stderr
    _status.last = text
    for words, status in (("was stopped", "STOPPED"), ("succeeded", "SUCCEEDED"), ("failed", "FAILED")):
        if f"Job '{job}' {words}" in text:  # how Ray's CLI reports the end states
            return status
    found = re.findall(r"Status for job '\w+': (?:JobStatus\.)?(\w+)", text)
    return found[-1] if found else ""


def _logs(head, job: str) -> str:
    proc = _ray(head, "job", "logs", "--address", head["address"], job)
    return proc.stdout + proc.stderr


def test_job_submit_stop_and_resume(head, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = ("reward_service.backend=serve", f"cache_dir={cache}", "logging.progress=false", "checkpoint.every_epochs=0",
            "evaluation.images_per_prompt=1", "--output-dir", str(run_dir), "--resume", "auto")
    first = _submit(head, "epochs=40", *args)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines())
              >= 1, timeout_s=900, what="the first epoch of the first job")
    stop = _ray(head, "job", "stop", "--address", head["address"], first, timeout_s=600)
    assert stop.returncode == 0, stop.stderr[-3000:]
    try:
        _wait_for(lambda: _status(head, first) in ("STOPPED", "FAILED", "SUCCEEDED"), timeout_s=300,
                  what="the stopped job to end")
    except AssertionError as err:
        raise AssertionError(f"{err}; last status output: {getattr(_status, 'last', '')[-2000:]}; stop said: "
                             f"{(stop.stdout + stop.stderr)[-2000:]}") from None
    logs = _logs(head, first)
    assert "checkpoint" in logs and "continue with: gard train" in logs, logs[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch-*"))
    assert checkpoints, logs[-3000:]
    done = int(checkpoints[-1].name.split("-")[1])
    # The Serve applications the job started were removed on the way out.
    serve = _ray(head, "job", "submit", "--address", head["address"], "--", "python", "-c",
                 "import ray; from ray import serve; ray.init(); "
                 "print('APPS', sorted(serve.status().applications))")
    assert "APPS []" in serve.stdout + serve.stderr, (serve.stdout + serve.stderr)[-3000:]
    # A second submit continues from that checkpoint and finishes the run.
    second = _submit(head, f"epochs={done + 1}", *args)
    _wait_for(lambda: _status(head, second) in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=900,
              what="the second job to finish")
    assert _status(head, second) == "SUCCEEDED", _logs(head, second)[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(done + 1))
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
