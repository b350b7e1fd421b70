"""Per-robot image adapters on the serving side (no Ray): the registry's table (versions, validation, bounds,
persistence) and the runtime applying a robot's adapter to that robot's frames only."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.learning import head_store as head_store_module
from fleet.learning.head_store import HeadStore
from fleet.policy.image_adapter import ImageAdapter
from fleet.policy.train import build_model
from fleet.protocol import make_request
from fleet.serving.runtime import PolicyRuntime
from tests.mocks.tiny_policy import TINY

BRIGHTER = ImageAdapter(dx=2, dy=-1, gain=(1.5, 1.2, 1.0), bias=(0.05, 0.0, -0.05))


def request(robot: str, image: np.ndarray, tick: int = 0) -> dict:
    obs = {"image": image, "proprio": np.zeros(8, np.float32), "instruction": "pick up the red cube"}
    return make_request(robot, "franka", obs, obs_tick=tick)


# ---- the registry's table ----------------------------------------------------------------------------
def test_the_table_versions_every_change_and_a_poll_at_the_current_version_gets_nothing(tmp_path) -> None:
    """set/remove bump one version; image_adapters(known) answers None when nothing changed."""
    store = HeadStore()
    assert store.image_adapters() == {"version": 0, "adapters": {}} and store.image_adapters(0) is None
    v1 = store.set_image_adapter("robot-a", BRIGHTER.to_dict(), {"embodiment": "franka"})
    assert v1 == 1 and store.image_adapters(0) == {"version": 1, "adapters": {"robot-a": BRIGHTER.to_dict()}}
    assert store.image_adapters(1) is None
    assert store.set_image_adapter("robot-a", None) == 2 and store.image_adapters(1)["adapters"] == {}
    assert store.set_image_adapter("robot-a", None) == 2  # removing what is not there changes nothing
    assert store.image_adapter_history() == {}


def test_a_bad_adapter_is_refused_naming_the_field_and_the_table_is_unchanged() -> None:
    store = HeadStore()
    store.set_image_adapter("robot-a", BRIGHTER.to_dict())
    for bad, field in (
        ({"dx": 99, "dy": 0, "gain": [1, 1, 1], "bias": [0, 0, 0]}, "dx"),
        ({"dx": 0, "dy": 0, "gain": [1, float("nan"), 1], "bias": [0, 0, 0]}, "gain"),
        ({"dx": 0, "dy": 0, "gain": [1, 1, 1], "bias": [0, 0]}, "bias"),
        ({"dx": 0, "dy": 0, "gain": [1, 1, 1], "bias": [0, 0, 0], "scale": 2}, "unknown keys"),
        ("bright", "expected a dict"),
    ):
        with pytest.raises(ValueError, match=field):
            store.set_image_adapter("robot-b", bad)
    with pytest.raises(ValueError, match="robot_id"):
        store.set_image_adapter("", BRIGHTER.to_dict())
    assert store.image_adapters(0) == {"version": 1, "adapters": {"robot-a": BRIGHTER.to_dict()}}


def test_the_table_is_bounded(monkeypatch) -> None:
    """A flood of robot ids is refused beyond MAX_IMAGE_ADAPTERS; an existing robot can still be updated."""
    monkeypatch.setattr(head_store_module, "MAX_IMAGE_ADAPTERS", 3)
    store = HeadStore()
    for i in range(3):
        store.set_image_adapter(f"robot-{i}", BRIGHTER.to_dict())
    with pytest.raises(ValueError, match="already 3 robots"):
        store.set_image_adapter("robot-3", BRIGHTER.to_dict())
    store.set_image_adapter("robot-0", ImageAdapter(dx=1).to_dict())
    assert len(store.image_adapters()["adapters"]) == 3


def test_the_table_survives_a_restart_and_a_torn_file_is_skipped(tmp_path) -> None:
    store = HeadStore(tmp_path)
    store.set_image_adapter("robot-a", BRIGHTER.to_dict(), {"distance": 61.0})
    again = HeadStore(tmp_path)
    assert again.image_adapters() == store.image_adapters()
    assert again.image_adapter_history()["robot-a"]["meta"] == {"distance": 61.0}
    (tmp_path / head_store_module.ADAPTERS_FILE).write_text('{"version": 3, "robots": {"r": {"adapter": {"dx": ')
    torn = HeadStore(tmp_path)
    assert torn.image_adapters() == {"version": 0, "adapters": {}}
    assert any(head_store_module.ADAPTERS_FILE in s for s in torn.skipped_at_load)


# ---- the runtime -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime() -> PolicyRuntime:
    return PolicyRuntime(model=build_model(("franka", "hello"), 0, TINY), threads=1)


def test_only_the_robots_own_frames_pass_through_its_adapter(runtime: PolicyRuntime, monkeypatch) -> None:
    """Robot a's frame reaches the model adapted; robot b's (no adapter), sent in the same batch, bit for bit."""
    seen = []
    real = runtime.backend.predict

    def spy(batch, *args, **kwargs):
        seen.append(batch.image.numpy().copy())
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(runtime.backend, "predict", spy)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert runtime.set_image_adapters({"robot-a": BRIGHTER.to_dict()}, 4) == 4
    try:
        replies = runtime.act_batch([request("robot-a", image), request("robot-b", image)])
        assert all("error" not in r for r in replies)
        assert np.array_equal(seen[0][0], BRIGHTER.apply(image))
        assert np.array_equal(seen[0][1], image)
        assert replies[0]["image_adapter"] == BRIGHTER.to_dict() and "image_adapter" not in replies[1]
        assert runtime.stats()["image_adapters"] == {"version": 4, "robots": ["robot-a"]}
    finally:
        runtime.set_image_adapters({}, 5)
    runtime.act_batch([request("robot-a", image, tick=1)])
    assert np.array_equal(seen[-1][0], image)  # the table was replaced: robot a's frames are its own again


def test_a_bad_table_is_refused_whole_and_the_old_one_kept(runtime: PolicyRuntime) -> None:
    runtime.set_image_adapters({"robot-a": BRIGHTER.to_dict()}, 1)
    try:
        with pytest.raises(ValueError, match="robot 'robot-b'.*gain"):
            runtime.set_image_adapters({"robot-a": {}, "robot-b": {"gain": [0, 0, 0]}}, 2)
        with pytest.raises(ValueError, match="version"):
            runtime.set_image_adapters({}, -1)
        assert runtime.image_adapters() == {"robot-a": BRIGHTER.to_dict()} and runtime.image_adapters_version == 1
    finally:
        runtime.set_image_adapters({}, 0)


def test_identity_adapters_are_not_kept(runtime: PolicyRuntime) -> None:
    runtime.set_image_adapters({"robot-a": ImageAdapter().to_dict()}, 1)
    assert runtime.image_adapters() == {}
    runtime.set_image_adapters({}, 0)


def test_the_robot_scores_novelty_on_the_frame_as_the_policy_read_it() -> None:
    """A reply that names the robot's image adapter makes the confidence score the adapted frame: a dimmed
    camera the learner mapped back onto the rig is no longer a novel scene (nor slowed down for it)."""
    from fleet.control.confidence import ConfidenceEstimator
    from fleet.control.image_ood import ImageStats
    from fleet.sim import make_env, render

    env = make_env("franka")
    clean = np.stack([env.reset(seed=s)[0]["image"] for s in range(40)])
    estimator = ConfidenceEstimator(image_stats=ImageStats.fit(clean))
    frame = make_env("franka").reset(seed=99)[0]["image"]
    dim = render.apply_lighting(frame, 0.55, (40.0, 25.0, -10.0))
    inverse = ImageAdapter(gain=(1 / 0.55,) * 3, bias=tuple(-t / 0.55 / 255 for t in (40.0, 25.0, -10.0)))
    reply = {"chunk": np.zeros((16, 7), np.float32)}
    raw = estimator.estimate(reply, dim).components["image_distance"]
    adapted = estimator.estimate(reply | {"image_adapter": inverse.to_dict()}, dim).components["image_distance"]
    assert raw > 10 > 3 > adapted
    broken = estimator.estimate(reply | {"image_adapter": {"dx": 99}}, dim)
    assert "image_distance" not in broken.components and any("not scored" in r for r in broken.reasons)
