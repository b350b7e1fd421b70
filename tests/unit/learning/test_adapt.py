"""Head-only adaptation (fleet.learning.head_adapter) and the learner's logic (fleet.learning.learner), on tiny
models, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from fleet.cli import app  # noqa: E402
from fleet.data.correction import Correction  # noqa: E402
from fleet.data.store import ReplayStore  # noqa: E402
from fleet.embodiments import EMBODIMENTS  # noqa: E402
from fleet.learning.candidate_gate import head_loss  # noqa: E402
from fleet.learning.head_adapter import HeadAdapter  # noqa: E402
from fleet.learning.head_store import HeadStore  # noqa: E402  (the registry's logic; needs no running Ray)
from fleet.learning.learner import Learner, LearnerConfig  # noqa: E402
from fleet.learning.round_config import AdaptConfig  # noqa: E402
from fleet.learning.round_data import encode_demos  # noqa: E402
from fleet.policy.checkpoint import head_from_bytes, save_checkpoint  # noqa: E402
from fleet.policy.demos import collect  # noqa: E402
from fleet.policy.train import build_model  # noqa: E402
from tests.mocks.tiny_policy import TINY  # noqa: E402

FAST = {"steps": 25, "batch_size": 16, "lr": 3e-3, "max_round_seconds": None}


@pytest.fixture(scope="module")
def demos():
    """Unshifted expert samples: franka (token head) and aloha (flow head)."""
    return {"franka": collect("franka", 10, seed=11), "aloha": collect("aloha", 2, seed=12, keep=0.3)}


def tiny(embodiments=("franka", "aloha"), seed: int = 0):
    torch.manual_seed(seed)
    return build_model(embodiments, seed=seed, config=TINY).eval()


def corrections(demo, idx, shift: str = "", chunk=None) -> list[Correction]:
    """Rows `idx` of a DemoSet as corrections (the expert's chunk, or `chunk` for every row)."""
    return [
        Correction.new(
            robot_id="r0",
            embodiment=demo.embodiment,
            episode=0,
            tick=int(i),
            image=demo.images[i],
            proprio=demo.proprio[i],
            instruction=demo.instructions[i],
            policy_chunk=demo.actions[i],
            corrected_chunk=demo.actions[i] if chunk is None else chunk,
            head_version=1,
            reason="stray",
            shift=shift,
        )
        for i in idx
    ]


def state_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["franka", "aloha"])
def test_cached_memory_gives_the_models_own_loss(demos, name):
    """cached == uncached: the head's loss on memory encoded once equals FleetPolicy.action_loss."""
    model, demo = tiny(), demos[name]
    idx = np.arange(min(12, len(demo)))
    obs = [{"image": demo.images[i], "proprio": demo.proprio[i], "instruction": demo.instructions[i]} for i in idx]
    batch = model.collate(obs, [name] * len(idx), [demo.actions[i] for i in idx])
    with torch.no_grad():
        uncached, _ = model.action_loss(batch, generator=torch.Generator().manual_seed(5))
    cached = head_loss(model.head(name), encode_demos(model, demo.subset(idx)), seed=5)
    assert cached == pytest.approx(float(uncached), rel=1e-5, abs=1e-6)


def test_a_round_trains_only_the_heads_decoder_and_changes_nothing_until_accepted(demos):
    model = tiny()
    demo = demos["franka"]
    adapter = HeadAdapter(model, "franka", demo.subset(np.arange(0, len(demo), 2)), AdaptConfig(**FAST))
    before = state_of(model)
    result = adapter.round(corrections(demo, range(1, 40, 2)))
    assert same(state_of(model), before), "a round must not touch the model"
    head = {k: v for k, v in before.items() if k.startswith("heads.franka.")}
    cand = {f"heads.franka.{k}": v for k, v in result.state.items()}
    assert cand.keys() == head.keys()
    stem = [k for k in cand if ".stem." in k]
    assert stem and all(torch.equal(cand[k], head[k]) for k in stem), "the proprio stem stays frozen"
    assert any(not torch.equal(cand[k], head[k]) for k in cand if k not in stem), "the decoder must learn"
    assert result.metrics["train_rows"] + result.metrics["holdout_rows"] == 20 and result.metrics["holdout_rows"] == 4
    adapter.accept(result, version=2)
    after = state_of(model)
    assert model.head_versions["franka"] == 2
    for k, v in before.items():
        if not k.startswith("heads.franka."):
            assert torch.equal(after[k], v), f"{k} must be bit-identical (backbone and other heads)"


