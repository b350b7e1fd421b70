"""The openpi endpoint at protocol level, without Ray or a model: a tiny client that frames exactly as
openpi-client 0.1.2 does (its own msgpack numpy encoding, written here independently of the server's)."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from fleet.embodiments import EMBODIMENTS
from fleet.serving import openpi_wire
from fleet.serving.openpi import OpenpiServer

# openpi-client calls websockets' sync connect() outside a `with`, which websockets 17 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")


# ---- openpi-client's framing (openpi_client/msgpack_numpy.py), re-stated for the test --------------------
def _client_pack(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _client_unpack_hook(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


class Client:
    """WebsocketClientPolicy's behaviour: connect (Api-Key header), read metadata, infer = send + recv."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.ws = connect(url, compression=None, max_size=None, additional_headers=headers)
        self.metadata = msgpack.unpackb(self.ws.recv(), object_hook=_client_unpack_hook)

    def infer(self, obs: dict) -> dict:
        self.ws.send(msgpack.packb(obs, default=_client_pack))
        reply = self.ws.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return msgpack.unpackb(reply, object_hook=_client_unpack_hook)

    def close(self) -> None:
        self.ws.close()


# ---- a server on a background loop, over a fake batched act -------------------------------------------
class FakePolicy:
    """Answers like PolicyServer.act: the chunk is filled with the request's first proprio value."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def act(self, request: dict) -> dict:
        self.requests.append(request)
        return self.answer(request)

    @staticmethod
    def answer(request: dict) -> dict:
        spec = EMBODIMENTS[request["embodiment"]]
        chunk = np.full((spec.chunk_size, spec.action_dim), request["proprio"][0], np.float32)
        return {
            "chunk": chunk,
            "head_version": 3,
            "embodiment": request["embodiment"],
            "request_id": request["request_id"],
            "server_timing": {"infer_ms": 1.5, "batch_size": 2},
        }


@pytest.fixture()
def server():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    policy = FakePolicy()
    srv = OpenpiServer(policy.act, EMBODIMENTS, lambda: dict.fromkeys(EMBODIMENTS, 3), token="s3cret")
    host, port = asyncio.run_coroutine_threadsafe(srv.start("127.0.0.1", 0), loop).result(10)
    yield srv, policy, f"ws://{host}:{port}"
    asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def franka_obs(**extra) -> dict:
    spec = EMBODIMENTS["franka"]
    obs = {
        "observation/image": np.full((224, 224, 3), 200, np.uint8),
        "observation/wrist_image": np.zeros((224, 224, 3), np.uint8),  # ignored, as LIBERO sends it
        "observation/state": np.full(spec.proprio_dim, 0.25, np.float64),
        "prompt": "pick up the red cube",
    }
    return obs | extra


def assert_error_then_1011(client: Client, obs_frame: bytes | str, needle: str) -> None:
    client.ws.send(obs_frame)
    message = client.ws.recv()
    assert isinstance(message, str) and needle in message, message
    with pytest.raises(ConnectionClosedError) as info:
        client.ws.recv()
    assert info.value.rcvd.code == 1011


def test_metadata_then_actions_the_openpi_way(server):
    srv, policy, url = server
    client = Client(url + "/franka", api_key="s3cret")
    meta = client.metadata
    assert meta["embodiment"] == "franka" and meta["embodiments"]["franka"]["action_dim"] == 7
    assert meta["embodiments"]["aloha"]["chunk_size"] == 16 and meta["embodiments"]["leap"]["head_version"] == 3
    for _ in range(3):
        reply = client.infer(franka_obs())
        actions = reply["actions"]
        assert actions.shape == (16, 7) and actions.dtype == np.float32 and np.allclose(actions, 0.25)
        assert reply["server_timing"]["infer_ms"] == 1.5 and reply["head_version"] == 3
        assert reply["embodiment"] == "franka" and reply["confidence"]["known"] is False  # one deterministic chunk
    assert "prev_total_ms" in reply["server_timing"]
    client.close()
    req = policy.requests[-1]
    assert req["image"].shape == (64, 64, 3) and req["image"].dtype == np.uint8 and req["image"][32, 32, 0] == 200
    assert req["proprio"].dtype == np.float32 and req["instruction"] == "pick up the red cube"
    assert [r["obs_tick"] for r in policy.requests] == [0, 1, 2] and len({r["robot_id"] for r in policy.requests}) == 1


def test_act_now_answers_without_the_queue_and_none_falls_back_to_it():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    queued, inline = FakePolicy(), []

    def act_now(request: dict) -> dict | None:
        # PolicyServer.act_inline answers a lone robot at once; here every other call must queue
        inline.append(request)
        if len(inline) % 2 == 0:
            return None
        return FakePolicy.answer(request) | {"head_version": 4}

    srv = OpenpiServer(queued.act, EMBODIMENTS, lambda: dict.fromkeys(EMBODIMENTS, 3), act_now=act_now)
    host, port = asyncio.run_coroutine_threadsafe(srv.start("127.0.0.1", 0), loop).result(10)
    try:
        client = Client(f"ws://{host}:{port}/franka")
        versions = [client.infer(franka_obs())["head_version"] for _ in range(4)]
        client.close()
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert versions == [4, 3, 4, 3] and len(inline) == 4 and len(queued.requests) == 2


def test_embodiment_key_numpy_scalars_and_chw_float_images(server):
    _, policy, url = server
    client = Client(url, api_key="s3cret")
    assert client.metadata["embodiment"] is None
    aloha = EMBODIMENTS["aloha"]
    obs = {
        "images": {"cam_high": np.full((3, 48, 64), 0.5, np.float32)},  # ALOHA: channels first, floats
        "state": np.full(aloha.proprio_dim, -0.5, np.float32),
        "prompt": "lift the red bar",
        "embodiment": "aloha",
        "n_samples": np.int64(4),  # a numpy scalar travels as __npgeneric__
    }
    reply = client.infer(obs)
    assert reply["actions"].shape == (16, 14) and np.allclose(reply["actions"], -0.5)
    req = policy.requests[-1]
    assert req["n_samples"] == 4 and req["image"][0, 0].tolist() == [0, 0, 0]  # padded rows are black
    assert req["image"][32, 32].tolist() == [127, 127, 127]
    client.close()


def test_errors_are_a_text_frame_then_1011_and_the_endpoint_keeps_serving(server):
    srv, _, url = server
    cases = [
        (b"\xc1 not msgpack", "frame"),
        ("a text frame", "binary"),
        (msgpack.packb(franka_obs(prompt=""), default=_client_pack), "prompt"),
        (msgpack.packb({"prompt": "x"}, default=_client_pack), "observation/image"),
        (
            msgpack.packb(franka_obs(**{"observation/state": np.zeros(3)}), default=_client_pack),
            "values for franka, got 3",
        ),
        (msgpack.packb(franka_obs(embodiment="hello"), default=_client_pack), "URL path says 'franka'"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"x" * 5, b"dtype": "<f4", b"shape": [2]}), "bytes do not fill"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"x" * 8, b"dtype": "|O", b"shape": [1]}), "dtype"),
        (msgpack.packb(franka_obs(**{"observation/image": np.zeros((8, 8), np.uint8)}), default=_client_pack), "image"),
    ]
    for frame, needle in cases:
        client = Client(url + "/franka", api_key="s3cret")
        assert_error_then_1011(client, frame, needle)
    assert srv.counts["errors"] == len(cases)
    good = Client(url + "/franka", api_key="s3cret")  # still serving
    assert good.infer(franka_obs())["actions"].shape == (16, 7)
    good.close()


def test_token_path_and_health(server):
    srv, _, url = server
    with pytest.raises(InvalidStatus) as info:
        Client(url + "/franka")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        Client(url + "/franka", api_key="wrong")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        Client(url + "/no-such-body", api_key="s3cret")
    assert info.value.response.status_code == 404
    health = url.replace("ws://", "http://") + "/healthz"
    with urllib.request.urlopen(health, timeout=5) as resp:
        assert resp.status == 200
    assert srv.counts["refused"] == 3


def test_connection_limit_refuses_with_503(server):
    srv, _, url = server
    srv.max_connections = 1
    first = Client(url + "/franka", api_key="s3cret")
    with pytest.raises(InvalidStatus) as info:
        Client(url + "/franka", api_key="s3cret")
    assert info.value.response.status_code == 503
    first.close()


def test_wire_round_trip_and_refusals():
    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.float32(1.5), "c": [np.bool_(True)]}
    back = openpi_wire.unpack(openpi_wire.pack(obj))
    assert back["a"].dtype == np.int16 and back["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert isinstance(back["b"], np.float32) and back["b"] == 1.5 and back["c"][0] is np.True_
    for bad in (b"", b"\x93\x01", msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]})):
        try:
            openpi_wire.unpack(bad)
        except ValueError as exc:
            assert str(exc).startswith("frame")
    with pytest.raises(TypeError):
        openpi_wire.pack({"o": np.array([object()])})


def test_resize_with_pad_keeps_the_aspect_and_centres():
    img = np.full((480, 640, 3), 255, np.uint8)  # 4:3 -> 48 rows of content, 8 black rows above and below
    out = openpi_wire.resize_with_pad(img, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    rows = np.flatnonzero(out[:, 32, 0])
    assert rows[0] == 8 and rows[-1] == 55 and (out[:8] == 0).all() and (out[56:] == 0).all()
    tall = openpi_wire.resize_with_pad(np.full((100, 50, 3), 9, np.uint8), 64, 64)
    cols = np.flatnonzero(tall[32, :, 0])
    assert cols[0] == 16 and cols[-1] == 47
    same = np.zeros((64, 64, 3), np.uint8)
    assert openpi_wire.resize_with_pad(same, 64, 64) is same
