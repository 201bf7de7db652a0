"""The reward HTTP API's bounds on a real local Ray Serve: every malformed body gets a 4xx naming the
problem (never a 500), a pathological image fails only its own request, a busy replica answers 429
with Retry-After, and every listening socket of the session stays on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import pickle
import threading
import time

import numpy as np
import psutil
import pytest

from rewards.http_codec import HttpLimits, encode_image
from rewards.registry import build_reward

LIMITS = HttpLimits(max_body_bytes=200_000, max_image_pixels=4_000_000, max_request_pixels=4_100_000,
                    max_aspect_ratio=16, max_batch=16, max_inflight_images=64)
# The held app waits 3 s for a batch that never fills, so requests stay in flight while a test looks;
# it accepts any aspect ratio, so a 1 x 4,000,000 image reaches the reward, which cannot encode it.
HELD_LIMITS = HttpLimits(max_body_bytes=200_000, max_image_pixels=4_000_000, max_request_pixels=4_000_000,
                         max_aspect_ratio=10**7, max_batch=4, max_inflight_images=8)
HELD_WAIT_S = 3.0


@pytest.fixture(scope="module")
def session(ray_local, module_port):
    from ray import serve

    from rewards.serve import ServeOptions, build_reward_app, deploy_rewards, remove_rewards

    port = module_port
    deployed = deploy_rewards({"jpeg_compressibility": {}}, {"jpeg_compressibility": ServeOptions(num_cpus=0.1)},
                              limits=LIMITS, http_port=port)
    held_options = ServeOptions(max_batch_size=64, batch_wait_timeout_s=HELD_WAIT_S, num_cpus=0.1,
                                max_ongoing_requests=32)
    held = serve.run(build_reward_app("jpeg_incompressibility", {}, held_options, HELD_LIMITS), name="held-jpeg",
                     route_prefix="/held", blocking=False)
    yield {"port": port, "handle": deployed.handles["jpeg_compressibility"], "held": held}
    serve.delete("held-jpeg")
    remove_rewards(deployed.started)


def _post(port: int, path: str, body, *, method: str = "POST", chunked: bool = False) -> tuple[int, dict, dict]:
    """-> (status, JSON body, headers by lower-case name); ``chunked`` sends no Content-Length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=iter([body]) if chunked else body, encode_chunked=chunked,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, json.loads(response.read() or b"{}"), headers
    finally:
        conn.close()


def _png(height: int, width: int) -> str:
    return encode_image(np.zeros((height, width, 3), dtype=np.uint8))


def _ok_body(seed: int = 0, n: int = 1) -> tuple[bytes, np.ndarray]:
    images = np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return json.dumps({"prompts": ["a"] * n, "images": [encode_image(im) for im in images]}).encode(), images


def _request(**fields) -> bytes:
    return json.dumps({"prompts": ["a"], "images": [_png(8, 8)], **fields}).encode()


