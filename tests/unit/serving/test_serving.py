"""PolicyRuntime (no Ray): one forward per mixed batch, per-request rejection, atomic head swaps;
ServeConfig validation (and its torch-free import)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import head_to_bytes, save_checkpoint
from fleet.policy.train import build_model
from fleet.protocol import make_request
from fleet.serving.config import ServeConfig
from fleet.serving.runtime import PolicyRuntime
from tests.mocks.tiny_policy import TINY

NAMES = tuple(EMBODIMENTS)[:4]


def tiny_model(seed: int = 0):
    return build_model(NAMES, seed, TINY)


def request(name: str, i: int = 0, n_samples: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + i)
    spec = EMBODIMENTS[name]
    obs = {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(spec.proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }
    return make_request(f"robot-{i}", name, obs, obs_tick=i, n_samples=n_samples)


@pytest.fixture(scope="module")
def runtime() -> PolicyRuntime:
    return PolicyRuntime(model=tiny_model(), threads=1)


def test_mixed_embodiments_share_one_backbone_forward(runtime: PolicyRuntime) -> None:
    calls = []
    hook = runtime.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        reqs = [request(n, i, n_samples=3 if EMBODIMENTS[n].head == "flow" else 1) for i, n in enumerate(NAMES * 2)]
        reqs[-1]["n_samples"] = 1  # a flow row asking for one sample gets no samples back
        replies = runtime.act_batch(reqs)
    finally:
        hook.remove()
    assert len(calls) == 1
    for req, reply in zip(reqs, replies, strict=True):
        spec = EMBODIMENTS[req["embodiment"]]
        assert "error" not in reply
        assert reply["embodiment"] == spec.name and reply["request_id"] == req["request_id"]
        assert reply["obs_tick"] == req["obs_tick"] and reply["head_version"] == 1
        assert reply["chunk"].shape == (16, spec.action_dim) and reply["chunk"].dtype == np.float32
        assert reply["features"].shape == (TINY.d_model,)
        timing = reply["server_timing"]
        assert timing["batch_size"] == len(reqs) and timing["infer_ms"] > 0 and timing["replica"]
        if spec.head == "token":
            assert reply["entropy"].shape == (16, spec.action_dim) and reply["n_bins"] == TINY.n_bins
        elif req["n_samples"] > 1:
            assert reply["samples"].shape == (req["n_samples"], 16, spec.action_dim)
        else:
            assert "samples" not in reply


def test_batches_larger_than_max_batch_are_split(runtime: PolicyRuntime) -> None:
    small = PolicyRuntime(model=runtime.model, threads=1, max_batch=3)
    replies = small.act_batch([request("franka", i) for i in range(7)])
    assert [r["server_timing"]["batch_size"] for r in replies] == [3, 3, 3, 3, 3, 3, 1]
    assert small.stats()["batches"] == 3


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("image"), "image"),
        (lambda r: r.update(image=np.zeros((32, 32, 3), np.uint8)), "image"),
        (lambda r: r.update(proprio=np.zeros(3, np.float32)), "proprio"),
        (lambda r: r.update(proprio=np.full(8, np.nan, np.float32)), "proprio"),
        (lambda r: r.update(embodiment="spot"), "embodiment"),
        (lambda r: r.update(n_samples=0), "n_samples"),
        (lambda r: r.update(instruction=""), "instruction"),
        (lambda r: r.update(obs_tick=-1), "obs_tick"),
    ],
)
def test_malformed_request_is_rejected_alone(runtime: PolicyRuntime, mutate, field: str) -> None:
    bad = request("franka", 1)
    mutate(bad)
    before = runtime.stats()["rejected"]
    replies = runtime.act_batch([request("hello", 0), bad, request("leap", 2)])
    assert replies[1]["error"].startswith(f"{field}:") and replies[1]["request_id"] == bad.get("request_id")
    assert "error" not in replies[0] and "error" not in replies[2]
    assert runtime.stats()["rejected"] == before + 1
    assert "error" not in runtime.act_batch([request("aloha", 3)])[0]  # and it keeps serving


def test_non_dict_requests_and_all_bad_batches(runtime: PolicyRuntime) -> None:
    replies = runtime.act_batch([None, "act", {"embodiment": "franka"}])
    assert [r["error"].split(":")[0] for r in replies] == ["request", "request", "image"]
    assert runtime.health()["ok"]


def test_stats_and_health(runtime: PolicyRuntime) -> None:
    runtime.act_batch([request("franka", 0), request("aloha", 1)])
    stats = runtime.stats()
    assert stats["requests"] >= 2 and stats["batches"] >= 1 and stats["mean_batch_size"] >= 1
    assert stats["infer_ms_p50"] > 0 and stats["infer_ms_p99"] >= stats["infer_ms_p50"]
    health = runtime.health()
    assert health["ok"] and health["heads"] == dict.fromkeys(NAMES, 1)


def test_set_head_installs_and_refuses_old_or_mismatched_payloads() -> None:
    runtime = PolicyRuntime(model=tiny_model(0), threads=1)
    donor = tiny_model(1)
    runtime.set_head("franka", 2, head_to_bytes(donor, "franka", 2))
    assert runtime.head_versions()["franka"] == 2
    installed = runtime.model.head_state_dict("franka")
    for key, value in donor.head_state_dict("franka").items():
        torch.testing.assert_close(installed[key], value)
    assert runtime.act_batch([request("franka")])[0]["head_version"] == 2

    for version in (2, 1):
        with pytest.raises(ValueError, match="not newer"):
            runtime.set_head("franka", version, head_to_bytes(donor, "franka", version))
    with pytest.raises(ValueError, match="hello"):  # a hello head offered as franka
        runtime.set_head("franka", 3, head_to_bytes(donor, "hello", 3))
    with pytest.raises(ValueError):
        runtime.set_head("franka", 3, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="no head"):
        runtime.set_head("spot", 3, head_to_bytes(donor, "franka", 3))
    assert runtime.head_versions()["franka"] == 2  # the refusals kept the installed head
    for key, value in runtime.model.head_state_dict("franka").items():
        torch.testing.assert_close(value, installed[key])


def test_set_head_version_is_authoritative_for_rollbacks() -> None:
    runtime = PolicyRuntime(model=tiny_model(0), threads=1)
    old = head_to_bytes(runtime.model, "aloha", 1)  # weights of v1, re-published as v5
    runtime.set_head("aloha", 5, old)
    assert runtime.head_versions()["aloha"] == 5


def test_set_head_waits_for_the_running_batch() -> None:
    """A swap requested mid-batch lands after it: the batch ran wholly on the old head."""
    runtime = PolicyRuntime(model=tiny_model(0), threads=1)
    payload = head_to_bytes(tiny_model(1), "franka", 2)
    inside, original = threading.Event(), runtime.model.predict

    def slow_predict(*args, **kwargs):
        inside.set()
        time.sleep(0.3)
        return original(*args, **kwargs)

    runtime.model.predict = slow_predict
    replies: list[dict] = []
    worker = threading.Thread(target=lambda: replies.extend(runtime.act_batch([request("franka")] * 3)))
    worker.start()
    assert inside.wait(5)
    runtime.set_head("franka", 2, payload)  # blocks until the batch's forward is done
    worker.join()
    assert [r["head_version"] for r in replies] == [1, 1, 1]
    runtime.model.predict = original
    assert runtime.act_batch([request("franka")])[0]["head_version"] == 2


def test_runtime_loads_a_checkpoint(tmp_path) -> None:
    save_checkpoint(tiny_model(0), tmp_path / "policy")
    runtime = PolicyRuntime(tmp_path / "policy", threads=1)
    assert runtime.head_versions() == dict.fromkeys(NAMES, 1)
    assert "error" not in runtime.act_batch([request("hello")])[0]


# ----- ServeConfig ----------------------------------------------------------------------------------
def test_serve_config_defaults_and_validation() -> None:
    cfg = ServeConfig.from_dict({"replica_cpus": 2, "max_batch_size": 16})
    assert cfg.threads == 2 and cfg.ongoing_limit == 32
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ServeConfig.from_dict({"replicas": 2})
    bads = (
        {"num_replicas": 0},
        {"batch_wait_timeout_s": -1},
        {"auth_token": ""},
        {"max_ongoing_requests": 4},
        {"replica_resources": {"policy": -1}},
        {"replica_resources": ["policy"]},
        {"gather_s": 0.5},
        {"active_window_s": 0},
        {"direct": "yes"},
        {"direct_host": ""},
    )
    for bad in bads:
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig.from_dict(bad)


def test_replica_resources_reach_the_deployment_options() -> None:
    from deployments.policy import policy_deployment  # Ray (deployments import it): only these tests load it

    dep = policy_deployment({"replica_resources": {"policy": 1}, "replica_cpus": 2})
    opts = dep.ray_actor_options
    assert opts["resources"] == {"policy": 1} and opts["num_cpus"] == 2


class _BatchKnobs:
    """Stands in for the @serve.batch method's setters."""

    def __init__(self) -> None:
        self.max_batch_size, self.timeout_s, self.sets = None, None, 0

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = n
        self.sets += 1

    def set_batch_wait_timeout_s(self, s: float) -> None:
        self.timeout_s = s


