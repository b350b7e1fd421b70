"""Checkpoint and head I/O: bit-identical round trips, and every mismatch refused with a message naming it."""

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import (
    head_from_bytes,
    head_to_bytes,
    load_checkpoint,
    load_head,
    save_checkpoint,
    save_head,
)
from tests.unit.policy.test_model import MIXED, mixed_batch, tiny_model

torch.set_num_threads(1)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, object]:
    model = tiny_model(seed=3)
    model.set_proprio_stats("franka", np.arange(8, dtype=np.float32), np.full(8, 2.0, np.float32))
    model.head_versions["leap"] = 4
    extra = {"feature_mean": np.zeros(4, np.float32), "note": "unit test"}
    save_checkpoint(model, tmp_path / "ckpt", extra_meta=extra)
    return tmp_path / "ckpt", model


def _predict(model, seed: int = 0) -> list[dict]:
    batch = mixed_batch(model, MIXED)
    return model.predict(batch, n_samples=3, temperature=0.7, generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_bit_identical(saved: tuple[Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = saved
    # loading must never unpickle
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    loaded, meta = load_checkpoint(path)
    assert meta["extra"] == {"feature_mean": [0.0, 0.0, 0.0, 0.0], "note": "unit test"}
    assert loaded.config == model.config and loaded.vocab == model.vocab
    assert loaded.head_versions == {"franka": 1, "aloha": 1, "hello": 1, "leap": 4}
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    for a, b in zip(_predict(model), _predict(loaded), strict=True):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert np.array_equal(a[key], b[key]), key
            else:
                assert a[key] == b[key]


def test_directory_and_suffixed_paths(tmp_path: Path) -> None:
    model = tiny_model()
    st, js = save_checkpoint(model, tmp_path, {})
    assert st == tmp_path / "policy.safetensors" and js == tmp_path / "policy.json"
    load_checkpoint(tmp_path)
    load_checkpoint(tmp_path / "policy.safetensors")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def _edit_meta(path: Path, edit) -> None:
    js = path.with_name(path.name + ".json")
    meta = json.loads(js.read_text())
    edit(meta)
    js.write_text(json.dumps(meta))


def test_changed_embodiment_spec_is_refused(saved: tuple[Path, object]) -> None:
    path, _ = saved
    _edit_meta(path, lambda m: m["embodiments"]["franka"].__setitem__("max_force", 99.0))
    with pytest.raises(ValueError, match=r"embodiment 'franka' differs.*'max_force'.*99\.0.*30\.0"):
        load_checkpoint(path)


def test_changed_tensor_shape_is_refused(saved: tuple[Path, object]) -> None:
    path, _ = saved
    st = path.with_name(path.name + ".safetensors")
    tensors = load_file(str(st))
    tensors["heads.hello.out.weight"] = torch.zeros(7, 32)
    save_file(tensors, str(st))
    with pytest.raises(ValueError, match=r"'heads\.hello\.out\.weight' has shape \(7, 32\).*\(48, 32\)"):
        load_checkpoint(path)


def test_changed_config_is_refused_by_tensor_shapes(saved: tuple[Path, object]) -> None:
    path, _ = saved
    _edit_meta(path, lambda m: m["config"].__setitem__("n_bins", 8))
    with pytest.raises(ValueError, match=r"heads\.(franka|hello)\..*has shape"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_tensor_is_refused(saved: tuple[Path, object], change: str) -> None:
    path, _ = saved
    st = path.with_name(path.name + ".safetensors")
    tensors = load_file(str(st))
    if change == "missing":
        del tensors["backbone.norm.weight"]
        pattern = r"missing tensors \['backbone\.norm\.weight'\]"
    else:
        tensors["heads.spot.out.weight"] = torch.zeros(2)
        pattern = r"unexpected tensors \['heads\.spot\.out\.weight'\]"
    save_file(tensors, str(st))
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(path)


def test_unknown_format_version_and_torn_pairs_are_refused(saved: tuple[Path, object], tmp_path: Path) -> None:
    path, model = saved
    save_checkpoint(model, tmp_path / "other", {})
    st = path.with_name(path.name + ".safetensors")
    st.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        load_checkpoint(path)
    _edit_meta(path, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="unknown format_version 99"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "nothing")


def test_head_file_round_trip_with_version(tmp_path: Path) -> None:
    src, dst = tiny_model(seed=0), tiny_model(seed=1)
    save_head(src, "aloha", tmp_path / "aloha.safetensors", version=2)
    assert load_head(dst, "aloha", tmp_path / "aloha.safetensors") == 2
    assert dst.head_versions == {"franka": 1, "aloha": 2, "hello": 1, "leap": 1}
    for k, v in src.head_state_dict("aloha").items():
        assert torch.equal(dst.head_state_dict("aloha")[k], v)
    assert not torch.equal(dst.head_state_dict("leap")["out.weight"], src.head_state_dict("leap")["out.weight"])


def test_head_bytes_round_trip_and_refusals() -> None:
    src, dst = tiny_model(seed=0), tiny_model(seed=1)
    src.head_versions["hello"] = 5
    data = head_to_bytes(src, "hello")
    assert isinstance(data, bytes)
    assert head_from_bytes(dst, "hello", data) == 5
    for k, v in src.head_state_dict("hello").items():
        assert torch.equal(dst.head_state_dict("hello")[k], v)
    with pytest.raises(ValueError, match="holds embodiment 'hello', not 'franka'"):
        head_from_bytes(dst, "franka", data)
    with pytest.raises(ValueError, match="head payload"):
        head_from_bytes(dst, "hello", b"\x00" * 16)
    # same name, different body: a model whose hello spec has other limits refuses the head
    wide = dataclasses.replace(EMBODIMENTS["hello"], action_high=(0.9, 0.9, 1.5))
    other = tiny_model(specs={**EMBODIMENTS, "hello": wide})
    with pytest.raises(ValueError, match=r"spec differs.*'action_high'"):
        head_from_bytes(other, "hello", data)
