"""The policy server's wire format: act requests and replies, validated on the way in.

numpy only, so robot actors (which never import torch) and the HTTP ingress share it with the
server. A request is a plain dict; arrays travel as compact numpy arrays inside Ray, and as
base64 (JSON) or raw bytes (msgpack) over HTTP.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from fleet.embodiments import EMBODIMENTS, EmbodimentSpec

IMAGE_SHAPE = (64, 64, 3)
MAX_SAMPLES = 32
MAX_INSTRUCTION = 256


class RequestError(ValueError):
    """A malformed act request; the message names the field and what was expected."""


def make_request(
    robot_id: str,
    embodiment: str,
    obs: dict,
    obs_tick: int = 0,
    n_samples: int = 1,
    request_id: str | None = None,
) -> dict:
    """Build an act request from a simulator observation."""
    return {
        "robot_id": robot_id,
        "embodiment": embodiment,
        "image": obs["image"],
        "proprio": obs["proprio"],
        "instruction": obs["instruction"],
        "obs_tick": int(obs_tick),
        "n_samples": int(n_samples),
        "request_id": request_id or f"{robot_id}:{obs_tick}",
    }


def _decode_array(value: Any, field: str, dtype) -> np.ndarray:
    """Accept an ndarray, a nested list, raw bytes (msgpack) or {"b64": ..., "shape": ...} (JSON)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(value), dtype=dtype)
    if isinstance(value, dict) and "b64" in value:
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"{field}: 'b64' is not valid base64") from exc
        arr = np.frombuffer(raw, dtype=dtype)
        if "shape" in value:
            try:
                arr = arr.reshape([int(s) for s in value["shape"]])
            except (ValueError, TypeError) as exc:
                raise RequestError(f"{field}: {arr.size} values do not fit shape {value['shape']}") from exc
        return arr
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"{field}: expected a numeric array, got a ragged or non-numeric list") from exc
    raise RequestError(f"{field}: expected an array, got {type(value).__name__}")


def validate_request(req: Any, specs: dict[str, EmbodimentSpec] | None = None) -> dict:
    """Return a normalized copy of `req` (image uint8 (64,64,3), proprio float32 (P,)), or raise RequestError."""
    specs = EMBODIMENTS if specs is None else specs
    if not isinstance(req, dict):
        raise RequestError(f"request: expected an object/dict, got {type(req).__name__}")
    name = req.get("embodiment")
    if not isinstance(name, str) or name not in specs:
        raise RequestError(f"embodiment: expected one of {sorted(specs)}, got {name!r}")
    spec = specs[name]
    if "image" not in req:
        raise RequestError("image: missing (expected uint8 array of shape (64, 64, 3))")
    image = _decode_array(req["image"], "image", np.uint8)
    if image.dtype != np.uint8:
        if image.size and np.issubdtype(image.dtype, np.number) and np.all((image >= 0) & (image <= 255)):
            image = image.astype(np.uint8)
        else:
            raise RequestError(f"image: expected uint8 values in [0, 255], got dtype {image.dtype}")
    if image.size == math.prod(IMAGE_SHAPE) and image.ndim == 1:
        image = image.reshape(IMAGE_SHAPE)
    if image.shape != IMAGE_SHAPE:
        raise RequestError(f"image: expected shape {IMAGE_SHAPE}, got {tuple(image.shape)}")
    if "proprio" not in req:
        raise RequestError(f"proprio: missing (expected {spec.proprio_dim} floats for {name})")
    proprio = _decode_array(req["proprio"], "proprio", np.float32).astype(np.float32, copy=False).reshape(-1)
    if proprio.shape != (spec.proprio_dim,):
        raise RequestError(f"proprio: expected {spec.proprio_dim} floats for {name}, got shape {proprio.shape}")
    if not np.isfinite(proprio).all():
        raise RequestError(f"proprio: non-finite value at index {int(np.flatnonzero(~np.isfinite(proprio))[0])}")
    instruction = req.get("instruction", "")
    if not isinstance(instruction, str) or not instruction.strip() or len(instruction) > MAX_INSTRUCTION:
        raise RequestError(f"instruction: expected a non-empty string of at most {MAX_INSTRUCTION} characters")
    n_samples = req.get("n_samples", 1)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or not 1 <= n_samples <= MAX_SAMPLES:
        raise RequestError(f"n_samples: expected an int in [1, {MAX_SAMPLES}], got {n_samples!r}")
    obs_tick = req.get("obs_tick", 0)
    if isinstance(obs_tick, bool) or not isinstance(obs_tick, (int, np.integer)) or obs_tick < 0:
        raise RequestError(f"obs_tick: expected a non-negative int, got {obs_tick!r}")
    return {
        "robot_id": str(req.get("robot_id", "")),
        "embodiment": name,
        "image": np.ascontiguousarray(image),
        "proprio": proprio,
        "instruction": instruction,
        "obs_tick": int(obs_tick),
        "n_samples": int(n_samples),
        "request_id": str(req.get("request_id", "")),
    }


def reply_to_jsonable(reply: dict) -> dict:
    """Replace numpy arrays by nested lists so a reply can be sent as JSON."""
    out = {}
    for k, v in reply.items():
        if isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, dict):
            out[k] = reply_to_jsonable(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out
