"""FleetConfig and the fleet CLI's argument parsing, without Ray: clear errors naming the bad field or item."""

from __future__ import annotations

import json

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from fleet.cli.fleet_cmds import parse_counts, parse_shifts, register
from fleet.cli.fleet_table import COLUMNS, added_line, learner_line, render_table
from fleet.cluster.config import FleetConfig
from fleet.cluster.launcher import FleetError, checkpoint_meta


def test_defaults_one_robot_per_embodiment():
    cfg = FleetConfig()
    assert cfg.robots == {"franka": 1, "aloha": 1, "hello": 1, "leap": 1}
    assert cfg.namespace == "fleet" and cfg.route == "direct" and cfg.cluster_cpus >= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"robots": {"spot": 1}}, "FleetConfig.robots.*spot"),
        ({"robots": {"franka": -1}}, "FleetConfig.robots.*franka"),
        ({"robots": {}}, "FleetConfig.robots"),
        ({"shift": {"franka": "fog"}}, r"FleetConfig.shift\['franka'\]"),
        ({"replicas": 0}, "FleetConfig.replicas"),
        ({"route": "carrier-pigeon"}, "FleetConfig.route"),
        ({"object_store_mb": 10}, "FleetConfig.object_store_mb"),
        ({"robot_resources": {"robot": -1}}, "FleetConfig.robot_resources"),
        ({"adapt": "yes"}, "FleetConfig.adapt"),
        ({"adapt_every": 0}, "FleetConfig.adapt_every"),
        ({"learner": {"every": 5, "bogus": 1}}, "FleetConfig.learner.*bogus"),
        ({"learner": {"adapt": {"stepz": 1}}}, "FleetConfig.learner.*AdaptConfig.*stepz"),
        ({"robot": {"aggregate": "blend"}}, "FleetConfig.robot: RobotConfig.aggregate"),
        ({"robot": {"robot_id": "r0"}}, "FleetConfig.robot.*robot_id"),
        ({"robot": ["rtc"]}, "FleetConfig.robot"),
    ],
)
def test_bad_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        FleetConfig.from_dict(changes)


def test_from_file_yaml_and_json(tmp_path):
    (tmp_path / "f.yaml").write_text("robots: {franka: 3, leap: 0}\nrealtime: false\nshift: {franka: lighting}\n")
    cfg = FleetConfig.from_file(tmp_path / "f.yaml")
    assert cfg.robots == {"franka": 3, "leap": 0} and cfg.realtime is False and cfg.shift == {"franka": "lighting"}
    (tmp_path / "f.json").write_text(json.dumps({"robots": {"hello": 2}, "replicas": 2}))
    assert FleetConfig.from_file(tmp_path / "f.json").replicas == 2
    (tmp_path / "bad.json").write_text(json.dumps({"robotz": {"hello": 2}}))
    with pytest.raises(ValueError, match=r"unknown keys \['robotz'\]"):
        FleetConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"robot": {"hello": 2}}))  # meant robots
    with pytest.raises(ValueError, match=r"FleetConfig.robot: expected RobotConfig keys .*got \['hello'\]"):
        FleetConfig.from_file(tmp_path / "typo.json")
    (tmp_path / "broken.yaml").write_text("robots: [unclosed")
    with pytest.raises(ValueError, match="broken.yaml: not valid yaml"):
        FleetConfig.from_file(tmp_path / "broken.yaml")
    with pytest.raises(ValueError, match="cannot read"):
        FleetConfig.from_file(tmp_path / "missing.json")


