"""Poisoned head payloads for tests: valid safetensors framing around bad metadata, NaN weights or tensors of
the wrong shape, each made from a real `head_to_bytes` payload."""

from __future__ import annotations

import json

import numpy as np


def split(payload: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def with_metadata(payload: bytes, **changes) -> bytes:
    """The payload with metadata keys replaced (any JSON value: the format allows only strings)."""
    header, data = split(payload)
    header["__metadata__"] = header["__metadata__"] | changes
    return join(header, data)


def with_nan(payload: bytes) -> bytes:
    """The payload with the first value of its first float32 tensor set to NaN."""
    header, data = split(payload)
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and v["shape"])
    lo = header[key]["data_offsets"][0]
    data = data[:lo] + np.float32("nan").tobytes() + data[lo + 4 :]
    return join(header, data)


def without_tensor(payload: bytes) -> bytes:
    """The payload with one (non-optional) tensor left out: a head of another architecture."""
    header, data = split(payload)
    key = next(k for k in header if k != "__metadata__" and not k.endswith("word_delta"))
    del header[key]
    return join(header, data)


def poisoned(payload: bytes) -> dict[str, bytes]:
    """Every kind of poisoned payload, by what is wrong with it."""
    meta = split(payload)[0]["__metadata__"]
    return {
        "spec not a string": with_metadata(payload, spec=5),
        "version not a number": with_metadata(payload, version="v2"),
        "spec not JSON": with_metadata(payload, spec="{"),
        "spec of another body": with_metadata(payload, spec=meta["spec"].replace(f'"{meta["embodiment"]}"', '"x"')),
        "NaN weights": with_nan(payload),
        "missing tensor": without_tensor(payload),
        "truncated": payload[: len(payload) // 2],
    }
