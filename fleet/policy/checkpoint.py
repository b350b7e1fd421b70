"""Checkpoint I/O: safetensors weights + a JSON sidecar, and single heads as files or bytes.

Weights are only ever read with safetensors (never torch.load / pickle), and every mismatch with
the running code (embodiment spec, tensor shape, missing or unexpected tensor, format version) is
refused with a ValueError that names it. Files are written to a temporary name, fsynced, renamed.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save

from fleet.durable import write_bytes_atomic, write_text_atomic
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.policy.backbone import PolicyConfig
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import Vocabulary

FORMAT = "fleet-policy"
HEAD_FORMAT = "fleet-head"
FORMAT_VERSION = 1
DEFAULT_NAME = "policy"


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """A directory -> <dir>/policy.{safetensors,json}; otherwise a prefix (a .safetensors/.json suffix is dropped)."""
    p = Path(path)
    if p.is_dir():
        p = p / DEFAULT_NAME
    elif p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _jsonable(obj: object) -> object:
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"extra_meta: {type(obj).__name__} is not JSON-serializable")


# spec fields added after checkpoints were first written: a stored spec without one takes the registry's
LATER_SPEC_FIELDS = ("position_limits",)


def _spec_mismatch(stored: dict, current: EmbodimentSpec) -> str | None:
    """Name the first field where a stored spec dict differs from `current`, or None."""
    now = current.to_dict()
    for key in sorted(set(stored) | set(now)):
        if key in LATER_SPEC_FIELDS and key not in stored:
            continue
        if stored.get(key) != now.get(key):
            return f"field {key!r}: checkpoint has {stored.get(key)!r}, registry has {now.get(key)!r}"
    return None


def save_checkpoint(model: FleetPolicy, path: str | os.PathLike, extra_meta: dict | None = None) -> tuple[Path, Path]:
    """Write all weights (flat state_dict names) and the JSON metadata; returns both paths.

    extra_meta (e.g. OOD feature statistics; numpy arrays become lists) is stored under meta["extra"].
    """
    st_path, json_path = checkpoint_paths(path)
    checkpoint_id = uuid.uuid4().hex  # pairs the two files: a torn save is refused on load
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "config": model.config.to_dict(),
        "vocabulary": model.vocab.to_dict(),
        # rows of the backbone's embedding table; tokens past it are bodies added after pretraining (rows in heads)
        "base_vocab_size": model.base_vocab_size,
        "embodiments": {name: spec.to_dict() for name, spec in model.specs.items()},
        "action_normalization": {
            name: {"low": list(spec.action_low), "high": list(spec.action_high)} for name, spec in model.specs.items()
        },
        "head_versions": dict(model.head_versions),
        "extra": extra_meta or {},
    }
    text = json.dumps(meta, indent=1, default=_jsonable)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st_meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "checkpoint_id": checkpoint_id}
    st_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(st_path, save(tensors, metadata=st_meta))
    write_text_atomic(json_path, text)
    return st_path, json_path


def _fill_word_adapters(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero word-adapter tables for a checkpoint or head written before heads had them (an empty adapter
    is exactly what such a head computed)."""
    missing = [k for k in expected if k not in got and k.split(".")[-1] == "word_delta"]
    return {**got, **{k: torch.zeros_like(expected[k]) for k in missing}} if missing else got


def _check_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        raise ValueError(f"{what}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        raise ValueError(f"{what}: unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{what}: tensor {key!r} has shape {tuple(got[key].shape)}, the config expects {tuple(ref.shape)}"
            )