def test_consistent_corrections_are_accepted_and_lower_the_held_out_loss(demos):
    model = tiny()
    demo = demos["franka"]
    adapter = HeadAdapter(model, "franka", demo.subset(np.arange(0, len(demo), 2)), AdaptConfig(**FAST))
    result = adapter.round(corrections(demo, range(1, len(demo), 2)))
    m = result.metrics
    assert result.accepted, result.reason
    assert m["after"]["holdout"] < m["before"]["holdout"]
    assert m["gate"]["on"] == "rehearsal" and m["after"]["rehearsal"] <= m["gate"]["limit"]
    # the next round reuses the accepted candidate's rehearsal scores: the same as computing them afresh
    adapter.accept(result, version=2)
    again = adapter.round(corrections(demo, range(0, 20, 2)))
    fresh = head_loss(model.head("franka"), adapter.data.rehearsal_val, seed=adapter.config.seed)
    assert again.metrics["before"]["rehearsal"] == m["after"]["rehearsal"] == pytest.approx(fresh, rel=1e-6)


def test_a_candidate_worse_on_rehearsal_is_refused(demos):
    """Corrections that teach the opposite of the rehearsal data on the same scenes: held-out corrections
    improve, rehearsal gets worse, so the candidate is refused and the model keeps its head."""
    model = tiny()
    demo = demos["franka"]
    spec = EMBODIMENTS["franka"]
    wrong = np.tile(np.asarray(spec.action_low, np.float32), (spec.chunk_size, 1))
    adapter = HeadAdapter(model, "franka", demo, AdaptConfig(**FAST | {"new_share": 1.0, "earlier_share": 0.0}))
    before = state_of(model)
    result = adapter.round(corrections(demo, range(len(demo)), chunk=wrong))
    assert not result.accepted
    assert "worse on rehearsal" in result.reason
    assert result.metrics["after"]["holdout"] < result.metrics["before"]["holdout"]
    assert same(state_of(model), before) and model.head_versions["franka"] == 1


def test_a_hardware_shift_recalibrates_the_rehearsal_labels(demos):
    """Under actuator_bias the commands are offset: the adapter estimates the offset per dimension from the
    corrections against the reference head and applies it to the rehearsal labels (train and gate)."""
    model = tiny()
    demo = demos["franka"]
    adapter = HeadAdapter(model, "franka", demo.subset(np.arange(0, len(demo), 2)), AdaptConfig(**FAST))
    idx = np.arange(1, 41, 2)
    obs = [{"image": demo.images[i], "proprio": demo.proprio[i], "instruction": demo.instructions[i]} for i in idx]
    proposals = [r["chunk"] for r in model.predict_obs(obs, ["franka"] * len(idx))]
    spec = EMBODIMENTS["franka"]
    offset = np.array([0.01, -0.008, 0, 0, 0, 0, 0], np.float32)  # a recalibrated x and y
    fixed = corrections(demo, idx, shift="actuator_bias")
    fixed = [
        Correction.new(
            **(c.to_dict() | {"id": c.id, "corrected_chunk": np.clip(p + offset, spec.action_low, spec.action_high)})
        )
        for c, p in zip(fixed, proposals, strict=True)
    ]
    first = adapter.round(fixed)
    calib = first.metrics["calibration"]
    assert first.metrics["hardware_changed"] and calib is not None
    assert calib[0] == pytest.approx(0.01, abs=1e-3) and calib[1] == pytest.approx(-0.008, abs=1e-3)
    assert all(v == 0.0 for v in calib[2:]), "dimensions without an offset keep their old labels"
    assert first.metrics["gate"]["on"] == "rehearsal" and first.metrics["rehearsal_rows"] > 0
    assert adapter.calibration is not None and adapter.data.rehearsal_train.actions.shape[-1] == 7
    # a restarted learner's adapter relearns the calibration from the corrections it reloads
    again = HeadAdapter(tiny(), "franka", None, AdaptConfig(**FAST))
    assert again.add_earlier(fixed) == len(fixed) and again.hardware_changed
    assert np.allclose(again.hardware.physical(), calib, atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="AdaptConfig.steps"):
        AdaptConfig(steps=0)
    with pytest.raises(ValueError, match="new_share"):
        AdaptConfig(new_share=0.8, earlier_share=0.5)
    with pytest.raises(ValueError, match="unknown keys"):
        AdaptConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="LearnerConfig.every"):
        LearnerConfig(every=0)
    with pytest.raises(ValueError, match="AdaptConfig: unknown"):
        LearnerConfig(adapt={"lr_": 1})
    with pytest.raises(ValueError, match="no head 'leap'"):
        HeadAdapter(tiny(("franka",)), "leap")


