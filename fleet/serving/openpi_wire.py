"""openpi's wire format and observation mapping, without a server: numpy over msgpack, and an openpi
observation turned into a fleet act request.

openpi-client (`openpi_client.msgpack_numpy`) sends numpy arrays as msgpack maps with byte-string keys
`{b"__ndarray__": True, b"data": raw bytes, b"dtype": "<f4", b"shape": [..]}` and numpy scalars as
`{b"__npgeneric__": True, b"data": value, b"dtype": ".."}`; `pack` / `unpack` here speak the same. Decoding
never unpickles: only bool, integer and float dtypes are accepted, and the bytes must fill the shape exactly.

The observation mapping (`observation_to_request`), documented in the README:

    fleet field   openpi keys, the first present wins
    embodiment    the URL path (`ws://host:8001/franka`), else the `embodiment` key
    image         `observation/image` (LIBERO), `image`, `observation/exterior_image_1_left` (DROID),
                  `images` (a camera dict: `cam_high` (ALOHA), `base_0_rgb`, else its first value)
    proprio       `observation/state`, `state`, or DROID's `observation/joint_position` + `gripper_position`
    instruction   `prompt`, `instruction`
    n_samples     `n_samples` (optional; flow heads draw that many, and the confidence reads their spread)

An image may be any size, H x W x 3 or 3 x H x W, uint8 or float in [0, 1] (scaled by 255 as openpi's
`convert_to_uint8` does); it is resized to the policy's 64 x 64 keeping its aspect ratio and padded with
black (`resize_with_pad`, the geometry of openpi's `image_tools.resize_with_pad`: PIL bilinear, centred).
Other keys (wrist cameras, ...) are ignored.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from fleet.embodiments import EmbodimentSpec
from fleet.protocol import IMAGE_SHAPE, MAX_INSTRUCTION, MAX_SAMPLES

NUMERIC_KINDS = "biuf"
# dtypes a peer may send: bool, signed/unsigned integers, floats (never object or void: those would need pickle)
MAX_ARRAY_BYTES = 64 << 20
MAX_IMAGE_SIDE = 4096

IMAGE_KEYS = ("observation/image", "image", "observation/exterior_image_1_left", "images")
CAMERA_KEYS = ("cam_high", "base_0_rgb")
STATE_KEYS = ("observation/state", "state")
DROID_STATE = ("observation/joint_position", "observation/gripper_position")
PROMPT_KEYS = ("prompt", "instruction")


class ObservationError(ValueError):
    """An openpi observation the fleet cannot serve; the message names the key and what was expected."""


# ---- numpy over msgpack ---------------------------------------------------------------------------
def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack with numpy arrays and scalars as openpi-client encodes them."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _wire_dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or len(value) > 16:
        raise ValueError(f"dtype: expected a numpy dtype string such as '<f4', got {value!r}")
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError(f"dtype: unknown numpy dtype {value!r}") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.itemsize == 0:
        raise ValueError(f"dtype: expected a bool, integer or float dtype, got {value!r}")
    return dtype


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _wire_dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise ValueError(f"ndarray data: expected raw bytes, got {type(data).__name__}")
        if not isinstance(shape, (list, tuple)) or len(shape) > 8:
            raise ValueError(f"ndarray shape: expected a list of at most 8 sizes, got {shape!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"ndarray shape: expected non-negative ints, got {shape!r}")
        if math.prod(shape) * dtype.itemsize != len(data):
            raise ValueError(f"ndarray: {len(data)} bytes do not fill shape {list(shape)} of {dtype.str}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype, data = _wire_dtype(obj.get(b"dtype")), obj.get(b"data")
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            if not (dtype.kind == "b" and isinstance(data, bool)):
                raise ValueError(f"npgeneric data: expected a number, got {type(data).__name__}")
        try:
            return dtype.type(data)
        except (OverflowError, ValueError):
            raise ValueError(f"npgeneric: {data!r} does not fit {dtype.str}") from None
    return obj


def unpack(frame: bytes) -> Any:
    """Inverse of `pack`. ValueError (saying what is wrong) for anything that is not such msgpack."""
    try:
        return msgpack.unpackb(
            frame, object_hook=_unpack_hook, raw=False, strict_map_key=False, max_bin_len=MAX_ARRAY_BYTES
        )
    except ValueError as exc:
        raise ValueError(f"frame: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises assorted errors on garbage
        raise ValueError(f"frame: not msgpack ({type(exc).__name__}: {exc})") from None


# ---- images -----------------------------------------------------------------------------------
def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """image (H, W, 3) uint8 -> (height, width, 3) uint8: scaled to fit without distortion (bilinear), centred,
    the rest black. The geometry of tf.image.resize_with_pad as openpi's image_tools computes it: ratio =
    max(W / width, H / height), new size = int(side / ratio), offsets int((target - new) / 2)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    new_h, new_w = max(1, int(h / ratio)), max(1, int(w / ratio))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _first(obs: dict, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in obs:
            return key, obs[key]
    return None, None


def to_policy_image(value: Any, key: str) -> np.ndarray:
    """Any H x W x 3 / 3 x H x W uint8 or [0, 1] float image -> the policy's (64, 64, 3) uint8."""
    if isinstance(value, dict):  # `images`: a camera dict
        cam, image = _first(value, CAMERA_KEYS)
        if cam is None and value:
            cam, image = next(iter(value.items()))
        if cam is None:
            raise ObservationError(f"{key}: an empty camera dict")
        return to_policy_image(image, f"{key}/{cam}")
    if not isinstance(value, np.ndarray):
        raise ObservationError(f"{key}: expected an image array (H, W, 3), got {type(value).__name__}")
    img = value
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.moveaxis(img, 0, -1)  # channels first (openpi's ALOHA runtime sends (3, H, W))
    if (
        img.ndim != 3
        or img.shape[-1] != 3
        or not (0 < img.shape[0] <= MAX_IMAGE_SIDE and 0 < img.shape[1] <= MAX_IMAGE_SIDE)
    ):
        raise ObservationError(
            f"{key}: expected shape (H, W, 3) or (3, H, W) with sides <= {MAX_IMAGE_SIDE}, got {value.shape}"
        )
    if img.dtype.kind == "f":
        if not np.isfinite(img).all():
            raise ObservationError(f"{key}: non-finite pixel values")
        img = (255 * np.clip(img, 0.0, 1.0)).astype(np.uint8)  # openpi's convert_to_uint8 (clipped: no wrap-around)
    elif img.dtype != np.uint8:
        raise ObservationError(f"{key}: expected uint8 or float pixels, got dtype {img.dtype}")
    return resize_with_pad(np.ascontiguousarray(img), IMAGE_SHAPE[0], IMAGE_SHAPE[1])


# ---- observation -> act request -----------------------------------------------------------------
def _state(obs: dict, spec: EmbodimentSpec) -> np.ndarray:
    key, value = _first(obs, STATE_KEYS)
    if key is None and all(k in obs for k in DROID_STATE):
        key = "+".join(DROID_STATE)
        parts = [np.asarray(obs[k]).reshape(-1) if isinstance(obs[k], np.ndarray | list | float | int) else None
                 for k in DROID_STATE]  # fmt: skip
        if any(p is None for p in parts):
            raise ObservationError(f"{key}: expected numeric arrays")
        value = np.concatenate(parts)
    if key is None:
        raise ObservationError(f"observation/state: missing (expected {spec.proprio_dim} floats for {spec.name})")
    if isinstance(value, list | tuple):
        try:
            value = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            raise ObservationError(f"{key}: expected numbers, got a ragged or non-numeric list") from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise ObservationError(
            f"{key}: expected a numeric array of {spec.proprio_dim} values, got {type(value).__name__}"
        )
    state = value.astype(np.float32).reshape(-1)
    if state.shape != (spec.proprio_dim,):
        raise ObservationError(f"{key}: expected {spec.proprio_dim} values for {spec.name}, got {state.size}")
    if not np.isfinite(state).all():
        raise ObservationError(f"{key}: non-finite value at index {int(np.flatnonzero(~np.isfinite(state))[0])}")
    return state


def observation_to_request(
    obs: Any, specs: dict[str, EmbodimentSpec], path_embodiment: str | None, robot_id: str, tick: int
) -> dict:
    """An openpi observation dict -> a fleet act request (fleet.protocol); ObservationError naming the key."""
    if not isinstance(obs, dict):
        raise ObservationError(f"observation: expected a msgpack map, got {type(obs).__name__}")
    name = obs.get("embodiment", path_embodiment)
    if path_embodiment is not None and name != path_embodiment:
        raise ObservationError(f"embodiment: the URL path says {path_embodiment!r}, the observation {name!r}")
    if not isinstance(name, str) or name not in specs:
        raise ObservationError(
            f"embodiment: expected one of {sorted(specs)} (URL path /<name> or an 'embodiment' key), got {name!r}"
        )
    spec = specs[name]
    key, image = _first(obs, IMAGE_KEYS)
    if key is None:
        raise ObservationError(f"observation/image: missing (one of {list(IMAGE_KEYS)}: an (H, W, 3) image)")
    _, prompt = _first(obs, PROMPT_KEYS)
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_INSTRUCTION:
        raise ObservationError(f"prompt: expected a non-empty string of at most {MAX_INSTRUCTION} characters")
    n_samples = obs.get("n_samples", 1)
    if isinstance(n_samples, np.integer):
        n_samples = int(n_samples)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not 1 <= n_samples <= MAX_SAMPLES:
        raise ObservationError(f"n_samples: expected an int in [1, {MAX_SAMPLES}], got {n_samples!r}")
    return {
        "robot_id": robot_id,
        "embodiment": name,
        "image": to_policy_image(image, key),
        "proprio": _state(obs, spec),
        "instruction": prompt,
        "obs_tick": int(tick),
        "n_samples": n_samples,
        "request_id": f"{robot_id}:{tick}",
    }
