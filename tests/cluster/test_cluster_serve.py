"""Reward services on a real local Ray Serve: handle and HTTP answers against direct computation,
every bad HTTP input, the client's fan-out/combine/retry, and autoscaling 1 -> 2 -> 1 replicas."""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from rewards.http_codec import HttpLimits, encode_image
from rewards.registry import build_reward
from tests.conftest import start_local_ray

LIMITS = HttpLimits(max_body_bytes=200_000, max_image_pixels=96 * 96, max_batch=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_session(tmp_path_factory):
    import ray
    from ray import serve

    from rewards.serve import ServeOptions, deploy_rewards, remove_rewards
    from rewards.tiny import tiny_clip_score_options

    # Replicas report their own queue lengths to the autoscaler (inherited by the cluster's processes):
    # with only handle-side reports, the autoscaling test below saw no upscaling once earlier tests of
    # this module had created handles in this process (Ray 2.60; in isolation it scaled).
    os.environ["RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"] = "0"
    start_local_ray()
    port = _free_port()
    clip_options = tiny_clip_score_options(tmp_path_factory.mktemp("clip"))
    specs = {"jpeg_compressibility": {}, "clip_score": clip_options}
    options = {name: ServeOptions(num_cpus=0.1, max_batch_size=8, batch_wait_timeout_s=0.01) for name in specs}
    deployed = deploy_rewards(specs, options, limits=LIMITS, http_port=port)
    yield {"port": port, "handles": deployed.handles, "specs": specs, "started": deployed.started}
    remove_rewards(deployed.started)
    serve.shutdown()
    ray.shutdown()
    os.environ.pop("RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE", None)


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[0] = 128  # one flat image: very compressible
    return images


def _post(port: int, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_apps_bind_to_loopback_one_per_reward(serve_session):
    from ray import serve

    apps = serve.status().applications
    assert {"reward-jpeg_compressibility", "reward-clip_score"} <= set(apps)
    assert serve_session["started"] == ["reward-jpeg_compressibility", "reward-clip_score"]


def test_handle_scores_equal_direct_computation(serve_session):
    images, prompts = _images(5), ["a cat", "a dog", "a red car", "a cat", "a tree"]
    for name, options in serve_session["specs"].items():
        expected = build_reward(name, **options)(images, prompts)
        got = serve_session["handles"][name].score.remote(images=images, prompts=prompts).result(timeout_s=60)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
        for modality, emb in expected.embeddings.items():
            np.testing.assert_allclose(got.embeddings[modality], emb, rtol=1e-5, atol=1e-6)


def test_http_scores_equal_direct_computation(serve_session):
    images, prompts = _images(3), ["a cat", "a dog", "a tree"]
    body = json.dumps({"prompts": prompts, "images": [encode_image(im) for im in images],
                       "return_embeddings": True}).encode()
    status, answer = _post(serve_session["port"], "/clip_score", body)
    assert status == 200, answer
    expected = build_reward("clip_score", **serve_session["specs"]["clip_score"])(images, prompts)
    np.testing.assert_allclose(answer["scores"], expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(answer["embeddings"]["image"]), expected.embeddings["image"], atol=1e-5)
    # JPEG over HTTP (a JPEG upload is decoded, then re-encoded at q=95 by the reward)
    status, answer = _post(serve_session["port"], "/jpeg_compressibility", body)
    assert status == 200
    np.testing.assert_allclose(answer["scores"], build_reward("jpeg_compressibility")(images, prompts).scores)


def _bad_requests() -> list[tuple[str, bytes, int, str]]:
    ok = encode_image(_images(1)[0])
    big = encode_image(np.zeros((128, 128, 3), dtype=np.uint8))  # 16384 px > 96*96
    pickled = base64.b64encode(pickle.dumps({"evil": 1})).decode()
    broken_png = base64.b64encode(base64.b64decode(ok)[:40]).decode()
    return [
        ("invalid JSON", b"{not json", 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("length mismatch", json.dumps({"prompts": ["a", "b"], "images": [ok]}).encode(), 400,
         "got 1 images but 2 prompts"),
        ("empty batch", json.dumps({"prompts": [], "images": []}).encode(), 400, "empty batch"),
        ("undecodable image", json.dumps({"prompts": ["a"], "images": [broken_png]}).encode(), 400,
         "images[0] could not be decoded as PNG"),
        ("not base64", json.dumps({"prompts": ["a"], "images": ["%%%"]}).encode(), 400, "not valid base64"),
        ("a pickle", json.dumps({"prompts": ["a"], "images": [pickled]}).encode(), 400,
         "images[0] is not a PNG or JPEG image"),
        ("image too large", json.dumps({"prompts": ["a"], "images": [big]}).encode(), 413, "128x128 = 16384 pixels"),
        ("body too large", json.dumps({"prompts": ["a"], "images": ["A" * 300_000]}).encode(), 413,
         "above the limit of 200000"),
        ("wrong prompt type", json.dumps({"prompts": [3], "images": [ok]}).encode(), 400, "prompts[0] must be a string"),
        ("unknown field", json.dumps({"prompts": ["a"], "images": [ok], "x": 1}).encode(), 400, "unknown field"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_http_bad_inputs_get_4xx_with_a_message_and_the_replica_survives(serve_session, case):
    _, body, status, message = case
    got_status, answer = _post(serve_session["port"], "/jpeg_compressibility", body)
    assert got_status == status, answer
    assert message in answer["error"]
    ok = json.dumps({"prompts": ["a"], "images": [encode_image(_images(1)[0])]}).encode()
    assert _post(serve_session["port"], "/jpeg_compressibility", ok)[0] == 200


def test_client_fans_out_and_combines_with_weights_and_volume(serve_session):
    from rewards.client import RewardClient
    from rewards.worker import RewardWorker

    weights = {"jpeg_compressibility": 0.5, "clip_score": 2.0}
    client = RewardClient(handles=serve_session["handles"], weights=weights, timeout_s=60)
    images, prompts = _images(4), ["a cat", "a dog", "a tree", "a cat"]
    scored = client.score(images=images, prompts=prompts, gamma=0.3)
    local = RewardWorker(specs=serve_session["specs"], weights=weights).score(images=images, prompts=prompts,
                                                                              gamma=0.3)
    np.testing.assert_allclose(scored.total, local.total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scored.volume, local.volume, rtol=1e-5, atol=1e-5)
    assert set(scored.latency_s) == set(weights) and scored.retries == {n: 0 for n in weights}


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_autoscaling_from_one_to_two_replicas_under_load_and_back(serve_session):
    from ray import serve

    from rewards.serve import ServeOptions, build_reward_app

    # Each request waits 0.3 s in the replica for a batch that never fills (4 in flight < 64), so the
    # load is ~4 ongoing requests per replica however slowly this process's threads send them.
    options = ServeOptions(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5,
                           downscale_delay_s=2.0, max_batch_size=64, batch_wait_timeout_s=0.3, num_cpus=0.1,
                           max_ongoing_requests=4, metrics_interval_s=0.5, look_back_period_s=2.0)
    app = "autoscale-jpeg"
    handle = serve.run(build_reward_app("jpeg_incompressibility", {}, options, LIMITS), name=app,
                       route_prefix="/autoscale", blocking=False)
    try:
        assert _running_replicas(app, "jpeg_incompressibility") == 1
        images, prompts = _images(4, size=32, seed=1), ["x"] * 4
        stop = threading.Event()

        def load():
            while not stop.is_set():
                handle.score.remote(images=images, prompts=prompts).result(timeout_s=60)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            assert _wait_for(lambda: _running_replicas(app, "jpeg_incompressibility") == 2, 90), \
                serve.status().applications[app]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert _wait_for(lambda: _running_replicas(app, "jpeg_incompressibility") == 1, 60)
    finally:
        serve.delete(app)


def test_client_retries_when_a_replica_is_killed_mid_request(serve_session):
    import ray
    from ray import serve

    from rewards.client import RewardClient
    from rewards.serve import ServeOptions, build_reward_app

    # A long batch wait keeps the request inside the replica while we kill it.
    options = ServeOptions(max_batch_size=64, batch_wait_timeout_s=3.0, num_cpus=0.1)
    app = "retry-jpeg"
    handle = serve.run(build_reward_app("jpeg_compressibility", {}, options, LIMITS), name=app,
                       route_prefix="/retry", blocking=False)
    try:
        client = RewardClient(handles={"jpeg_compressibility": handle}, weights={"jpeg_compressibility": 1.0},
                              timeout_s=60, max_retries=2, retry_backoff_s=0.5)
        images, prompts = _images(2), ["a", "b"]
        result = {}

        def call():
            result["scored"] = client.score(images=images, prompts=prompts)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and "retry-jpeg" in a["name"]]
        assert len(replicas) == 1, replicas
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        caller.join(timeout=120)
        scored = result["scored"]
        assert scored.retries == {"jpeg_compressibility": 1}
        np.testing.assert_allclose(scored.total, build_reward("jpeg_compressibility")(images, prompts).scores)
    finally:
        serve.delete(app)


def test_client_names_a_reward_that_keeps_failing(serve_session):
    from rewards.client import RewardClient, RewardServiceError

    # A handle to an app that does not host the reward: every call fails the same way.
    client = RewardClient(handles={"clip_score": serve_session["handles"]["jpeg_compressibility"]},
                          weights={"clip_score": 1.0}, timeout_s=30, max_retries=1, retry_backoff_s=0.0)
    with pytest.raises(RewardServiceError, match=r"reward 'clip_score' failed 2 time\(s\).*serves "
                                                 r"\['jpeg_compressibility'\], not 'clip_score'"):
        client.score(images=np.zeros((1, 8, 8, 3), dtype=np.uint8), prompts=["a"])


def test_deploy_file_is_a_valid_serve_config_and_its_apps_build():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rewards.serve import app_builder

    path = Path(__file__).resolve().parents[2] / "deploy" / "serve_rewards.yaml"
    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.parse_obj(config)
    assert schema.http_options.host == "127.0.0.1"
    for app in config["applications"]:
        assert app["name"] == f"reward-{app['args']['reward']}" and app["route_prefix"] == f"/{app['args']['reward']}"
        assert app["args"]["reward"] in __import__("rewards.registry", fromlist=["REWARDS"]).REWARDS
        application = app_builder(app["args"])  # builds the bound app without loading any model
        assert application is not None


def test_grouped_clip_score_and_aesthetic_share_one_encoder_per_replica(serve_session, tmp_path):
    from ray import serve

    from rewards.client import RewardClient
    from rewards.serve import ServeOptions, deploy_rewards, remove_rewards
    from rewards.tiny import tiny_aesthetic_options, tiny_clip_score_options
    from rewards.worker import RewardWorker

    specs = {"clip_score": tiny_clip_score_options(tmp_path), "aesthetic": tiny_aesthetic_options(tmp_path)}
    options = {n: ServeOptions(num_cpus=0.1, group="clip", max_batch_size=8) for n in specs}
    # A fresh app set (the module's apps use other names): one group app + two routes.
    deployed = deploy_rewards(specs, options, limits=LIMITS, http_port=serve_session["port"], reuse_running=False)
    try:
        assert deployed.apps == {"clip_score": "reward-group-clip", "aesthetic": "reward-group-clip"}
        status = serve.status().applications
        assert status["reward-group-clip"].deployments["clip_score"].replica_states
        # One replica hosts both rewards and holds a single CLIP encoder for them.
        backend = deployed.handles["clip_score"]
        images, prompts = _images(4), ["a cat", "a dog", "a tree", "a cat"]
        weights = {"clip_score": 1.0, "aesthetic": 0.5}
        client = RewardClient(handles=deployed.handles, weights=weights, timeout_s=60)
        scored = client.score(images=images, prompts=prompts)
        local = RewardWorker(specs=specs, weights=weights).score(images=images, prompts=prompts)
        np.testing.assert_allclose(scored.total, local.total, rtol=1e-5, atol=1e-5)
        stats = backend.stats.remote().result(timeout_s=30)
        assert stats["rewards"] == ["aesthetic", "clip_score"] and stats["clip_encoders"] == 1
        # Over HTTP each reward keeps its own route.
        body = json.dumps({"prompts": prompts[:1], "images": [encode_image(images[0])]}).encode()
        for reward in specs:
            status_code, answer = _post(serve_session["port"], f"/{reward}", body)
            assert status_code == 200 and answer["reward"] == reward
            np.testing.assert_allclose(answer["scores"][0], local.components[reward][0], rtol=1e-4, atol=1e-5)
    finally:
        remove_rewards(deployed.started)


def test_worker_shares_the_clip_encoder_between_clip_score_and_aesthetic(tmp_path):
    from rewards.tiny import tiny_aesthetic_options, tiny_clip_score_options
    from rewards.worker import RewardWorker

    specs = {"clip_score": tiny_clip_score_options(tmp_path), "aesthetic": tiny_aesthetic_options(tmp_path)}
    worker = RewardWorker(specs=specs, weights={"clip_score": 1.0, "aesthetic": 1.0})
    assert worker.rewards["clip_score"].encoder is worker.rewards["aesthetic"].encoder
    worker.score(images=_images(3), prompts=["a", "b", "c"])
    assert worker.rewards["clip_score"].encoder.cache_hits == 1  # the second reward reused the embeddings