# ---- the learner ----------------------------------------------------------------------------------
@pytest.fixture
def fleet_parts(tmp_path, demos):
    """(model, replay store, head registry, learner factory) for a franka-only tiny fleet."""
    model = tiny(("franka",))
    replay, registry = ReplayStore(tmp_path / "log"), HeadStore(tmp_path / "heads")
    demo = demos["franka"]

    def make(**config):
        cfg = {"every": 10, "watch_episodes": 5, "reference_episodes": 10, "min_reference": 5, "adapt": FAST}
        return Learner(
            model,
            replay,
            registry,
            LearnerConfig(**cfg | config),
            rehearsal={"franka": demo.subset(np.arange(0, len(demo), 2))},
            state_dir=tmp_path / "learner",
            log_fn=lambda m: None,
        )

    return model, replay, registry, make


def add(replay, demo, idx, **kw) -> None:
    ack = replay.add(corrections(demo, idx, **kw))
    assert len(ack["accepted"]) == len(list(idx)), ack["rejected"]


def test_learner_publishes_every_n_corrections(fleet_parts, demos):
    model, replay, registry, make = fleet_parts
    learner = make()
    add(replay, demos["franka"], range(1, 9, 2))  # 4 < every
    assert learner.step() == []
    assert registry.latest() == {"franka": 1}  # the checkpoint's head, so a rollback can return to it
    add(replay, demos["franka"], range(11, 31, 2))  # 14 >= every
    (event,) = learner.step()
    assert event["event"] == "published" and event["version"] == 2, event
    assert registry.latest() == {"franka": 2} and model.head_versions["franka"] == 2
    check = tiny(("franka",))
    assert head_from_bytes(check, "franka", registry.get("franka", 2)[1]) == 2
    for k, v in model.head_state_dict("franka").items():
        assert torch.equal(check.head_state_dict("franka")[k], v), k
    assert learner.step() == [] and learner.cursors["franka"] == 14
    # a new learner (a restart) continues from its saved cursor and the registry's newest head
    fresh = tiny(("franka",), seed=3)
    again = Learner(fresh, replay, registry, learner.config, rehearsal=learner.rehearsal, state_dir=learner.state_dir)
    again.start()
    assert again.cursors["franka"] == 14 and fresh.head_versions["franka"] == 2
    assert same(fresh.head_state_dict("franka"), model.head_state_dict("franka"))


def test_the_learner_reads_idle_only_once_its_round_is_published(fleet_parts, demos):
    """A status read while the registry stores the new head must not say "idle" (it showed a version the
    registry did not hold yet, and a test waiting for "idle" read the registry too early)."""
    model, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    add(replay, demos["franka"], range(0, 24, 2))
    seen = []
    publish = registry.publish

    def watching(*args, **kwargs):
        seen.append(learner.status()["state"])
        return publish(*args, **kwargs)

    registry.publish = watching
    (event,) = learner.step()
    assert event["event"] == "published" and seen == ["adapting"]
    assert learner.status()["state"] == "idle" and learner.status()["versions"] == registry.latest() == {"franka": 2}


