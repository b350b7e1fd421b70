"""The act-request wire format: array decoding (lists, base64, raw bytes), validation errors that
name the field, and reply encoding for JSON and msgpack."""

from __future__ import annotations

import base64
import json

import msgpack
import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.protocol import (
    IMAGE_SHAPE,
    RequestError,
    error_field,
    make_request,
    reply_error,
    reply_from_wire,
    reply_to_jsonable,
    reply_to_msgpackable,
    request_to_wire,
    validate_request,
)


def obs(name: str = "franka", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS[name].proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }


def test_ndarray_request_round_trips() -> None:
    o = obs()
    req = validate_request(make_request("r0", "franka", o, obs_tick=3, n_samples=2))
    assert req["image"].dtype == np.uint8 and req["image"].shape == IMAGE_SHAPE
    np.testing.assert_array_equal(req["image"], o["image"])
    assert req["proprio"].dtype == np.float32 and req["obs_tick"] == 3 and req["n_samples"] == 2
    assert req["request_id"] == "r0:3"


def test_decode_nested_lists() -> None:
    o = obs("aloha")
    raw = {"embodiment": "aloha", "image": o["image"].tolist(), "proprio": o["proprio"].tolist(), "instruction": "x"}
    req = validate_request(json.loads(json.dumps(raw)))
    np.testing.assert_array_equal(req["image"], o["image"])
    np.testing.assert_allclose(req["proprio"], o["proprio"])


def test_decode_base64_json() -> None:
    o = obs()
    wire = json.loads(json.dumps(request_to_wire(make_request("r0", "franka", o))))
    assert set(wire["image"]) == {"b64", "shape", "dtype"}
    req = validate_request(wire)
    np.testing.assert_array_equal(req["image"], o["image"])
    np.testing.assert_array_equal(req["proprio"], o["proprio"])
    # the documented minimal form: {"b64", "shape"} with the field's default dtype
    minimal = {"b64": base64.b64encode(o["image"].tobytes()).decode(), "shape": list(IMAGE_SHAPE)}
    np.testing.assert_array_equal(validate_request(wire | {"image": minimal})["image"], o["image"])


def test_decode_raw_bytes_msgpack() -> None:
    o = obs("leap")
    wire = msgpack.unpackb(msgpack.packb(request_to_wire(make_request("r0", "leap", o), binary=True)), raw=False)
    assert isinstance(wire["image"]["data"], bytes)
    req = validate_request(wire)
    np.testing.assert_array_equal(req["image"], o["image"])
    # plain raw bytes (no shape) are taken as the flattened (64, 64, 3) image / float32 proprio
    plain = wire | {"image": o["image"].tobytes(), "proprio": o["proprio"].tobytes()}
    req = validate_request(msgpack.unpackb(msgpack.packb(plain), raw=False))
    np.testing.assert_array_equal(req["image"], o["image"])
    np.testing.assert_array_equal(req["proprio"], o["proprio"])


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"image": {"b64": "!!not base64!!", "shape": [64, 64, 3]}}, "image", "base64"),
        ({"image": b"\x00" * 100}, "image", "shape"),
        ({"image": [[1, 2], [3]]}, "image", "ragged"),
        ({"image": np.full(IMAGE_SHAPE, 300, np.int32)}, "image", "uint8"),
        ({"image": np.full(IMAGE_SHAPE, 0.5)}, "image", "uint8"),
        ({"image": {"b64": base64.b64encode(b"\x00" * 10).decode(), "shape": [64, 64, 3]}}, "image", "fit"),
        ({"image": "a picture"}, "image", "array"),
        ({"proprio": b"\x00" * 7}, "proprio", "whole number"),
        ({"proprio": ["a", "b"]}, "proprio", "numeric"),
        ({"embodiment": None}, "embodiment", "franka"),
        ({"n_samples": True}, "n_samples", "int"),
        ({"instruction": "x" * 1000}, "instruction", "256"),
        ({"request_id": "x" * 1000}, "request_id", "128"),
        ({"image": {"data": b"\x00" * 12, "dtype": "object"}}, "image", "dtype"),
        # numpy's dtype parser raised ValueError on these (a 500 over HTTP), or built a record type
        ({"image": {"data": b"\x00" * 16, "dtype": "(100000000000,)f8"}}, "image", "dtype"),
        ({"image": {"data": b"\x00" * 16, "dtype": "f8,i4"}}, "image", "dtype"),
        ({"image": {"data": b"\x00" * 16, "dtype": "V8"}}, "image", "dtype"),
        ({"image": {"data": b"\x00" * 16, "dtype": 8}}, "image", "dtype"),
        ({"image": {"b64": "AAAA", "shape": [float("inf")]}}, "image", "fit"),
    ],
)
def test_malformed_fields_are_named(patch: dict, field: str, words: str) -> None:
    req = make_request("r0", "franka", obs()) | patch
    with pytest.raises(RequestError, match=words) as info:
        validate_request(req)
    assert str(info.value).startswith(f"{field}:")
    assert error_field(str(info.value)) == field


def test_reply_encodings_round_trip() -> None:
    reply = {
        "chunk": np.ones((16, 7), np.float32),
        "entropy": np.zeros((16, 7), np.float32),
        "n_bins": np.int64(64),
        "head_version": 2,
        "server_timing": {"infer_ms": np.float64(1.5), "batch_size": 3, "replica": "a"},
    }
    as_json = json.loads(json.dumps(reply_to_jsonable(reply)))
    as_msgpack = msgpack.unpackb(msgpack.packb(reply_to_msgpackable(reply)), raw=False)
    for wire in (as_json, as_msgpack):
        back = reply_from_wire(wire)
        np.testing.assert_array_equal(back["chunk"], reply["chunk"])
        assert back["chunk"].dtype == np.float32 and back["n_bins"] == 64
        assert back["server_timing"]["infer_ms"] == 1.5
    assert reply_error(reply) is None and reply_error({"error": "image: bad"}) == "image: bad"
    assert error_field("body: too large") == "body" and error_field("something odd happened") == "request"
