"""`gard serve CONFIG --port P`: serves the config's rewards over HTTP until SIGTERM, then removes them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from rewards.http_codec import encode_image

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gard_serve_answers_http_and_cleans_up_on_sigterm(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("prompts:\n  train: [a cat]\nrewards:\n  jpeg_incompressibility: {serve: {num_cpus: 0.1}}\n"
                      "cluster:\n  local_num_cpus: 2\n")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster", "serve", str(config), "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        body = json.dumps({"prompts": ["a cat"], "images": [encode_image(image)]}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and answer is None and proc.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/jpeg_incompressibility", data=body,
                                                 method="POST")
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 180 s"
        assert answer["reward"] == "jpeg_incompressibility" and answer["scores"][0] > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert f"POST http://127.0.0.1:{port}/jpeg_incompressibility" in out
        assert "removed reward-jpeg_incompressibility" in out
    finally:
        if proc.poll() is None:
            proc.kill()