def test_a_round_that_dies_midway_publishes_nothing(fleet_parts, demos):
    model, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    head = model.head_state_dict("franka")
    add(replay, demos["franka"], range(0, 24, 2))

    def crash(_corrections):
        raise RuntimeError("killed mid-round")

    learner.adapters["franka"].round = crash
    with pytest.raises(RuntimeError, match="mid-round"):
        learner.step()
    assert registry.latest() == {"franka": 1} and [r["version"] for r in registry.history("franka")] == [1]
    assert model.head_versions["franka"] == 1 and same(model.head_state_dict("franka"), head)
    assert learner.cursors["franka"] == 0 and learner.state == "idle"
    del learner.adapters["franka"].round  # the next round works and gets the next number
    (event,) = learner.step()
    assert event["event"] == "published" and registry.latest() == {"franka": 2}


def test_a_head_worse_on_rehearsal_is_not_published(fleet_parts, demos):
    model, replay, registry, make = fleet_parts
    learner = make(adapt=FAST | {"new_share": 1.0, "earlier_share": 0.0})
    spec = EMBODIMENTS["franka"]
    wrong = np.tile(np.asarray(spec.action_low, np.float32), (spec.chunk_size, 1))
    add(replay, demos["franka"], range(len(demos["franka"])), chunk=wrong)
    (event,) = learner.step()
    assert event["event"] == "round_rejected" and "worse on rehearsal" in event["reason"], event
    assert registry.latest() == {"franka": 1} and model.head_versions["franka"] == 1
    assert learner.cursors["franka"] == len(demos["franka"])  # those corrections are used, not retried


def test_a_rollout_that_lowers_success_is_rolled_back(fleet_parts, demos):
    model, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    v1_payload, v1_head = registry.get("franka", 1)[1], model.head_state_dict("franka")
    ok = {"robot_id": "r0", "embodiment": "franka", "episode": 0, "success": True}
    assert learner.record_outcomes([ok | {"head_version": 1}] * 10) == 10
    add(replay, demos["franka"], range(0, 24, 2))
    (event,) = learner.step()
    assert event["event"] == "published" and learner.watch["franka"]["version"] == 2
    add(replay, demos["franka"], range(1, 25, 2))  # enough for a round, but the rollout is judged first
    bad = [ok | {"head_version": 2, "success": False}] * 4
    mixed = [ok | {"head_version": None, "success": False}]  # ran two versions: not counted
    learner.record_outcomes(bad + mixed)
    learner.adapters["franka"].round = lambda _c: pytest.fail("no round while the rollout is judged")
    assert learner.step() == []  # 4 < watch_episodes: no verdict, no new round
    del learner.adapters["franka"].round
    learner.record_outcomes(bad[:1])
    rollback, round_ = learner.step()
    assert rollback["event"] == "rollback" and rollback["rolled_back"] == 2 and rollback["version"] == 3, rollback
    assert registry.get("franka", 3)[1] == v1_payload and registry.history("franka")[2]["meta"]["restores"] == 1
    assert learner.status()["rollbacks"] == 1 and learner.outcome_counts["mixed"] == 1
    # the waiting corrections are adapted next, starting from the restored head
    assert round_["event"] in ("published", "round_rejected") and round_["from_version"] == 3
    assert registry.latest()["franka"] == (4 if round_["event"] == "published" else 3)
    if round_["event"] == "round_rejected":
        assert same(model.head_state_dict("franka"), v1_head)