def _malformed() -> list[tuple[str, bytes, int, str]]:
    ok = _png(8, 8)
    noise = encode_image(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    truncated = base64.b64encode(base64.b64decode(noise)[:100]).decode()  # the header and part of the pixels
    return [
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        ("deep nesting in a field", b'{"prompts": ' + b"[" * 100_000, 400, "nested too deeply"),
        ("not JSON", b"hello", 400, "not valid JSON"),
        ("empty body", b"", 400, "not valid JSON"),
        ("not UTF-8", b'{"prompts": ["\xff\xfe"], "images": []}', 400, "not valid JSON"),
        ("huge integer", b'{"prompts": ["a"], "images": [' + b"9" * 5000 + b"]}", 400, "not valid JSON"),
        ("huge float", b'{"prompts": ["a"], "images": [1e999]}', 400, "images[0] must be a base64 string, got float"),
        ("top level a list", b"[1, 2]", 400, "must be a JSON object"),
        ("top level a string", b'"images"', 400, "must be a JSON object"),
        ("top level null", b"null", 400, "must be a JSON object"),
        ("images not a list", _request(images="abc"), 400, "'images' must be a list, got str"),
        ("prompts missing", json.dumps({"images": [ok]}).encode(), 400, "'prompts' must be a list, got NoneType"),
        ("image not a string", _request(images=[3]), 400, "images[0] must be a base64 string, got int"),
        ("bad base64", _request(images=["%%%"]), 400, "images[0] is not valid base64"),
        ("a pickle", _request(images=[base64.b64encode(pickle.dumps({"x": 1})).decode()]), 400,
         "images[0] is not a PNG or JPEG image"),
        ("truncated PNG", _request(images=[truncated]), 400, "images[0] could not be decoded as PNG"),
        ("1 x 4,000,000 PNG", _request(images=[_png(1, 4_000_000)]), 422,
         "images[0] is 4000000x1, an aspect ratio of 4000000:1, above the limit of 16:1 (max_aspect_ratio)"),
        ("image above max_image_pixels", _request(images=[_png(2000, 2001)]), 413,
         "images[0] is 2001x2000 = 4002000 pixels, above the limit of 4000000 (max_image_pixels)"),
        ("request above max_request_pixels", json.dumps({"prompts": ["a", "b"], "images": [_png(1500, 2000)] * 2})
         .encode(), 413, "is 6000000, above the limit of 4100000 (max_request_pixels)"),
        ("more images than max_batch", json.dumps({"prompts": ["a"] * 17, "images": [ok] * 17}).encode(), 413,
         "number of images is 17, above the limit of 16 (max_batch)"),
        ("body above max_body_bytes", _request(images=["A" * 300_000]), 413,
         "above the limit of 200000 (max_body_bytes)"),
        ("empty list", json.dumps({"prompts": [], "images": []}).encode(), 400, "empty batch"),
        ("prompts length mismatch", json.dumps({"prompts": ["a", "b"], "images": [ok]}).encode(), 400,
         "got 1 images but 2 prompts"),
        ("prompt not a string", _request(prompts=[None]), 400, "prompts[0] must be a string, got NoneType"),
        ("prompt with a lone surrogate", _request(prompts=["\ud800"]), 400, "prompts[0] is not valid Unicode text"),
        ("unknown field named by a lone surrogate", _request(**{"\ud800": 1}), 400, "unknown field(s)"),
        ("return_embeddings a huge number", _request(return_embeddings=10**4000), 400,
         "'return_embeddings' must be true or false, got 1000000"),
    ]


@pytest.mark.parametrize("case", _malformed(), ids=lambda c: c[0])
def test_every_malformed_body_gets_a_4xx_naming_the_problem(session, case):
    _, body, status, message = case
    got, answer, _ = _post(session["port"], "/jpeg_compressibility", body)
    assert got == status, answer
    assert message in answer["error"] and answer["reward"] == "jpeg_compressibility", answer
    assert len(answer["error"]) < 600  # a client's value is echoed cut short
    if status == 413 and "limit" in answer:
        assert answer["limit"] in answer["error"] and answer["value"] > answer["maximum"]


def test_other_methods_and_chunked_bodies_beyond_the_limit_get_4xx(session):
    got, answer, _ = _post(session["port"], "/jpeg_compressibility", None, method="GET")
    assert got == 405 and "use POST" in answer["error"]
    # No Content-Length: the body is refused while it is read, at the first chunk past the limit.
    got, answer, _ = _post(session["port"], "/jpeg_compressibility", b"x" * 300_000, chunked=True)
    assert got == 413 and "(max_body_bytes)" in answer["error"], answer
    body, images = _ok_body()
    got, answer, _ = _post(session["port"], "/jpeg_compressibility", body, chunked=True)
    assert got == 200 and answer["scores"] == pytest.approx(build_reward("jpeg_compressibility")(images, ["a"]).scores)


def test_a_pathological_image_fails_only_its_own_request_of_a_shared_batch(session):
    port, held = session["port"], session["held"]
    reward = build_reward("jpeg_incompressibility")
    good = [_ok_body(seed) for seed in range(3)]
    bad = json.dumps({"prompts": ["a"], "images": [_png(1, 4_000_000)]}).encode()  # JPEG allows 65,500 wide
    before = held.stats.remote().result(timeout_s=60)
    results: dict = {}

    def send(key, body):
        results[key] = _post(port, "/held", body)

    handle_images = np.random.default_rng(9).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    threads = [threading.Thread(target=send, args=("bad", bad))]
    threads += [threading.Thread(target=send, args=(i, body)) for i, (body, _) in enumerate(good)]
    for t in threads:
        t.start()
    by_handle = held.score.remote(images=handle_images, prompts=["x", "y"])
    for t in threads:
        t.join(timeout=120)
    status, answer, _ = results["bad"]
    assert status == 422, answer
    assert answer["error"].startswith("images[0]: reward 'jpeg_incompressibility' failed on this 4000000x1 image: "
                                      "OSError"), answer
    for i, (_, images) in enumerate(good):
        status, answer, _ = results[i]
        assert status == 200, answer
        np.testing.assert_allclose(answer["scores"], reward(images, ["a"]).scores, rtol=1e-6)
    np.testing.assert_allclose(by_handle.result(timeout_s=60).scores, reward(handle_images, ["x", "y"]).scores)
    after = held.stats.remote().result(timeout_s=60)
    # All six items were merged into one batch (3 s window), whose one model call failed; only the bad
    # item failed when the items were scored alone.
    assert after["batches_run"] - before["batches_run"] == 1, (before, after)
    assert after["items_failed"] - before["items_failed"] == 1


def test_a_replica_with_max_inflight_images_in_flight_answers_429_with_retry_after(session):
    port, held = session["port"], session["held"]
    bodies = [_ok_body(seed, n=4) for seed in (1, 2)]
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: _post(port, "/held", bodies[i][0])}))
               for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HELD_WAIT_S
    while held.stats.remote().result(timeout_s=30)["inflight_images"] < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    extra, _ = _ok_body(3)
    status, answer, headers = _post(port, "/held", extra)
    for t in threads:
        t.join(timeout=120)
    assert status == 429, answer
    assert answer["limit"] == "max_inflight_images" and answer["value"] == 9 and answer["maximum"] == 8
    assert "8 images in flight; 1 more would exceed the limit of 8 (max_inflight_images)" in answer["error"]
    assert int(headers["retry-after"]) >= 1
    assert [results[i][0] for i in range(2)] == [200, 200]  # the requests already admitted were served
    assert _post(port, "/held", extra)[0] == 200  # and once they are done, there is room again


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack socket on ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return str(address) == "127.0.0.1"


