"""The policy server's wire format: act requests and replies, validated on the way in; and the records
that cross the Ray boundary between robots and the learner (`EpisodeOutcome`).

numpy only, so robot actors (which never import torch) and the HTTP ingress share it with the
server. A request is a plain dict; arrays travel as compact numpy arrays inside Ray, and as
base64 (JSON) or raw bytes (msgpack) over HTTP.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.validate import check_bool, check_int, check_number, check_str, fail, is_int

IMAGE_SHAPE = (64, 64, 3)
MAX_SAMPLES = 32
MAX_INSTRUCTION = 256
MAX_ID = 128


class RequestError(ValueError):
    """A malformed act request; the message names the field and what was expected."""


def make_request(
    robot_id: str,
    embodiment: str,
    obs: dict,
    obs_tick: int = 0,
    n_samples: int = 1,
    request_id: str | None = None,
    prefix: np.ndarray | None = None,
    prefix_delay: int | None = None,
) -> dict:
    """Build an act request from a simulator observation.

    prefix (n, D) float32 physical units, optional (real-time chunking): the robot's current plan for ticks
    obs_tick, obs_tick + 1, ...; prefix_delay (default n) of them will execute before the reply can arrive.
    The server then returns a chunk that continues them (`ActionBuffer.request_prefix` provides both)."""
    req = {
        "robot_id": robot_id,
        "embodiment": embodiment,
        "image": obs["image"],
        "proprio": obs["proprio"],
        "instruction": obs["instruction"],
        "obs_tick": int(obs_tick),
        "n_samples": int(n_samples),
        "request_id": request_id or f"{robot_id}:{obs_tick}",
    }
    if prefix is not None:
        req["prefix"] = np.asarray(prefix, np.float32)
        req["prefix_delay"] = len(req["prefix"]) if prefix_delay is None else int(prefix_delay)
    return req


def check_prefix(spec: EmbodimentSpec, prefix: Any, delay: Any = None) -> tuple[np.ndarray, int]:
    """A request's committed prefix for `spec`: -> (actions (n, D) float32 finite, 1 <= n <= chunk_size;
    delay an int in [0, n], None meaning n). Raises RequestError naming `prefix` or `prefix_delay`."""
    arr = _decode_array(prefix, "prefix", np.float32)
    if arr.dtype.kind not in "uif":
        raise RequestError(f"prefix: expected float32 values, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim != 2 or arr.shape[1] != spec.action_dim or not 1 <= arr.shape[0] <= spec.chunk_size:
        raise RequestError(
            f"prefix: expected shape (n, {spec.action_dim}) with 1 <= n <= {spec.chunk_size} for {spec.name}, "
            f"got {tuple(arr.shape)}"
        )
    if not np.isfinite(arr).all():
        raise RequestError("prefix: expected finite values (no NaN/inf)")
    n = arr.shape[0]
    delay = n if delay is None else delay
    if not _whole(delay) or not 0 <= delay <= n:
        raise RequestError(f"prefix_delay: expected an int in [0, {n}] (the prefix has {n} actions), got {delay!r}")
    return np.ascontiguousarray(arr), int(delay)


def _decode_array(value: Any, field: str, dtype) -> np.ndarray:
    """Accept an ndarray, a nested list, raw bytes (msgpack), {"b64": ..., "shape": ...} (JSON) or
    {"data": bytes, "shape": ..., "dtype": ...} (msgpack). Anything else raises RequestError naming `field`."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(value), field, dtype, None)
    if isinstance(value, dict) and ("b64" in value or "data" in value):
        if "b64" in value:
            try:
                raw = base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise RequestError(f"{field}: 'b64' is not valid base64") from exc
        else:
            raw = value["data"]
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise RequestError(f"{field}: 'data' must be raw bytes, got {type(raw).__name__}")
            raw = bytes(raw)
        if "dtype" in value:
            dtype = _wire_dtype(value["dtype"], field)
        return _from_bytes(raw, field, dtype, value.get("shape"))
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"{field}: expected a numeric array, got a ragged or non-numeric list") from exc
        if arr.dtype.kind not in "uifb" or arr.dtype.kind == "b":
            raise RequestError(f"{field}: expected a numeric array, got a list of {arr.dtype.kind!r}-kind values")
        return arr
    raise RequestError(f"{field}: expected an array, got {type(value).__name__}")