def test_parse_counts_is_strict():
    assert parse_counts("franka=2, aloha=1") == {"franka": 2, "aloha": 1}
    assert parse_counts(["franka=8", "leap=0"], "scale") == {"franka": 8, "leap": 0}
    for bad, message in [
        ("frank=2", "unknown embodiment 'frank'"),
        ("franka", "not embodiment=count"),
        ("franka=two", "the count for franka"),
        ("franka=-1", "the count for franka"),
        ("franka=1,franka=2", "franka is given twice"),
        ("", "expected embodiment=count"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_counts(bad)
    # `fleet scale` also takes a body added to the running fleet; the fleet says whether it has one
    assert parse_counts(["so100=2", "franka=1"], "scale", added=True) == {"so100": 2, "franka": 1}
    for bad in ("so-100=2", "so100=x"):
        with pytest.raises(ValueError, match="unknown embodiment|the count"):
            parse_counts(bad, "scale", added=True)


def test_parse_shifts():
    assert parse_shifts(["franka:actuator_bias", "hello:lighting+distractors"]) == {
        "franka": "actuator_bias",
        "hello": "lighting+distractors",
    }
    with pytest.raises(ValueError, match="not embodiment:shift"):
        parse_shifts(["franka"])
    with pytest.raises(ValueError, match="--shift 'franka:fog'"):
        parse_shifts(["franka:fog"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FleetError, match="policy.safetensors and policy.json are both needed"):
        checkpoint_meta(str(tmp_path / "policy"))


def test_cli_refuses_bad_arguments_before_touching_ray():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = runner.invoke(app, ["up", "--robots", "franka=2,frank=1"])
    assert out.exit_code == 2 and "unknown embodiment 'frank'" in out.output
    out = runner.invoke(app, ["scale", "franka=x"])
    assert out.exit_code == 2 and "the count for franka" in out.output
    out = runner.invoke(app, ["up", "--help"])
    assert out.exit_code == 0 and "fleet up --robots" in out.output
    out = runner.invoke(app, ["up", "--aggregate", "blend"])
    assert out.exit_code == 2 and "RobotConfig.aggregate" in out.output


def test_robot_keys_reach_every_robot_config():
    cfg = FleetConfig.from_dict({"robot": {"aggregate": "rtc", "n_samples": 2}})
    assert cfg.robot == {"aggregate": "rtc", "n_samples": 2} and cfg.to_dict()["robot"]["aggregate"] == "rtc"


def test_adapt_config_reaches_the_learner_and_the_table_shows_it():
    cfg = FleetConfig(adapt=True, adapt_every=20, learner={"adapt": {"steps": 80}})
    assert cfg.learner_config() == {"every": 20, "adapt": {"steps": 80}}
    assert cfg.cluster_cpus >= FleetConfig().cluster_cpus
    learner = {
        "state": "idle",
        "rounds": 3,
        "published": 2,
        "rollbacks": 1,
        "last_round": {"event": "published", "embodiment": "franka", "version": 4, "seconds": 2.5},
        "watch": {"franka": {"version": 4, "episodes": 3, "needed": 10}},
    }
    line = learner_line(learner)
    assert "3 rounds, 2 published, 1 rolled back" in line and "franka v4 in 2.5 s" in line and "3/10" in line
    table = render_table({"robots": [], "heads": {"franka": 4}, "learner": learner})
    assert "franka v4" in table.caption and "learner: idle" in table.caption
    assert "image adapters" not in line
    dim = {"dx": 0, "dy": 0, "gain": [1.8, 1.9, 1.8], "bias": [-0.3, -0.2, 0.1]}
    knocked = {"dx": 4, "dy": -3, "gain": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0]}
    adapted = learner | {"image_adapters": {"robot-franka-1": dim, "robot-aloha-0": knocked}}
    table = render_table({"robots": [], "heads": {"franka": 4}, "learner": adapted})
    assert "image adapters: aloha-0 (+4,-3 px, gain 1.00), franka-1 (+0,+0 px, gain 1.83)" in table.caption


def test_the_live_table_fits_an_80_column_terminal():
    def row(name, state, error=None):
        return {"id": f"robot-{name}", "state": state, "control_hz": 20.0, "episodes": 1234, "success_rate": 1.0,
                "recent_success_rate": 0.95, "interventions": 12345, "head_version": 12, "latency_p50_ms": 499.9,
                "latency_p99_ms": 1234.5, "last_error": error}  # fmt: skip

    error = "policy request failed: " + "TimeoutError " * 20
    robots = [row("franka-10", "conservative", error), row("leap-0", "human")]
    learner = {"state": "idle", "rounds": 3, "published": 2, "rollbacks": 1}
    console = Console(width=80, record=True)
    console.print(render_table({"robots": robots, "heads": {"franka": 12}, "learner": learner}, title="fleet  25s"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text  # nothing truncated by the table itself
    header = next(line for line in lines if line.startswith("robot"))
    assert header.split() == [w for h, _ in COLUMNS for w in h.split()]
    assert "franka-10  conservative" in text and "1234.5" in text and "v12" in text
    assert any(line.startswith("franka-10: policy request failed") and line.endswith("...") for line in lines)


def test_the_live_table_says_how_to_reset_a_latched_estop():
    robots = [{"id": "robot-franka-0", "state": "estop", "estop_latched": True}, {"id": "robot-leap-0"}]
    table = render_table({"robots": robots, "heads": {}})
    assert "e-stop latched: franka-0; once clear: fleet estop reset robot-franka-0" in table.caption
    assert "e-stop" not in render_table({"robots": robots[1:], "heads": {}}).caption


def test_an_added_body_shows_its_phase_in_the_fleet_table():
    """`fleet status` lists an added body's robots with the others (state "demo" while the operator drives) and
    says how far its onboarding is, in 80 columns."""
    demo = {"id": "robot-so100-0", "embodiment": "so100", "state": "normal", "phase": "demonstrations"}
    policy = {"id": "robot-so100-1", "embodiment": "so100", "state": "normal", "phase": "policy", "head_version": 1}
    added = {"so100": {"phase": "demonstrations", "head_version": 0, "demos": 16, "first_round_demos": 20}}
    console = Console(width=80, record=True)
    console.print(render_table({"robots": [demo, policy], "heads": {"franka": 1}, "added": added}))
    text = console.export_text()
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("so100-")}
    assert rows == {"so100-0": "demo", "so100-1": "normal"}
    assert "added so100: demonstrations, 16 / 20 for round 1" in text
    training = {"round": 1, "stage": "training", "done": 350, "steps": 1000, "demos": 47}
    line = added_line("so100", added["so100"] | {"training": training})
    assert line == "added so100: demonstrations, round 1 training (350 / 1000 steps, 47 demos)"
    assert added_line("so100", {"phase": "policy", "head_version": 2}) == "added so100: policy, head v2"
    assert max(len(x) for x in text.splitlines()) <= 80