def test_every_listening_socket_of_the_ray_session_is_on_loopback(session):
    import ray

    # This process started the local Ray, so every process of the session (GCS, raylet, agents, Serve
    # controller, proxy, replicas) descends from it. A replica listens twice: Ray's worker server and
    # Serve's inter-deployment gRPC server, which Serve binds to [::] unless rewards/serve_bind.py
    # rebinds it; the HTTP proxy binds reward_service.http_host.
    me = psutil.Process()
    listeners, replicas = [], {}
    for process in [me, *me.children(recursive=True)]:
        try:
            name = process.name() if process is me else " ".join(process.cmdline()).strip()[:80] or process.name()
            sockets = [c.laddr for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        listeners += [(name, process.pid, addr.ip, addr.port) for addr in sockets]
        if "ServeReplica" in name:
            replicas[name] = sockets
    assert listeners and {"ray::ServeReplica:reward-jpeg_compressibility:jpeg_compressibility",
                          "ray::ServeReplica:held-jpeg:jpeg_incompressibility"} <= set(replicas)
    assert all(len(sockets) >= 2 for sockets in replicas.values()), replicas
    exposed = [entry for entry in listeners if not _is_loopback(entry[2])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    assert any(port == session["port"] for *_, port in listeners)  # the HTTP proxy, on 127.0.0.1
    assert session["handle"].stats.remote().result(timeout_s=30)["grpc_host"] == "127.0.0.1"
    assert ray.util.get_node_ip_address() == "127.0.0.1"  # a local Ray (tests/conftest.py, cluster/run.py)
