"""One human correction: what the robot saw, what the policy proposed and what the operator commanded.

A correction with no policy proposal (`policy_chunk` None) is a *demonstration*: the operator drove the robot
and no policy proposed anything (a new body's robots in demonstration mode; reason "demo", head_version 0).

`Correction` is the record the replay store keeps; `validate_correction` is the gate every record
passes before it is stored, so a malformed one is refused with an error naming the field.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.validate import check_choice, check_int, is_number

IMAGE_SHAPE: tuple[int, int, int] = (64, 64, 3)
MAX_TEXT = 1024
# longest instruction / id / reason / shift string accepted (bounds what a bad client can make us store)
ACTION_TOLERANCE = 1e-4
# corrected actions may exceed [action_low, action_high] by this share of the range (float32 rounding)


class CorrectionError(ValueError):
    """A malformed correction; the message names the field and what was expected."""


@dataclass(frozen=True, eq=False)
class Correction:
    """One correction. Construction does not validate: pass it through `validate_correction`."""

    id: str
    # unique id chosen by the sender (uuid4 hex); retries reuse it, which is how duplicates are dropped
    robot_id: str
    # the robot actor that produced it
    embodiment: str
    # a name in the embodiment registry
    episode: int
    # the robot's episode counter
    tick: int
    # control tick within the episode at which the observation was taken
    timestamp: float
    # unix seconds when the correction was made
    image: np.ndarray
    # (64, 64, 3) uint8 camera image at `tick`
    proprio: np.ndarray
    # (proprio_dim,) float32 proprioception at `tick`
    instruction: str
    # the task instruction the policy was given
    policy_chunk: np.ndarray | None
    # (chunk_size, action_dim) float32: what the policy proposed, physical units, not range-checked;
    # None for a demonstration: the operator drove, no policy proposed
    corrected_chunk: np.ndarray
    # (chunk_size, action_dim) float32: what the human commanded, inside [action_low, action_high]
    head_version: int
    # version of the action head that produced `policy_chunk` (0 for a demonstration)
    reason: str
    # why the human stepped in: "stray", "help", "demo", ...
    shift: str = ""
    # name of the distribution shift active in the simulator, "" if none

    @classmethod
    def new(cls, **kw: Any) -> Correction:
        """A correction with a fresh uuid4 hex `id` and `timestamp=time.time()` unless given."""
        kw.setdefault("id", uuid.uuid4().hex)
        kw.setdefault("timestamp", time.time())
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins and numpy arrays (what a numpy-only robot actor sends)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any) -> Correction:
        """Build from a dict; missing or unknown keys raise CorrectionError. Values are not yet validated.

        `policy_chunk` is required even for a demonstration, which passes it as None explicitly."""
        if isinstance(d, Correction):
            return d
        if not isinstance(d, dict):
            raise CorrectionError(f"correction: expected a dict or Correction, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise CorrectionError(f"{unknown[0]}: unknown field; expected only {names}")
        required = [f.name for f in fields(cls) if f.name != "shift"]
        missing = [n for n in required if n not in d]
        if missing:
            raise CorrectionError(f"{missing[0]}: missing field")
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        """Exact equality: same values, and arrays of the same dtype, shape and contents (None equals only None)."""
        if not isinstance(other, Correction):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
                    return False
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif type(a) is not type(b) or a != b:
                return False
        return True

    def __hash__(self) -> int:
        return hash(self.id)


def is_demonstration(c: Correction) -> bool:
    """True for a demonstration: the operator drove and no policy proposed anything (`policy_chunk` is None)."""
    return c.policy_chunk is None


def _fail(field: str, expected: str, got: str) -> CorrectionError:
    return CorrectionError(f"{field}: expected {expected}, got {got}")


def _text(c: Correction, field: str, *, allow_empty: bool) -> str:
    value = getattr(c, field)
    if not isinstance(value, str):
        raise _fail(field, "a string", type(value).__name__)
    if not allow_empty and not value.strip():
        raise _fail(field, "a non-empty string", repr(value))
    if len(value) > MAX_TEXT:
        raise _fail(field, f"at most {MAX_TEXT} characters", f"{len(value)}")
    return value


def _count(c: Correction, field: str) -> int:
    value = getattr(c, field)
    if isinstance(value, np.integer):  # a numpy int is an int here (np.bool_ is not one)
        value = int(value)
    return check_int(field, value, lo=0, expected="a non-negative int", error=CorrectionError)


def _array(c: Correction, field: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A finite real array of exactly `shape`, as a read-only float32 copy."""
    value = getattr(c, field)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise _fail(field, f"a float32 array of shape {shape} ({what})", "a ragged sequence") from None
    if arr.dtype.kind not in "fiu":  # bool, complex, object and strings are bugs, not numbers
        raise _fail(field, f"a float32 array of shape {shape} ({what})", f"dtype {arr.dtype}")
    if arr.shape != shape:
        raise _fail(field, f"shape {shape} ({what})", f"shape {tuple(arr.shape)}")
    arr = arr.astype(np.float32)  # always a copy, so later edits by the sender cannot reach the store
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise _fail(field, "finite float32 values", f"{arr[idx]} at index {idx}")
    arr.flags.writeable = False
    return arr


