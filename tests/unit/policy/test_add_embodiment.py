"""Adding a body to a model: a new token row, stem and head; nothing existing touched; checkpoints, payloads,
copies and every backend carry it; onboarding training changes only the new parts."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fleet.embodiments import CATALOG, EMBODIMENTS
from fleet.learning.onboard import OnboardData, new_body_parameters, train_new_body
from fleet.policy.checkpoint import head_from_bytes, head_to_bytes, load_checkpoint, save_checkpoint
from fleet.policy.demos import collect
from fleet.policy.extend import add_body_from_payload, spec_from_payload
from fleet.policy.inference.backend import OnnxBackend, make_backend
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import default_vocabulary
from fleet.sim import make_env
from tests.mocks.tiny_policy import TINY

torch.set_num_threads(1)
SO100 = CATALOG["so100"]


def tiny_model(seed: int = 0) -> FleetPolicy:
    torch.manual_seed(seed)
    return FleetPolicy(TINY, dict(EMBODIMENTS), default_vocabulary(list(EMBODIMENTS))).eval()


def snapshot(model: FleetPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(before: dict[str, torch.Tensor], model: FleetPolicy) -> None:
    now = model.state_dict()
    for key, value in before.items():
        assert torch.equal(now[key], value), f"{key} changed"


def obs_of(name: str, seed: int = 0) -> dict:
    env = make_env(name, seed=seed)
    obs, _ = env.reset()
    return obs


def test_add_touches_no_existing_tensor_and_serves_the_new_body():
    model = tiny_model()
    before = snapshot(model)

    def alone(name):  # flow heads draw noise: the same seed gives the same chunk
        return model.predict_obs([obs_of(name)], [name], generator=torch.Generator().manual_seed(1))[0]["chunk"]

    rows_before = {n: alone(n) for n in EMBODIMENTS}
    head = model.add_embodiment(SO100, like="franka")
    assert_identical(before, model)
    new_keys = set(model.state_dict()) - set(before)
    assert new_keys and all(k.startswith("heads.so100.") for k in new_keys)
    assert "heads.so100.emb_token" in new_keys
    assert model.head_versions["so100"] == 0 and model.is_added("so100") and not model.is_added("franka")
    assert model.backbone.word_embed.weight.shape[0] == model.base_vocab_size == len(model.vocab) - 1
    # the other bodies answer exactly as before, alone, and the token heads also batched with the new one
    for name in EMBODIMENTS:
        np.testing.assert_array_equal(alone(name), rows_before[name])
    names = ["franka", "hello", "so100"]
    rows = model.predict_obs([obs_of(n) for n in names], names)
    for name, row in zip(names[:2], rows, strict=False):
        np.testing.assert_array_equal(row["chunk"], rows_before[name])
    assert rows[-1]["chunk"].shape == (16, 6)
    # the new token row starts as franka's; the warm start copies franka's same-shaped decoder tensors only
    torch.testing.assert_close(head.emb_token.detach(), model.embodiment_row("franka"))
    franka = model.head("franka").state_dict()
    own = head.state_dict()
    assert torch.equal(own["blocks.0.self_attn.qkv.weight"], franka["blocks.0.self_attn.qkv.weight"])
    assert not torch.equal(own["stem.proj.weight"][:, :7], franka["stem.proj.weight"][:, :7])


def test_the_token_row_is_what_selects_the_new_body():
    model = tiny_model()
    model.add_embodiment(SO100)
    obs = obs_of("so100")
    first = model.predict_obs([obs], ["so100"])[0]["features"]
    with torch.no_grad():
        # not a constant: the pre-LN backbone normalizes every token, so a shift of all of a row's entries is invisible
        row = model.head("so100").emb_token
        row.add_(torch.linspace(-1.0, 1.0, row.numel()))
    assert not np.allclose(model.predict_obs([obs], ["so100"])[0]["features"], first)


def test_add_refuses_bad_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="already has embodiment 'franka'"):
        model.add_embodiment(EMBODIMENTS["franka"])
    with pytest.raises(ValueError, match="like='nobody'"):
        model.add_embodiment(SO100, like="nobody")
    with pytest.raises(ValueError, match="chunk_size"):
        model.add_embodiment(dataclasses.replace(SO100, chunk_size=8, recompute_every=4))
    with pytest.raises(TypeError):
        model.add_embodiment({"name": "so100"})


def test_checkpoint_round_trip_keeps_the_added_body(tmp_path):
    model = tiny_model()
    model.add_embodiment(SO100, like="franka")
    model.head_versions["so100"] = 3
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["base_vocab_size"] == model.base_vocab_size
    assert loaded.is_added("so100") and loaded.head_versions["so100"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    obs = obs_of("so100")
    np.testing.assert_array_equal(
        loaded.predict_obs([obs], ["so100"])[0]["chunk"], model.predict_obs([obs], ["so100"])[0]["chunk"]
    )


def test_head_payload_carries_the_new_body_into_another_model():
    teacher = tiny_model()
    teacher.add_embodiment(SO100, like="franka")
    with torch.no_grad():
        teacher.head("so100").emb_token.add_(0.5)
    payload = head_to_bytes(teacher, "so100", version=1)
    assert spec_from_payload(payload) == SO100
    replica = tiny_model()  # same pretrained weights (seed 0), no so100 yet
    before = snapshot(replica)
    spec, version = add_body_from_payload(replica, payload)
    assert spec.name == "so100" and version == 1 and replica.head_versions["so100"] == 1
    assert_identical(before, replica)
    obs = obs_of("so100")
    np.testing.assert_array_equal(
        replica.predict_obs([obs], ["so100"])[0]["chunk"], teacher.predict_obs([obs], ["so100"])[0]["chunk"]
    )
    # a later version is an ordinary head swap, the token row included
    with torch.no_grad():
        teacher.head("so100").emb_token.add_(0.5)
    head_from_bytes(replica, "so100", head_to_bytes(teacher, "so100", version=2))
    torch.testing.assert_close(replica.head("so100").emb_token, teacher.head("so100").emb_token)
    with pytest.raises(ValueError, match="already has embodiment"):
        add_body_from_payload(replica, payload)


def test_a_copy_of_the_model_reads_its_own_token_row():
    model = tiny_model()
    model.add_embodiment(SO100)
    twin = copy.deepcopy(model)
    assert twin.backbone.token_rows[len(model.vocab) - 1] is twin.head("so100").emb_token
    obs = obs_of("so100")
    with torch.no_grad():
        row = twin.head("so100").emb_token
        row.add_(torch.linspace(-1.0, 1.0, row.numel()))  # not a constant shift, which LayerNorm removes
    mine, theirs = (m.predict_obs([obs], ["so100"])[0]["features"] for m in (twin, model))
    assert not np.allclose(mine, theirs)


@pytest.mark.parametrize(
    "backend,precision",
    [
        ("torch", "bf16"),
        ("torch", "int8"),
        ("device", "fp32"),  # DeviceBackend on the CPU: the CUDA replica's code path, bucket padding included
        pytest.param("onnx", "fp32", marks=pytest.mark.slow),  # export: ~15 s
    ],
)
def test_every_backend_serves_a_body_added_after_it_was_built(backend, precision):
    model = tiny_model()
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
        served = OnnxBackend(model, precision, threads=1, heads=["franka"])  # one head exported: seconds, not tens
    elif backend == "device":
        from fleet.policy.inference.device_backend import DeviceBackend

        served = DeviceBackend(model, device="cpu", pad=True)
        served.predict(model.collate([obs_of("franka")], ["franka"]))  # a backbone runner exists before the add
    else:
        served = make_backend(model, backend, precision, threads=1)
    model.add_embodiment(SO100, like="franka")
    served.install_head("so100", served.prepare_head("so100"), 0)
    names = ["franka", "so100"]
    batch = model.collate([obs_of(n) for n in names], names)
    want = model.predict(batch)
    got = served.predict(batch)
    tol = 1e-4 if precision == "fp32" else 0.25
    for w, g in zip(want, got, strict=True):
        assert g["chunk"].shape == w["chunk"].shape
        spec = model.specs[w["embodiment"]]
        span = np.asarray(spec.action_high) - np.asarray(spec.action_low)
        assert np.abs((g["chunk"] - w["chunk"]) / span).mean() < tol


def test_onboarding_training_changes_only_the_new_parts():
    model = tiny_model()
    model.add_embodiment(SO100, like="franka")
    before = snapshot(model)
    data = OnboardData.from_demos(model, collect("so100", 3, seed=5))
    assert len(data) > 10 and data.tokens.dtype == torch.float32
    first = train_new_body(model, "so100", data, steps=2, batch_size=8, seed=0)
    report = train_new_body(model, "so100", data, steps=40, batch_size=16, lr=3e-3, seed=1, fit_stats=False)
    assert report.steps == 40 and report.losses[-1] < first.losses[0]
    now = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], now[k])}
    assert changed and all(k.startswith("heads.so100.") for k in changed)
    assert "heads.so100.emb_token" in changed and "heads.so100.stem.proj.weight" in changed
    assert all(p.requires_grad for p in model.backbone.parameters())  # the flags are restored
    with pytest.raises(ValueError, match="pretrained body"):
        new_body_parameters(model, "franka")