def load_checkpoint(
    path: str | os.PathLike, registry: dict[str, EmbodimentSpec] | None = None
) -> tuple[FleetPolicy, dict]:
    """Rebuild the model from the metadata and load the weights; returns (model, meta).

    Embodiments the registry knows must match it field for field; ones it does not know (a body
    registered by another process) are taken from the metadata.
    """
    registry = EMBODIMENTS if registry is None else registry
    st_path, json_path = checkpoint_paths(path)
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path}: metadata file {json_path} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path}: {json_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: unknown format_version {meta.get('format_version')!r}")
    stored_specs = meta.get("embodiments")
    if not isinstance(stored_specs, dict) or not stored_specs:
        raise ValueError(f"checkpoint {path}: metadata field 'embodiments' is missing or empty")
    specs: dict[str, EmbodimentSpec] = {}
    for name, stored in stored_specs.items():
        if name in registry:
            diff = _spec_mismatch(stored, registry[name])
            if diff:
                raise ValueError(f"checkpoint {path}: embodiment {name!r} differs from the registry, {diff}")
            specs[name] = registry[name]
        else:
            try:
                specs[name] = EmbodimentSpec.from_dict(stored)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"checkpoint {path}: embodiment {name!r} is malformed: {exc}") from None
    try:
        config = PolicyConfig.from_dict(meta.get("config", {}))
        vocab = Vocabulary.from_dict(meta.get("vocabulary", {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}: bad config or vocabulary: {exc}") from None
    base = meta.get("base_vocab_size", len(vocab))
    try:
        model = FleetPolicy(config, specs, vocab, base_vocab_size=base)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    if not st_path.exists():
        raise ValueError(f"checkpoint {path}: weights file {st_path} not found")
    with safe_open(str(st_path), framework="pt") as f:
        st_id = (f.metadata() or {}).get("checkpoint_id")
    if st_id is not None and st_id != meta.get("checkpoint_id"):
        raise ValueError(f"checkpoint {path}: {st_path.name} and {json_path.name} come from different saves")
    try:
        tensors = load_file(str(st_path))
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"checkpoint {path}: {st_path.name} is not readable safetensors ({exc})") from None
    tensors = _fill_word_adapters(model.state_dict(), tensors)
    _check_tensors(model.state_dict(), tensors, f"checkpoint {path}")
    model.load_state_dict(tensors, strict=True)
    versions = meta.get("head_versions", {})
    model.head_versions.update({k: int(v) for k, v in versions.items() if k in model.head_versions})
    model.eval()
    return model, meta


def _head_metadata(model: FleetPolicy, name: str, version: int) -> dict[str, str]:
    head_config = {k: v for k, v in model.config.to_dict().items() if k.startswith("head_") or k in ("d_model",)}
    return {
        "format": HEAD_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "embodiment": name,
        "version": str(version),
        "spec": json.dumps(model.specs[name].to_dict()),
        "config": json.dumps(head_config),
    }


def head_to_bytes(model: FleetPolicy, name: str, version: int | None = None) -> bytes:
    """Head `name` as safetensors bytes (for shipping over Ray); version defaults to the model's."""
    version = model.head_versions[name] if version is None else version
    tensors = {k: v.contiguous() for k, v in model.head_state_dict(name).items()}
    return save(tensors, metadata=_head_metadata(model, name, version))


def _read_header_metadata(data: bytes) -> dict[str, str]:
    """The safetensors __metadata__ dict, parsed as JSON from the header (no code execution)."""
    if len(data) < 8:
        raise ValueError("head payload: too short to be safetensors")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("head payload: header length exceeds the payload")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("head payload: header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def head_from_bytes(model: FleetPolicy, name: str, data: bytes) -> int:
    """Load a head shipped by `head_to_bytes` into head `name`; returns its version. Mismatches are refused."""
    meta = _read_header_metadata(data)
    if meta.get("format") != HEAD_FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"head payload: not a {HEAD_FORMAT} v{FORMAT_VERSION} payload ({meta.get('format')!r})")
    if meta.get("embodiment") != name:
        raise ValueError(f"head payload: holds embodiment {meta.get('embodiment')!r}, not {name!r}")
    try:
        stored_spec, version = json.loads(meta["spec"]), int(meta["version"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"head payload for {name!r}: metadata lacks a valid spec or version ({exc})") from None
    diff = _spec_mismatch(stored_spec, model.specs[name])
    if diff:
        raise ValueError(f"head payload for {name!r}: spec differs from the model's, {diff}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type for corrupt bytes
        raise ValueError(f"head payload for {name!r}: not readable safetensors ({exc})") from None
    tensors = _fill_word_adapters(model.head(name).state_dict(), tensors)
    _check_tensors(model.head(name).state_dict(), tensors, f"head payload for {name!r}")
    model.load_head_state_dict(name, tensors, version)
    return version


def save_head(model: FleetPolicy, name: str, path: str | os.PathLike, version: int | None = None) -> Path:
    """Write head `name` to one safetensors file (version, spec and config in its metadata)."""
    data = head_to_bytes(model, name, version)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, data)
    return out


def load_head(model: FleetPolicy, name: str, path: str | os.PathLike) -> int:
    """Load a head file written by `save_head` into head `name`; returns its version."""
    return head_from_bytes(model, name, Path(path).read_bytes())
