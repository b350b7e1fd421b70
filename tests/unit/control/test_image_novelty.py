"""The camera's novelty signal reaches the robot: the shipped checkpoint's image statistics flag a dimmed light
or a knocked camera from the frames a robot sends, its degradation goes conservative, and unshifted scenes
stay normal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet.control import ConfidenceEstimator, DegradationPolicy, State
from fleet.control.image_ood import ImageStats, write_image_stats
from fleet.policy.default import DEFAULT_CHECKPOINT
from fleet.robot import RobotConfig, RobotLoop
from fleet.sim import make_env
from tests.mocks.fake_policy import FakePolicy

SHIPPED = json.loads(DEFAULT_CHECKPOINT.with_name("policy.json").read_text())["extra"]["image_stats"]


def run(name: str, shift: str | None, episodes: int = 2) -> RobotLoop:
    env = make_env(name, shift=shift)
    loop = RobotLoop(
        RobotConfig(f"r-{name}", name, teleop=False, seed=3),
        FakePolicy(env),
        None,
        None,
        env=env,
        image_stats=SHIPPED[name],
    )
    for _ in range(5000):
        if loop.stats.episodes_done >= episodes:
            return loop
        loop.tick()
    raise AssertionError("episodes did not finish")


def test_the_shipped_checkpoint_carries_image_statistics_for_every_body() -> None:
    assert set(SHIPPED) == {"franka", "aloha", "hello", "leap"}


@pytest.mark.parametrize("name", ["franka", "aloha"])
def test_unshifted_scenes_stay_normal_and_a_dimmed_light_goes_conservative(name: str) -> None:
    calm = run(name, None)
    assert calm.degradation.state is State.NORMAL and not calm.degradation.transitions
    dim = run(name, "lighting", episodes=1)
    assert dim.degradation.state is State.CONSERVATIVE
    assert dim.degradation.transitions[0].reason.startswith("novel scene: camera image distance")
    assert dim.degradation.velocity_scale < 1.0


def test_a_knocked_camera_is_novel_and_a_foreign_camera_is_skipped_not_fatal() -> None:
    stats = ImageStats.from_dict(SHIPPED["franka"])
    est = ConfidenceEstimator(image_stats=stats)
    reply = {"entropy": np.full((16, 7), 0.1), "n_bins": 64}
    clean = make_env("franka", seed=1).reset()[0]["image"]
    knocked = make_env("franka", seed=1, shift="camera_offset").reset()[0]["image"]
    assert not est.estimate(reply, image=clean).is_novel
    conf = est.estimate(reply, image=knocked)
    assert conf.is_novel and conf.components["image_distance"] > 3
    assert conf.value == est.estimate(reply).value  # novelty only: the chunk's own confidence is unchanged
    odd = est.estimate(reply, image=np.zeros((8, 8, 3), np.float32))  # a float camera the stats do not know
    assert not odd.is_novel and any("camera image not scored" in r for r in odd.reasons)
    state = DegradationPolicy()
    assert state.update(conf) is State.CONSERVATIVE


def test_image_statistics_are_written_into_a_checkpoint_without_touching_its_weights(tmp_path) -> None:
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"policy{suffix}").write_bytes(DEFAULT_CHECKPOINT.with_name(f"policy{suffix}").read_bytes())
    weights = (tmp_path / "policy.safetensors").read_bytes()
    stats = ImageStats.fit(np.stack([make_env("hello", seed=s).reset()[0]["image"] for s in range(12)]))
    path = write_image_stats(tmp_path / "policy", {"hello": stats})
    meta = json.loads(path.read_text())
    assert meta["extra"]["image_stats"]["hello"] == json.loads(json.dumps(stats.to_dict()))
    assert meta["extra"]["image_stats"]["franka"] == SHIPPED["franka"]  # the other bodies' are kept
    assert (tmp_path / "policy.safetensors").read_bytes() == weights