def test_gather_waits_only_for_robots_that_are_active() -> None:
    from deployments.policy import PolicyServer  # Ray, as above

    server = object.__new__(PolicyServer.func_or_class)
    server.config = ServeConfig.from_dict({"gather_s": 0.004, "active_window_s": 0.2, "max_batch_size": 8})
    server._seen, server._batch_plan = {}, None
    server.act = knobs = _BatchKnobs()
    server._plan_next_batch([request("franka", 0)])
    assert (knobs.max_batch_size, knobs.timeout_s) == (1, 0.0)  # one robot: its next batch leaves at once
    server._plan_next_batch([request("franka", 0)])
    assert knobs.sets == 1  # the same plan again: Serve's setters are not called again
    server._plan_next_batch([request("franka", i) for i in range(5)] + ["not a request"])
    assert (knobs.max_batch_size, knobs.timeout_s) == (5, 0.004)  # waits up to 4 ms for all five
    server._plan_next_batch([request("franka", i) for i in range(20)])
    assert knobs.max_batch_size == 8  # never above the configured batch
    time.sleep(0.25)
    server._plan_next_batch([request("franka", 0), request("franka", 1)])
    assert (knobs.max_batch_size, knobs.timeout_s) == (2, 0.004)  # the others went quiet: not waited for
    server.config = ServeConfig.from_dict({"gather_s": 0.0})
    server.act = knobs = _BatchKnobs()
    server._plan_next_batch([request("franka", i) for i in range(5)])
    assert knobs.max_batch_size is None  # gather off: Serve's own settings stand