def _wire_dtype(name: Any, field: str) -> np.dtype:
    """A plain numeric dtype named by a short string ("<f4", "uint8"); numpy's dtype parser is never handed
    anything longer or stranger (a "(100000000000,)f8" made it raise where a caller expected a RequestError)."""
    expected = "a numeric dtype such as '<f4' or 'uint8'"
    if not isinstance(name, str) or not 0 < len(name) <= 12 or not name.lstrip("<>|=").isalnum():
        raise RequestError(f"{field}: dtype must be {expected}, got {str(name)[:40]!r}")
    try:
        wire = np.dtype(name)
    except Exception as exc:  # noqa: BLE001 - numpy raises TypeError, ValueError and others on odd names
        raise RequestError(f"{field}: dtype must be {expected}, got {name!r}") from exc
    if wire.kind not in "uif" or wire.subdtype is not None or wire.fields is not None:
        raise RequestError(f"{field}: dtype must be {expected}, got {name!r}")
    return wire


def _from_bytes(raw: bytes, field: str, dtype, shape: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if len(raw) % dtype.itemsize:
        raise RequestError(f"{field}: {len(raw)} bytes is not a whole number of {dtype.name} values")
    arr = np.frombuffer(raw, dtype=dtype)
    if shape is not None:
        try:
            arr = arr.reshape([int(s) for s in shape])
        except (ValueError, TypeError, OverflowError) as exc:
            raise RequestError(f"{field}: {arr.size} values do not fit shape {shape}") from exc
    return arr


def _whole(value: Any) -> bool:
    """An int (numpy's too: requests decoded from msgpack or built from arrays carry them), never a bool."""
    return is_int(value) or isinstance(value, np.integer)


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
        numeric = image.size and image.dtype.kind in "uif"
        if numeric and np.all((image >= 0) & (image <= 255)) and np.all(np.mod(image, 1) == 0):
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
    if not _whole(n_samples) or not 1 <= n_samples <= MAX_SAMPLES:
        raise RequestError(f"n_samples: expected an int in [1, {MAX_SAMPLES}], got {n_samples!r}")
    obs_tick = req.get("obs_tick", 0)
    if not _whole(obs_tick) or obs_tick < 0:
        raise RequestError(f"obs_tick: expected a non-negative int, got {obs_tick!r}")
    for key in ("robot_id", "request_id"):
        value = req.get(key, "")
        if not isinstance(value, (str, int)) or isinstance(value, bool) or len(str(value)) > MAX_ID:
            raise RequestError(f"{key}: expected a string of at most {MAX_ID} characters, got {type(value).__name__}")
    prefix = delay = None
    if req.get("prefix") is not None:
        prefix, delay = check_prefix(spec, req["prefix"], req.get("prefix_delay"))
    elif req.get("prefix_delay") is not None:
        raise RequestError("prefix_delay: given without a prefix (send both, or neither)")
    return {
        "robot_id": str(req.get("robot_id", "")),
        "embodiment": name,
        "image": np.ascontiguousarray(image),
        "proprio": proprio,
        "instruction": instruction,
        "obs_tick": int(obs_tick),
        "n_samples": int(n_samples),
        "request_id": str(req.get("request_id", "")),
        "prefix": prefix,  # None, or (n, D) float32: the committed plan (real-time chunking)
        "prefix_delay": delay,  # None, or an int in [0, n]
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


# ----- wire helpers (HTTP clients and the ingress) ---------------------------------------------------
REPLY_ARRAYS = ("chunk", "features", "entropy", "probs", "samples")
# reply keys that hold float32 arrays; `reply_from_wire` turns them back into numpy


def reply_error(reply: dict) -> str | None:
    """The rejection message of an error reply (`{"error": "<field>: <problem>", ...}`), else None."""
    err = reply.get("error") if isinstance(reply, dict) else "reply: expected a dict"
    return None if err is None else str(err)


def error_field(message: str) -> str:
    """The field an error message names: the text before the first ':' ("image: expected ..." -> "image")."""
    head, sep, _ = str(message).partition(":")
    return head.strip() if sep and head.strip() and " " not in head.strip() else "request"


def _array_to_wire(arr: np.ndarray, binary: bool) -> dict:
    arr = np.ascontiguousarray(arr)
    data = arr.tobytes()
    payload = data if binary else base64.b64encode(data).decode("ascii")
    return {"data" if binary else "b64": payload, "shape": list(arr.shape), "dtype": arr.dtype.str}


def request_to_wire(request: dict, binary: bool = False) -> dict:
    """An act request with numpy arrays made portable: {"b64", "shape", "dtype"} for JSON (binary=False),
    {"data": raw bytes, "shape", "dtype"} for msgpack (binary=True). Other values are kept."""
    out = {}
    for k, v in request.items():
        if isinstance(v, np.ndarray):
            out[k] = _array_to_wire(v, binary)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def reply_to_msgpackable(reply: dict) -> dict:
    """Replace numpy arrays by {"data": raw bytes, "shape", "dtype"} so a reply packs compactly with msgpack."""
    out = {}
    for k, v in reply.items():
        if isinstance(v, np.ndarray):
            out[k] = _array_to_wire(v, binary=True)
        elif isinstance(v, dict):
            out[k] = reply_to_msgpackable(v)
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def reply_from_wire(reply: dict) -> dict:
    """Inverse of `reply_to_jsonable` / `reply_to_msgpackable`: the REPLY_ARRAYS keys become float32 numpy."""
    out = dict(reply)
    for k in REPLY_ARRAYS:
        if k in out and out[k] is not None:
            out[k] = _decode_array(out[k], k, np.float32).astype(np.float32, copy=False)
    return out


# ---- episode outcomes: robot -> learner ----------------------------------------------------------
@dataclass(frozen=True)
class EpisodeOutcome:
    """One finished episode of one robot, as the learner judges a head's rollout by it. It crosses Ray as
    `to_dict()` and becomes a record again with `from_dict`, which validates every field (ValueError
    naming it)."""

    robot_id: str
    embodiment: str
    episode: int
    success: bool
    head_version: int | None
    # the one head version every chunk of the episode came from; None when it ran two (a swap mid-episode)
    # or none (it held throughout): such an episode says nothing about one version
    head_versions: tuple[int, ...] = ()
    interventions: int = 0
    ticks: int = 0
    shift: str = ""
    t: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_versions"] = list(self.head_versions)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EpisodeOutcome:
        if not isinstance(d, dict):
            fail("outcome", "a mapping", type(d).__name__)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            fail("outcome", "only EpisodeOutcome fields", unknown)
        f = "outcome."
        version = d.get("head_version")
        versions = d.get("head_versions", ())
        if not isinstance(versions, (list, tuple)) or not all(is_int(v) for v in versions):
            fail(f + "head_versions", "a list of ints", versions)
        return cls(
            robot_id=check_str(f + "robot_id", d.get("robot_id")),
            embodiment=check_str(f + "embodiment", d.get("embodiment")),
            episode=check_int(f + "episode", d.get("episode"), lo=0),
            success=check_bool(f + "success", d.get("success")),
            head_version=None if version is None else check_int(f + "head_version", version, lo=0),
            head_versions=tuple(versions),
            interventions=check_int(f + "interventions", d.get("interventions", 0), lo=0),
            ticks=check_int(f + "ticks", d.get("ticks", 0), lo=0),
            shift=check_str(f + "shift", d.get("shift", ""), nonempty=False),
            t=check_number(f + "t", d.get("t", 0.0), lo=0),
        )
