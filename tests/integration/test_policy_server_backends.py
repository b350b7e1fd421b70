"""PolicyServer with the optimized backends on a real local Ray: ServeConfig's backend / precision /
encoder_cache reach the replica, replies match the eager fp32 model within the backend's tolerance, and a
published head is re-exported off the replica's loop and then served."""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np
import pytest
import torch

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import head_to_bytes, save_checkpoint
from fleet.policy.train import build_model
from fleet.protocol import make_request
from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray

NAMES = ("franka", "aloha")  # one token head (its ONNX export takes seconds) and one flow head
CONFIG = dataclasses.replace(TINY, keypoints=2)


def request(name: str, i: int, robot: str) -> dict:
    rng = np.random.default_rng(i)
    obs = {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS[name].proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }
    return make_request(robot, name, obs, obs_tick=i, n_samples=1)


def test_onnx_backend_replica_serves_caches_and_hot_swaps(ray_session, tmp_path) -> None:
    from ray import serve

    from actors.heads import get_head_registry
    from deployments.http import start_serve
    from deployments.policy import build_app

    ray = ray_session
    model = build_model(NAMES, 0, CONFIG).eval()
    ckpt = tmp_path / "policy"
    save_checkpoint(model, ckpt)
    tag = uuid.uuid4().hex[:6]
    registry_name, app_name = f"heads-{tag}", f"policy-onnx-{tag}"
    registry = get_head_registry(registry_name)
    start_serve(port=None)
    config = {
        "checkpoint": str(ckpt),
        "num_replicas": 1,
        "replica_cpus": 0.5,
        "threads": 1,
        "registry": registry_name,
        "poll_interval_s": 0.1,
        "backend": "onnx",
        "precision": "fp32",
        "encoder_cache": True,
    }
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    try:
        reqs = [request(name, i, f"bot-{name}") for i, name in enumerate(NAMES)]
        for _ in range(2):  # the second round is a static scene: encoder-cache hits
            replies = [handle.act.remote(r).result(timeout_s=60) for r in reqs]
        assert all("error" not in r for r in replies), replies
        obs = [{k: r[k] for k in ("image", "proprio", "instruction")} for r in reqs]
        with torch.inference_mode():  # franka decodes greedily: deterministic (aloha's noise is the replica's)
            want = model.predict_obs(obs[:1], NAMES[:1])[0]["chunk"]
        np.testing.assert_allclose(replies[0]["chunk"], want, atol=1e-4)
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["backend"] == "onnx-fp32" and stats["encoder_cache"]["hits"] >= len(NAMES)

        donor = build_model(NAMES, 1, CONFIG)
        assert ray.get(registry.publish.remote("franka", 2, head_to_bytes(donor, "franka", 2))) == 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the replica re-exports the head (seconds), serving v1 meanwhile
            reply = handle.act.remote(reqs[0]).result(timeout_s=60)
            assert "error" not in reply, reply
            if reply["head_version"] == 2:
                break
            time.sleep(0.2)
        assert reply["head_version"] == 2
        model.load_head_state_dict("franka", donor.head_state_dict("franka"), 2)  # the served model now
        with torch.inference_mode():
            expect = model.predict_obs(obs[:1], NAMES[:1])[0]["chunk"]
        np.testing.assert_allclose(reply["chunk"], expect, atol=1e-4)
    finally:
        serve.delete(app_name)
        ray.kill(registry)
