"""Poisoned heads (bad metadata, NaN weights, wrong tensors, truncated bytes) are refused with a ValueError
naming the problem: by the registry before it stores them, by a replica before it installs them. The replica
keeps serving its head, reports the refusal, and its health check stays green."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.learning.head_check import HeadPayloadError, check_head_payload
from fleet.learning.head_store import HeadStore
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.train import build_model
from fleet.serving.config import ServeConfig
from fleet.serving.runtime import PolicyRuntime
from tests.mocks.poisoned_heads import poisoned
from tests.mocks.tiny_policy import TINY

NAMES = tuple(EMBODIMENTS)[:4]


@pytest.fixture(scope="module")
def model():
    return build_model(NAMES, 0, TINY)


def test_check_head_payload_accepts_a_real_head_and_names_each_poison(model) -> None:
    payload = head_to_bytes(model, "franka", 3)
    info = check_head_payload(payload, "franka", spec=model.specs["franka"].to_dict())
    assert info["version"] == 3 and info["tensors"]["out.weight"] == tuple(model.head("franka").out.weight.shape)
    for what, bad in poisoned(payload).items():
        with pytest.raises(HeadPayloadError, match="head payload for 'franka'"):
            check_head_payload(bad, "franka", reference=info)
        assert what  # every kind is refused, none raises anything but HeadPayloadError


def test_the_registry_refuses_poisoned_heads_and_keeps_the_good_one(model, tmp_path) -> None:
    store = HeadStore(tmp_path / "heads")
    good = head_to_bytes(model, "franka", 1)
    assert store.publish("franka", None, good) == 1
    for what, bad in poisoned(head_to_bytes(model, "franka", 2)).items():
        with pytest.raises(ValueError):  # before: bad metadata raised TypeError, NaN weights were stored
            store.publish("franka", None, bad, {"case": what})
    with pytest.raises(ValueError, match="meta"):
        store.publish("franka", None, head_to_bytes(model, "franka", 2), {"loss": float("nan")})
    assert store.refused_publishes == len(poisoned(good)) + 1
    assert store.latest() == {"franka": 1} and store.get("franka") == (1, good)
    # a head of the same body with other tensor shapes is refused against the stored one
    other = build_model(NAMES, 0, TINY.__class__(**(TINY.to_dict() | {"d_model": 48})))
    with pytest.raises(ValueError, match="shape|differ"):
        store.publish("franka", None, head_to_bytes(other, "franka", 2))
    assert store.publish("franka", None, head_to_bytes(build_model(NAMES, 1, TINY), "franka", 2)) == 2


def test_a_truncated_registry_file_is_skipped_on_reload(model, tmp_path) -> None:
    store = HeadStore(tmp_path / "heads")
    for seed in (0, 1):
        store.publish("franka", None, head_to_bytes(build_model(NAMES, seed, TINY), "franka"))
    path = tmp_path / "heads" / "franka" / "v000002.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    reloaded = HeadStore(tmp_path / "heads")
    assert reloaded.latest() == {"franka": 1} and len(reloaded.skipped_at_load) == 1


def test_the_runtime_refuses_nan_weights_and_bad_metadata_and_keeps_its_head(model) -> None:
    runtime = PolicyRuntime(model=build_model(NAMES, 0, TINY), threads=1)
    before = {k: v.clone() for k, v in runtime.model.head_state_dict("franka").items()}
    for what, bad in poisoned(head_to_bytes(build_model(NAMES, 1, TINY), "franka", 2)).items():
        with pytest.raises(ValueError):  # before: NaN installed, bad metadata raised TypeError
            runtime.set_head("franka", 2, bad)
        assert runtime.head_versions()["franka"] != 2, what
    for key, value in runtime.model.head_state_dict("franka").items():
        torch.testing.assert_close(value, before[key])


class FakeRegistry:
    """`latest` / `get` of the HeadRegistry as awaitable remote calls."""

    def __init__(self, payloads: dict[tuple[str, int], bytes]) -> None:
        self.payloads = payloads
        self.get = self

    def remote(self, name: str, version: int):
        async def answer():
            return version, self.payloads[(name, version)]

        return answer()


def test_a_replica_refuses_a_poisoned_head_reports_it_and_stays_healthy(model) -> None:
    from deployments.policy import PolicyServer

    server = PolicyServer.func_or_class.__new__(PolicyServer.func_or_class)  # no Serve, no checkpoint
    server.config = ServeConfig(direct=False, registry=None)
    server.runtime = PolicyRuntime(model=build_model(NAMES, 0, TINY), threads=1)
    server._refused, server._poller, server._direct_ready, server._direct = {}, None, None, None
    server._openpi = server._openpi_ready = None
    server._poll_error = server._endpoint = None
    server._model_thread = server._swap_thread = ThreadPoolExecutor(1)
    good = head_to_bytes(build_model(NAMES, 1, TINY), "franka", 3)
    registry = FakeRegistry({("franka", 2): poisoned(good)["spec not a string"], ("franka", 3): good})

    async def run() -> None:
        assert await server._install_newer(registry, {"franka": 2})  # a refusal is news to report
        assert server.runtime.head_versions()["franka"] == 1
        assert not await server._install_newer(registry, {"franka": 2})  # never retried
        await server.check_health()  # a refused head is no reason to restart the replica
        assert await server._install_newer(registry, {"franka": 3})  # the next good version installs
        stats = await server.stats()
        assert stats["refused_heads"][0]["version"] == 2 and "must be a string" in stats["refused_heads"][0]["error"]

    asyncio.run(run())
    assert server.runtime.head_versions()["franka"] == 3
