"""HTTP ingress on 127.0.0.1 with a real client: JSON and msgpack round trips, 4xx that name the
problem while the server keeps serving, bearer-token enforcement, /healthz."""

from __future__ import annotations

import json
import uuid

import msgpack
import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.train import build_model
from fleet.protocol import make_request, reply_from_wire, request_to_wire
from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray
httpx = pytest.importorskip("httpx")

NAMES = tuple(EMBODIMENTS)[:4]
TOKEN = "test-token-" + uuid.uuid4().hex[:8]


def request(name: str = "franka", i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    obs = {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS[name].proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }
    return make_request(f"robot-{i}", name, obs, obs_tick=i, n_samples=2 if EMBODIMENTS[name].head == "flow" else 1)


@pytest.fixture(scope="module")
def client(ray_session, tmp_path_factory):
    """An httpx client on the ingress's route, authorized with TOKEN; the app is deleted afterwards."""
    from ray import serve

    from deployments.http import build_http_app, start_serve

    ckpt = tmp_path_factory.mktemp("policy") / "policy"
    save_checkpoint(build_model(NAMES, 0, TINY), ckpt)
    address = start_serve(port=None)
    assert address.startswith("http://127.0.0.1:")
    app_name, prefix = f"http-test-{uuid.uuid4().hex[:6]}", f"/http-test-{uuid.uuid4().hex[:6]}"
    config = {
        "checkpoint": str(ckpt),
        "threads": 1,
        "replica_cpus": 0.5,
        "registry": None,
        "auth_token": TOKEN,
        "max_body_bytes": 200_000,
        "forward_thread": True,  # the policy-server module covers the default (forward on the loop)
    }
    serve.run(build_http_app(config), name=app_name, route_prefix=prefix)
    with httpx.Client(base_url=address + prefix, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c
    serve.delete(app_name)


def test_json_round_trip_with_base64_and_nested_lists(client) -> None:
    req = request("franka", 1)
    r = client.post("/v1/act", json=request_to_wire(req))
    assert r.status_code == 200, r.text
    reply = reply_from_wire(r.json())
    assert reply["chunk"].shape == (16, 7) and reply["request_id"] == req["request_id"]
    assert reply["entropy"].shape == (16, 7) and reply["head_version"] == 1
    as_lists = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in request("aloha", 2).items()}
    r = client.post("/v1/act", json=as_lists)
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["samples"]).shape == (2, 16, 14)


def test_msgpack_round_trip_with_raw_bytes(client) -> None:
    req = request("leap", 3)
    body = msgpack.packb(req | {"image": req["image"].tobytes(), "proprio": req["proprio"].tolist()})
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    r = client.post("/v1/act", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/msgpack")
    reply = reply_from_wire(msgpack.unpackb(r.content, raw=False))
    assert reply["chunk"].shape == (16, 24) and reply["chunk"].dtype == np.float32


@pytest.mark.parametrize(
    ("body", "ctype", "status", "field"),
    [
        (b"{not json", "application/json", 400, "body"),
        (b"\xc1\xc1", "application/msgpack", 400, "body"),
        (b"image=1", "text/plain", 415, "content-type"),
        (b"x" * 300_000, "application/json", 413, "body"),
        ("proprio", "application/json", 422, "proprio"),
        ("embodiment", "application/json", 422, "embodiment"),
        ("image", "application/json", 422, "image"),
        ("dtype", "application/json", 422, "image"),  # was a 500: numpy's parser raised ValueError
    ],
)
def test_malformed_http_gets_a_4xx_naming_the_problem(client, body, ctype: str, status: int, field: str) -> None:
    if isinstance(body, str):  # a well-formed body with one bad field
        wire = request_to_wire(request("hello", 4))
        bad = {
            "proprio": [1.0, 2.0],
            "embodiment": "spot",
            "image": {"b64": "AAAA", "shape": [2, 2]},
            "dtype": wire["image"] | {"dtype": "(100000000000,)f8"},
        }
        wire["image" if body == "dtype" else body] = bad[body]
        body = json.dumps(wire).encode()
    r = client.post("/v1/act", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field)
    ok = client.post("/v1/act", json=request_to_wire(request("hello", 5)))
    assert ok.status_code == 200, ok.text  # the replica keeps serving


def test_a_chunked_body_over_the_limit_gets_413_before_it_is_read_whole(client) -> None:
    def chunks():  # no Content-Length: the ingress can only count as the body streams in
        for _ in range(40):
            yield b"x" * 65536  # 2.6 MB against a 200 kB limit

    r = client.post("/v1/act", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["field"] == "body" and "more than 200000 bytes" in r.json()["error"]
    assert client.post("/v1/act", json=request_to_wire(request("hello", 7))).status_code == 200


def test_bearer_token_is_enforced(client) -> None:
    body = request_to_wire(request("franka", 6))
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/v1/act", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["field"] == "authorization"
    assert client.post("/v1/act", json=body).status_code == 200


def test_healthz_reports_head_versions(client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "heads": dict.fromkeys(NAMES, 1)}