class _QueuedAct(_BatchKnobs):
    """Stands in for the @serve.batch method: counts the requests sent through its queue, which holds `queued`."""

    def __init__(self, queued: int = 0) -> None:
        super().__init__()
        self.calls, self.after = [], None
        self._queue = type("Q", (), {"queue": type("q", (), {"qsize": lambda _self: queued})()})()

    def _get_curr_iteration_start_times(self) -> None:  # what batch_queue_depth follows to the queue
        return None

    async def __call__(self, request: dict) -> dict:
        self.calls.append(request)
        self.after([request])  # as `act` ends each batch: _plan_next_batch
        return {"via": "queue"}


class _InlineRuntime:
    def __init__(self) -> None:
        self.batches = []

    def act_batch(self, requests: list[dict]) -> list[dict]:
        self.batches.append(len(requests))
        return [{"via": "inline"} for _ in requests]


def test_a_lone_robot_skips_the_queue_and_any_other_request_joins_it() -> None:
    import asyncio

    from deployments.policy import PolicyServer  # Ray, as above

    def server(queued: int = 0, **cfg):
        s = object.__new__(PolicyServer.func_or_class)
        s.config = ServeConfig.from_dict({"active_window_s": 0.2} | cfg)
        s._seen, s._batch_plan, s.act, s.runtime = {}, None, _QueuedAct(queued), _InlineRuntime()
        s.act.after = s._plan_next_batch
        return s

    def via(s, robot: int) -> str:
        return asyncio.run(s.act_one(request("franka", robot)))["via"]

    s = server()
    assert [via(s, 0) for _ in range(3)] == ["inline"] * 3  # one robot, nothing queued: the batch of one, here
    assert s.runtime.batches == [1, 1, 1] and s.act.calls == [] and set(s._seen) == {"robot-0"}
    assert via(s, 1) == "queue"  # a second robot asked within active_window_s: batches can form, so the queue
    assert via(s, 0) == "queue"
    time.sleep(0.25)
    assert via(s, 0) == "inline"  # robot 1 went quiet
    assert via(server(queued=1), 0) == "queue"  # something already waits: join it
    assert via(server(forward_thread=True), 0) == "queue"
    assert via(server(batch_wait_timeout_s=0.002), 0) == "queue"  # a configured wait: the queue's rules
    assert via(server(gather_s=0.0), 0) == "inline"  # robots are tracked even with gather off
    s = server()
    assert s.act_inline(request("franka", 0)) == {"via": "inline"}  # the openpi endpoint's timer-free path
    assert s.act_inline(request("franka", 1)) is None and s.act.calls == []  # the caller must use the queue


def test_the_config_imports_no_torch() -> None:
    code = "import sys, fleet.serving.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