def _image(c: Correction) -> np.ndarray:
    value = c.image
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == math.prod(IMAGE_SHAPE):
        value = np.frombuffer(bytes(value), dtype=np.uint8).reshape(IMAGE_SHAPE)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise _fail("image", f"a uint8 array of shape {IMAGE_SHAPE}", "a ragged sequence") from None
    if arr.shape != IMAGE_SHAPE:
        raise _fail("image", f"a uint8 array of shape {IMAGE_SHAPE}", f"shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        # a list of small ints (JSON) is fine; a float image is a scaling bug (0..1 vs 0..255), refused
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise _fail("image", "uint8 values in [0, 255]", f"dtype {arr.dtype}")
    arr = arr.astype(np.uint8)
    arr.flags.writeable = False
    return arr


def validate_correction(c: Any, specs: dict[str, EmbodimentSpec] | None = None) -> Correction:
    """Return a normalized copy of `c` (a Correction or its dict), or raise CorrectionError naming the field.

    Arrays come back as read-only copies: image (64, 64, 3) uint8, proprio (P,) float32, chunks
    (chunk_size, D) float32. `corrected_chunk` must lie in [action_low, action_high] (tolerance
    ACTION_TOLERANCE of the range); `policy_chunk` need only be finite, since a policy that proposes
    out-of-range actions is exactly what a correction records. A `policy_chunk` of None (a demonstration:
    the operator drove, no policy proposed) is kept as None.
    """
    specs = EMBODIMENTS if specs is None else specs
    c = Correction.from_dict(c)
    ident = _text(c, "id", allow_empty=False)
    robot_id = _text(c, "robot_id", allow_empty=False)
    name = check_choice("embodiment", c.embodiment, sorted(specs), error=CorrectionError)
    spec = specs[name]
    timestamp = c.timestamp
    if not (is_number(timestamp) or isinstance(timestamp, np.integer | np.floating)):
        raise _fail("timestamp", "unix seconds as a float", type(timestamp).__name__)
    if not math.isfinite(float(timestamp)) or float(timestamp) < 0:
        raise _fail("timestamp", "finite non-negative unix seconds", repr(timestamp))
    chunk_shape = (spec.chunk_size, spec.action_dim)
    what = f"chunk_size x action_dim of {name}"
    corrected = _array(c, "corrected_chunk", chunk_shape, what)
    low = np.asarray(spec.action_low, dtype=np.float64)
    high = np.asarray(spec.action_high, dtype=np.float64)
    tol = ACTION_TOLERANCE * (high - low)
    outside = (corrected < low - tol) | (corrected > high + tol)
    if outside.any():
        t, d = (int(i) for i in np.argwhere(outside)[0])
        raise _fail(
            "corrected_chunk",
            f"values in [action_low, action_high] of {name}; dimension {d} ({spec.dim_names[d]}) "
            f"range is [{spec.action_low[d]}, {spec.action_high[d]}]",
            f"{float(corrected[t, d])} at step {t}",
        )
    return replace(
        c,
        id=ident,
        robot_id=robot_id,
        episode=_count(c, "episode"),
        tick=_count(c, "tick"),
        timestamp=float(timestamp),
        image=_image(c),
        proprio=_array(c, "proprio", (spec.proprio_dim,), f"proprio_dim of {name}"),
        instruction=_text(c, "instruction", allow_empty=True),
        policy_chunk=None if c.policy_chunk is None else _array(c, "policy_chunk", chunk_shape, what),
        corrected_chunk=corrected,
        head_version=_count(c, "head_version"),
        reason=_text(c, "reason", allow_empty=False),
        shift=_text(c, "shift", allow_empty=True),
    )


def random_correction(embodiment: str, rng: np.random.Generator, **overrides: Any) -> Correction:
    """A valid correction with random contents (tests, benchmarks, demos); `overrides` replace fields."""
    spec = EMBODIMENTS[embodiment] if isinstance(embodiment, str) and embodiment in EMBODIMENTS else None
    if spec is None:
        raise ValueError(f"unknown embodiment {embodiment!r}; known: {sorted(EMBODIMENTS)}")
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    shape = (spec.chunk_size, spec.action_dim)
    fields_ = {
        "robot_id": f"{embodiment}-0",
        "embodiment": embodiment,
        "episode": int(rng.integers(0, 100)),
        "tick": int(rng.integers(0, 80)),
        "image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "proprio": rng.standard_normal(spec.proprio_dim).astype(np.float32),
        "instruction": f"task {int(rng.integers(0, 4))} for {embodiment}",
        "policy_chunk": rng.uniform(low - 0.5 * (high - low), high + 0.5 * (high - low), shape).astype(np.float32),
        "corrected_chunk": rng.uniform(low, high, shape).astype(np.float32),
        "head_version": 0,
        "reason": "stray",
        "shift": "",
    }
    fields_.update(overrides)
    return Correction.new(**fields_)
