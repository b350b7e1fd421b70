"""A body added after pretraining travels as one head payload: spec, token row, stem and head together.

    payload = head_to_bytes(model, "so100", version=1)     # on the learner (fleet.policy.checkpoint)
    spec, version = add_body_from_payload(replica_model, payload)

A server that has never heard of the body builds its parts from the payload's own spec (nothing else is needed:
no restart, no new checkpoint), then later versions arrive as ordinary head swaps. `add_to_runtime` does it for
a live `PolicyRuntime` without pausing the other bodies' batches for more than the install itself.
"""

from __future__ import annotations

import json

from fleet.embodiments import EmbodimentSpec
from fleet.policy.checkpoint import HEAD_FORMAT, _read_header_metadata, head_from_bytes


def spec_from_payload(payload: bytes) -> EmbodimentSpec:
    """The embodiment spec stored in a head payload's metadata (validated), or ValueError naming the problem."""
    meta = _read_header_metadata(bytes(payload))
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"head payload: not a {HEAD_FORMAT} payload ({meta.get('format')!r})")
    try:
        spec = EmbodimentSpec.from_dict(json.loads(meta["spec"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"head payload: metadata field 'spec' is not a valid embodiment spec ({exc})") from None
    if spec.name != meta.get("embodiment"):
        raise ValueError(f"head payload: spec {spec.name!r} does not match embodiment {meta.get('embodiment')!r}")
    return spec


def add_body_from_payload(model, payload: bytes) -> tuple[EmbodimentSpec, int]:
    """Add the payload's body to `model` and load its weights; returns (spec, version). All or nothing: a payload
    that does not fit leaves the model without the body."""
    spec = spec_from_payload(payload)
    model.add_embodiment(spec)
    try:
        version = head_from_bytes(model, spec.name, bytes(payload))
    except Exception:
        model.remove_embodiment(spec.name)
        raise
    return spec, version


def add_to_runtime(runtime, payload: bytes) -> tuple[str, int]:
    """Serve a new body on a live PolicyRuntime (fleet.serving.runtime): master model, backend and request routing.

    Under the runtime's swap and forward locks, so no batch sees half a body: requests for it are refused as an
    unknown embodiment until this returns, then served. Other bodies' batches wait only for the install (a
    head's tensors; on the ONNX backend also the head's export, seconds)."""
    spec = spec_from_payload(payload)
    with runtime._swap_lock, runtime._lock:
        model = runtime.model
        if spec.name in model.specs:
            raise ValueError(f"add_embodiment: {spec.name!r} is already served; publish a new version instead")
        token_id = model.vocab.token_id(spec.token) if spec.token in model.vocab else len(model.vocab)
        # routing first (harmless until the spec is known), so a request validated against the new spec finds it
        runtime._emb_ids[spec.name] = token_id
        runtime._proprio_width = max(runtime._proprio_width, spec.proprio_dim)
        spec, version = add_body_from_payload(model, payload)
        try:
            runtime.backend.install_head(spec.name, runtime.backend.prepare_head(spec.name), version)
        except Exception:
            model.remove_embodiment(spec.name)
            raise
    return spec.name, version
