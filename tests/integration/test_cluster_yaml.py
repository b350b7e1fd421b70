"""cluster.yaml is a valid Ray cluster-launcher config: Ray's own schema, and Ray's own checks after its defaults."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_validates_against_rays_schema(config):
    jsonschema.validate(config, ray_schema())


def test_passes_rays_own_preparation_and_checks(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before launching anything


def test_node_types_carry_the_fleet_resources(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    robot = [t for t in types.values() if "robot" in t["resources"]]
    policy = [t for t in types.values() if "policy" in t["resources"]]
    assert robot and all(t["resources"]["robot"] > 0 and t.get("min_workers", 0) >= 1 for t in robot)
    assert policy and all(t["resources"]["GPU"] >= 1 and t["resources"]["policy"] >= 1 for t in policy)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("pip install" in c and "vla-fleet" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_schema_catches_a_broken_config(config):
    """The schema check is not vacuous: a node type without resources is refused."""
    broken = copy.deepcopy(config)
    del broken["available_node_types"]["robot.cpu"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, ray_schema())


def test_every_node_runs_ray_with_the_clusters_token(config, tmp_path, monkeypatch):
    """Token authentication on every node: the token file travels from the launching machine to Ray's default
    path on each node, owner-only; every `ray start` and every login shell runs with RAY_AUTH_MODE=token."""
    from ray.autoscaler._private.util import hash_runtime_conf

    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts)
    setup = "\n".join(config["setup_commands"])
    assert "chmod 600 ~/.ray/auth_token" in setup and "export RAY_AUTH_MODE=token' >> ~/.bashrc" in setup

    # what `ray up` does with file_mounts before syncing them: a missing token stops it, naming the file
    monkeypatch.setenv("HOME", str(tmp_path))
    token_only = {"~/.ray/auth_token": config["file_mounts"]["~/.ray/auth_token"]}
    with pytest.raises(FileNotFoundError, match="auth_token"):
        hash_runtime_conf(token_only, None, {"token-test": 1}, generate_file_mounts_contents_hash=True)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    runtime_hash, contents_hash = hash_runtime_conf(
        token_only, None, {"token-test": 2}, generate_file_mounts_contents_hash=True
    )
    assert runtime_hash and contents_hash