def test_a_rollout_that_keeps_success_is_confirmed(fleet_parts, demos):
    _, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    ok = {"robot_id": "r0", "embodiment": "franka", "episode": 0, "success": True}
    learner.record_outcomes([ok | {"head_version": 1}] * 5 + [ok | {"head_version": 1, "success": False}] * 5)
    add(replay, demos["franka"], range(0, 24, 2))
    learner.step()
    learner.record_outcomes([ok | {"head_version": 2}] * 5)
    events = learner.step()
    assert events[0]["event"] == "rollout_confirmed" and events[0]["version"] == 2
    assert registry.latest() == {"franka": 2} and "franka" not in learner.watch


# ---- the experiment -------------------------------------------------------------------------------
def test_experiment_cli_prints_the_documented_json_and_plots(tmp_path):
    """A tiny budget end to end: the JSON shape of the issue, a PNG, and untouched other heads."""
    save_checkpoint(tiny(("franka", "hello")), tmp_path / "policy")
    args = ["experiment", "adapt", "--shift", "actuator_bias", "--checkpoint", str(tmp_path / "policy")]
    args += ["--episodes", "2", "--points", "3,6", "--other-episodes", "1", "--rehearsal-episodes", "2"]
    res = CliRunner().invoke(app, [*args, "--steps", "2", "--threads", "1", "--json", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    keys = {"embodiment", "shift", "success_before", "success_after_20", "success_after_50", "retained_before"}
    keys |= {"retained_after", "other_heads_identical", "adapt_seconds_mean", "curve", "image_adapter"}
    assert set(obj) == keys
    assert obj["image_adapter"] is None  # a tiny checkpoint has no image statistics: head rounds only
    assert obj["embodiment"] == "franka" and obj["shift"] == "actuator_bias" and obj["other_heads_identical"] is True
    assert [c for c, _ in obj["curve"]] == [0, 3, 6] and obj["success_after_20"] is None
    assert obj["adapt_seconds_mean"] > 0 and (tmp_path / "out" / "adapt.png").stat().st_size > 0
    details = json.loads((tmp_path / "out" / "adapt.json").read_text())
    assert [r["new"] for r in details["rounds"]] == [3, 3] and set(details["others_after"]) == {"hello"}


def test_experiment_cli_names_a_missing_checkpoint(tmp_path):
    res = CliRunner().invoke(
        app, ["experiment", "adapt", "--shift", "novel_object", "--checkpoint", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "not found" in res.output
    res = CliRunner().invoke(app, ["experiment", "adapt", "--shift", "fog"])
    assert res.exit_code == 2 and "--shift" in res.output


def test_a_drop_chance_explains_is_not_rolled_back(fleet_parts, demos):
    """One failure in 5 after 10 successes is a 20-point drop, but not a significant one (z ~ 1.5)."""
    _, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    ok = {"robot_id": "r0", "embodiment": "franka", "episode": 0, "success": True}
    learner.record_outcomes([ok | {"head_version": 1}] * 10)
    add(replay, demos["franka"], range(0, 24, 2))
    learner.step()
    learner.record_outcomes([ok | {"head_version": 2}] * 4 + [ok | {"head_version": 2, "success": False}])
    (event,) = learner.step()
    assert event["event"] == "rollout_confirmed" and "not significant" in event["why"], event
    assert registry.latest() == {"franka": 2}


def test_a_rollout_that_needs_more_human_help_is_rolled_back(fleet_parts, demos):
    """Success held by the teleoperator, but the new head needed it far more often: rolled back."""
    _, replay, registry, make = fleet_parts
    learner = make()
    learner.start()
    ok = {"robot_id": "r0", "embodiment": "franka", "episode": 0, "success": True}
    learner.record_outcomes([ok | {"head_version": 1, "interventions": k % 3} for k in range(10)])  # mean 0.9
    add(replay, demos["franka"], range(0, 24, 2))
    learner.step()
    learner.record_outcomes([ok | {"head_version": 2, "interventions": 3 + k % 2} for k in range(5)])  # mean 3.4
    rollback, *_ = learner.step()
    assert rollback["event"] == "rollback" and "interventions per episode rose" in rollback["reason"], rollback
    assert rollback["success"] == 1.0 and registry.history("franka")[2]["meta"]["restores"] == 1
