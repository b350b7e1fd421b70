"""Checking a head payload before anyone installs it (no torch, no Ray): the registry runs it before it
accepts a version, every replica again before it installs one.

A head payload is safetensors bytes written by `fleet.policy.checkpoint.head_to_bytes`. The checks read the
JSON header and the raw tensor bytes with numpy, executing nothing: the metadata has the expected keys, each
a string of the expected form (the safetensors format allows only strings, a hand-made header need not
comply), the tensors are floating point with sane offsets, every value is finite, and, when a reference is
given (the head the payload replaces), the tensor names and shapes are the same.

    info = check_head_payload(payload, "franka", reference=previous_info)
    info["version"], info["tensors"]      # 3, {"net.0.weight": (256, 512), ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

HEAD_FORMAT = "fleet-head"
# fleet.policy.checkpoint.HEAD_FORMAT (kept here so the registry imports no torch)
FORMAT_VERSION = "1"
DTYPES = {"F16": (np.float16, 2), "BF16": (np.uint16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8)}
# weights are floating point; bfloat16 is read as its raw 16 bits (numpy has no bfloat16)
OPTIONAL_SUFFIX = "word_delta"
# tensors a payload may lack (fleet.policy.checkpoint fills them with zeros)
MAX_HEADER = 1 << 20
MAX_TENSORS = 4096


class HeadPayloadError(ValueError):
    """A head payload nobody may install; the message names what is wrong."""


def _fail(name: str, what: str) -> HeadPayloadError:
    return HeadPayloadError(f"head payload for {name!r}: {what}")


def read_header(payload: bytes, name: str) -> tuple[dict, int]:
    """(the header JSON object, where the data section starts)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _fail(name, f"expected safetensors bytes, got {type(payload).__name__}")
    payload = memoryview(payload)
    if len(payload) < 8:
        raise _fail(name, f"{len(payload)} bytes, too short to be safetensors")
    n = int.from_bytes(payload[:8], "little")
    if not 2 <= n <= min(MAX_HEADER, len(payload) - 8):
        raise _fail(name, f"header length {n} does not fit a {len(payload)}-byte payload")
    try:
        header = json.loads(bytes(payload[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise _fail(name, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _fail(name, f"header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def check_metadata(meta: object, name: str) -> int:
    """The metadata's version; raises naming the first key that is missing or of the wrong form."""
    if not isinstance(meta, dict):
        raise _fail(name, f"__metadata__ must be an object of strings, got {type(meta).__name__}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _fail(name, f"metadata {key!r} must be a string, got {type(value).__name__}")
    if meta.get("format") != HEAD_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _fail(name, f"metadata format must be {HEAD_FORMAT!r} v{FORMAT_VERSION}, got {meta.get('format')!r}")
    if meta.get("embodiment") != name:
        raise _fail(name, f"metadata embodiment is {meta.get('embodiment')!r}, not {name!r}")
    version = meta.get("version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 12):
        raise _fail(name, f"metadata version must be a whole number, got {version!r}")
    for key in ("spec", "config"):
        try:
            value = json.loads(meta.get(key, ""))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise _fail(name, f"metadata {key!r} must be a JSON object")
    if json.loads(meta["spec"]).get("name") != name:
        raise _fail(name, f"metadata spec is for {json.loads(meta['spec']).get('name')!r}, not {name!r}")
    return int(version)


def check_head_payload(
    payload: bytes, name: str, spec: Mapping | None = None, reference: Mapping | None = None
) -> dict:
    """{"version", "spec", "tensors": {key: shape}} of a payload fit to install as head `name`, else
    HeadPayloadError.

    `spec`: the embodiment's spec dict (EmbodimentSpec.to_dict()); the payload's must equal it. `reference`:
    this function's answer for the head it replaces; the payload's spec, tensor names and shapes must equal it."""
    header, start = read_header(payload, name)
    meta = header.pop("__metadata__", None)
    version = check_metadata(meta, name)
    stored = json.loads(meta["spec"])
    if reference is not None and spec is None:
        spec = reference["spec"]
    if spec is not None:
        for key in sorted(set(stored) | set(spec)):
            if stored.get(key) != _jsonish(spec.get(key)):
                raise _fail(name, f"spec field {key!r} is {stored.get(key)!r}, the model's is {spec.get(key)!r}")
    if not header or len(header) > MAX_TENSORS:
        raise _fail(name, f"expected 1..{MAX_TENSORS} tensors, got {len(header)}")
    data = memoryview(payload)[start:]
    shapes: dict[str, tuple[int, ...]] = {}
    spans = []
    for key, entry in header.items():
        shapes[key] = shape = _check_entry(key, entry, len(data), name)
        dtype, size = DTYPES[entry["dtype"]]
        lo, hi = entry["data_offsets"]
        spans.append((lo, hi, key))
        values = np.frombuffer(data[lo:hi], dtype=dtype)
        finite = (values & 0x7F80) != 0x7F80 if entry["dtype"] == "BF16" else np.isfinite(values)
        if not finite.all():
            bad = int(np.count_nonzero(~finite))
            raise _fail(
                name, f"tensor {key!r} {list(shape)} holds {bad} NaN or infinite values; weights must be finite"
            )
    spans.sort()
    for (_, hi, a), (lo, _, b) in zip(spans, spans[1:], strict=False):
        if lo < hi:
            raise _fail(name, f"tensors {a!r} and {b!r} overlap in the data section")
    if reference is not None:
        ref = reference["tensors"]
        # a head written before heads had word adapters lacks their tables (the loader fills in zeros): either
        # side may lack them
        missing = sorted(k for k in set(ref) - set(shapes) if not k.endswith(OPTIONAL_SUFFIX))
        extra = sorted(k for k in set(shapes) - set(ref) if not k.endswith(OPTIONAL_SUFFIX))
        if missing or extra:
            raise _fail(name, f"tensors differ from the current head's: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, want in ref.items():
            if key in shapes and tuple(want) != shapes[key]:
                raise _fail(name, f"tensor {key!r} has shape {list(shapes[key])}, the current head's is {list(want)}")
    return {"version": version, "spec": stored, "tensors": shapes}


def _jsonish(value: object) -> object:
    """A spec value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _check_entry(key: str, entry: object, data_len: int, name: str) -> tuple[int, ...]:
    if not isinstance(entry, dict):
        raise _fail(name, f"tensor {key!r}: header entry must be an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise _fail(name, f"tensor {key!r}: dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(name, f"tensor {key!r}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise _fail(name, f"tensor {key!r}: data_offsets {offsets!r} outside the {data_len}-byte data section")
    want = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != want:
        raise _fail(name, f"tensor {key!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} ({want})")
    return tuple(shape)
