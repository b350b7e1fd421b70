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
