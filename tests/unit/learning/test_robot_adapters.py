"""The learner and the robots' image adapters (no Ray): a round's corrections split by what they show, the
camera's work published to the registry per robot, the behaviour's left to the head on the adapted frames."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fleet.cluster.launcher import checkpoint_meta  # noqa: E402
from fleet.data.store import ReplayStore  # noqa: E402
from fleet.learning import vision_round as vision_module  # noqa: E402
from fleet.learning.head_store import HeadStore  # noqa: E402
from fleet.learning.learner import Learner, LearnerConfig  # noqa: E402
from fleet.learning.vision_round import image_stats_of  # noqa: E402
from fleet.policy.image_adapter import ImageAdapter  # noqa: E402
from fleet.sim import render  # noqa: E402
from tests.unit.learning.test_adapt import FAST, corrections, tiny  # noqa: E402

DIM = (0.55, (40.0, 25.0, -10.0))  # the sims' `lighting` shift


@pytest.fixture(scope="module")
def demo():
    from fleet.policy.demos import collect

    return collect("franka", 6, seed=21)


@pytest.fixture(scope="module")
def image_stats():
    return image_stats_of(checkpoint_meta(None)[1])


def dimmed(items):
    """The same corrections as a robot under the `lighting` shift would have sent them."""
    from dataclasses import replace

    return [replace(c, robot_id="r-dim", image=render.apply_lighting(c.image, *DIM)) for c in items]


@pytest.fixture
def parts(tmp_path, demo, image_stats, monkeypatch):
    # the tiny model cannot tell frames apart; the gate's loss check is vision_round's (tested there with the
    # shipped policy): here adapted frames simply score better, so the learner's plumbing is what is tested
    def loss(model, name, items, adapter=None, seed=0):
        return 1.0 if adapter is None or adapter.is_identity else 0.5

    monkeypatch.setattr(vision_module, "correction_loss", loss)
    replay, registry = ReplayStore(tmp_path / "log"), HeadStore(tmp_path / "heads")

    def make(**config):
        cfg = {"every": 10, "watch_episodes": 5, "reference_episodes": 10, "min_reference": 5, "adapt": FAST}
        return Learner(
            tiny(("franka",)),
            replay,
            registry,
            LearnerConfig(**cfg | config),
            rehearsal={"franka": demo.subset(np.arange(0, len(demo), 2))},
            state_dir=tmp_path / "learner",
            log_fn=lambda m: None,
            image_stats=image_stats,
        )

    return replay, registry, make


def test_a_dimmed_robots_corrections_fit_its_adapter_and_the_head_learns_from_the_others(parts, demo) -> None:
    replay, registry, make = parts
    learner = make()
    seen = []
    learner.start()
    real = learner.adapters["franka"].round
    learner.adapters["franka"].round = lambda items: seen.append(list(items)) or real(items)
    replay.add(corrections(demo, range(0, 12)) + dimmed(corrections(demo, range(12, 24))))
    events = learner.step()
    table = registry.image_adapters()["adapters"]
    assert list(table) == ["r-dim"]
    adapter = ImageAdapter.from_dict(table["r-dim"])
    assert adapter.dx == adapter.dy == 0 and min(adapter.gain) > 1.4  # about 1 / 0.55
    assert [c.robot_id for c in seen[0]] == ["r0"] * 12  # the head round saw only the clean robot's
    assert events[-1]["event"] in ("published", "round_rejected") and events[-1]["corrections"] == 12
    assert any(e["event"] == "image_adapter" and e["robot_id"] == "r-dim" for e in learner.history)
    assert learner.status()["image_adapters"] == {"r-dim": adapter.to_dict()}

    # more corrections of the dimmed robot: its adapter already explains the frames, so now they are the
    # head's, on the frames the policy reads (through the adapter)
    more = dimmed(corrections(demo, range(24, 36)))
    replay.add(more)
    learner.run_round("franka")  # directly: a head published above would be watched, and no round run
    assert len(seen) == 2 and [c.robot_id for c in seen[1]] == ["r-dim"] * 12
    for got, sent in zip(seen[1], more, strict=True):
        assert np.array_equal(got.image, adapter.apply(sent.image))
    assert registry.image_adapters()["version"] == 1  # nothing new published

    restarted = make()
    restarted.start()
    assert restarted.status()["image_adapters"] == {"r-dim": adapter.to_dict()}


def test_too_few_novel_corrections_wait_for_the_robots_next_round(parts, demo) -> None:
    """5 dimmed corrections are held out of the head round and kept; with 6 more in the next round the robot's
    11 fit its adapter."""
    replay, registry, make = parts
    learner = make()
    learner.start()
    seen = []
    real = learner.adapters["franka"].round
    learner.adapters["franka"].round = lambda items: seen.append(list(items)) or real(items)
    replay.add(corrections(demo, range(0, 10)) + dimmed(corrections(demo, range(10, 15))))
    learner.step()
    assert registry.image_adapters()["adapters"] == {}
    assert [c.robot_id for c in seen[0]] == ["r0"] * 10
    assert len(learner.eyes.waiting[("franka", "r-dim")]) == 5
    replay.add(dimmed(corrections(demo, range(15, 21))))
    learner.run_round("franka")
    assert list(registry.image_adapters()["adapters"]) == ["r-dim"]
    assert learner.history[-2]["event"] == "image_adapter" and learner.history[-2]["frames"] == 11
    assert not learner.eyes.waiting


def test_vision_off_or_no_image_statistics_keeps_every_correction_for_the_head(parts, demo) -> None:
    replay, registry, make = parts
    learner = make(vision=False)
    learner.start()
    assert learner.eyes is None and learner.status()["image_adapters"] == {}
    with pytest.raises(ValueError, match="LearnerConfig.vision"):
        LearnerConfig(vision="yes")
