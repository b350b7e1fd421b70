"""The embodiment registry: the four bodies from the design, spec validation, registering a fifth robot."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import fleet.sim
from fleet.embodiments import (
    BUILTIN_EMBODIMENTS,
    EMBODIMENTS,
    EmbodimentSpec,
    get_embodiment,
    register_embodiment,
)
from fleet.sim import env_names, make_env, register_env
from tests.mocks.sim_helpers import NAMES, POINTER_SPEC, PointerEnv, expert_success

# name -> (action_dim, head) from the design's table
DESIGN_TABLE = {"franka": (7, "token"), "aloha": (14, "flow"), "hello": (3, "token"), "leap": (24, "flow")}


def _kwargs(**overrides) -> dict:
    """Valid constructor kwargs of a small 3-D test spec, with overrides."""
    kw = dict(
        name="testbot",
        action_dim=3,
        head="flow",
        proprio_dim=4,
        action_low=(-1.0, -1.0, 0.0),
        action_high=(1.0, 1.0, 2.0),
        max_velocity=(1.0, 1.0, 1.0),
        max_force=10.0,
        control_hz=10.0,
    )
    kw.update(overrides)
    return kw


@pytest.fixture
def fifth_robot():
    """Register the `pointer` spec and simulator; remove both afterwards whatever the test did."""
    env_names()  # load the built-in simulators first (see test_register_env_before_first_make_env_keeps_builtins)
    saved_specs, saved_envs = dict(EMBODIMENTS), dict(fleet.sim._REGISTRY)
    register_embodiment(POINTER_SPEC)
    register_env("pointer", PointerEnv)
    yield POINTER_SPEC
    EMBODIMENTS.clear()
    EMBODIMENTS.update(saved_specs)
    fleet.sim._REGISTRY.clear()
    fleet.sim._REGISTRY.update(saved_envs)


@pytest.fixture
def clean_registry():
    """Restore EMBODIMENTS after a test that registers specs itself."""
    saved = dict(EMBODIMENTS)
    yield
    EMBODIMENTS.clear()
    EMBODIMENTS.update(saved)


# ---- the built-in bodies ---------------------------------------------------------------------------------
def test_builtin_registry_is_the_design_table():
    assert BUILTIN_EMBODIMENTS == NAMES
    assert set(NAMES) <= set(EMBODIMENTS)


@pytest.mark.parametrize("name", NAMES)
def test_builtin_spec_fields(name):
    spec = get_embodiment(name)
    action_dim, head = DESIGN_TABLE[name]
    assert spec is EMBODIMENTS[name]
    assert (spec.name, spec.action_dim, spec.head) == (name, action_dim, head)
    assert spec.chunk_size == 16 and spec.recompute_every == 4
    for field in ("action_low", "action_high", "max_velocity", "dim_names"):
        value = getattr(spec, field)
        assert isinstance(value, tuple) and len(value) == action_dim, field
    assert all(lo < hi for lo, hi in zip(spec.action_low, spec.action_high, strict=True))
    assert all(v > 0 for v in spec.max_velocity)
    assert spec.max_force > 0 and math.isfinite(spec.max_force)
    assert spec.proprio_dim >= 1 and spec.max_episode_steps >= 1
    assert len(set(spec.dim_names)) == action_dim
    assert spec.token == f"[EMB_{name.upper()}]"
    assert spec.dt == pytest.approx(1.0 / spec.control_hz)
    assert spec.velocity_norm_bound == pytest.approx(math.sqrt(sum(v * v for v in spec.max_velocity)))
    assert spec.description


def test_specs_are_frozen_and_hashable():
    spec = get_embodiment("franka")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_force = 1e9  # type: ignore[misc]
    assert len({get_embodiment(n) for n in NAMES}) == 4


def test_get_embodiment_unknown_lists_known():
    with pytest.raises(ValueError, match="'spot'") as exc:
        get_embodiment("spot")
    for name in NAMES:
        assert name in str(exc.value)


def test_dim_names_default_and_velocity_norm_override():
    spec = EmbodimentSpec(**_kwargs(max_velocity_norm=0.5))
    assert spec.dim_names == ("a0", "a1", "a2")
    assert spec.velocity_norm_bound == 0.5
    assert spec.token == "[EMB_TESTBOT]"


def test_bounds_are_normalised_to_float_tuples():
    spec = EmbodimentSpec(
        **_kwargs(action_low=[-1, -1, 0], action_high=np.array([1.0, 1.0, 2.0]), max_velocity=[1, 1, 1])
    )
    assert spec.action_low == (-1.0, -1.0, 0.0) and type(spec.action_low[0]) is float
    assert spec.action_high == (1.0, 1.0, 2.0) and type(spec.action_high[0]) is float
    assert spec == EmbodimentSpec(**_kwargs())


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_numpy_bounds_accepted(dtype):
    spec = EmbodimentSpec(**_kwargs(action_low=np.array([-1, -1, 0], dtype=dtype), max_velocity=np.ones(3, dtype)))
    assert spec.action_low == (-1.0, -1.0, 0.0) and type(spec.action_low[0]) is float


# ---- validation: malformed specs name the field --------------------------------------------------------
MALFORMED = [
    ("name", {"name": "Franka"}),
    ("name", {"name": "my robot"}),
    ("name", {"name": ""}),
    ("name", {"name": "9lives"}),
    ("name", {"name": 7}),
    ("action_dim", {"action_dim": 0}),
    ("action_dim", {"action_dim": 2.5}),
    ("head", {"head": "diffusion"}),
    ("head", {"head": "Token"}),
    ("head", {"head": None}),
    ("proprio_dim", {"proprio_dim": 0}),
    ("action_low", {"action_low": (-1.0, -1.0)}),
    ("action_low", {"action_low": (-1.0, -1.0, 0.0, 0.0)}),
    ("action_high", {"action_high": (1.0,)}),
    ("max_velocity", {"max_velocity": (1.0, 1.0)}),
    ("action_low", {"action_low": (-1.0, float("nan"), 0.0)}),
    ("action_high", {"action_high": (1.0, float("inf"), 2.0)}),
    ("action_low", {"action_low": (-1.0, "x", 0.0)}),
    ("action_low/action_high", {"action_low": (-1.0, 1.0, 0.0)}),  # low == high in dim 1
    ("action_low/action_high", {"action_low": (-1.0, -1.0, 3.0)}),  # low > high in dim 2
    ("max_velocity", {"max_velocity": (1.0, 0.0, 1.0)}),
    ("max_velocity", {"max_velocity": (1.0, -2.0, 1.0)}),
    ("max_force", {"max_force": 0.0}),
    ("max_force", {"max_force": -5.0}),
    ("max_force", {"max_force": float("nan")}),
    ("max_force", {"max_force": float("inf")}),
    ("max_force", {"max_force": "30"}),
    ("control_hz", {"control_hz": 0.0}),
    ("control_hz", {"control_hz": 5000.0}),
    ("chunk_size", {"chunk_size": 0}),
    ("recompute_every", {"recompute_every": 0}),
    ("recompute_every", {"recompute_every": 17}),
    ("max_velocity_norm", {"max_velocity_norm": 0.0}),
    ("max_velocity_norm", {"max_velocity_norm": -1.0}),
    ("max_acceleration", {"max_acceleration": (1.0, 1.0)}),
    ("max_acceleration", {"max_acceleration": (1.0, 0.0, 1.0)}),
    ("max_episode_steps", {"max_episode_steps": 0}),
    ("dim_names", {"dim_names": ("x", "y")}),
]


@pytest.mark.parametrize(("field", "overrides"), MALFORMED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MALFORMED)])
def test_malformed_spec_rejected_naming_the_field(field, overrides):
    with pytest.raises(ValueError) as exc:
        EmbodimentSpec(**_kwargs(**overrides))
    assert f"field {field!r}" in str(exc.value), str(exc.value)


# Malformed *types* that currently escape validation or raise a bare TypeError without naming the field.
MALFORMED_TYPES = [
    pytest.param(
        "action_low",
        {"action_low": 0.0},
        id="scalar-action_low",
    ),
    pytest.param(
        "max_acceleration",
        {"max_acceleration": 1.0},
        id="scalar-max_acceleration",
    ),
    pytest.param(
        "max_velocity_norm",
        {"max_velocity_norm": "fast"},
        id="str-max_velocity_norm",
    ),
    pytest.param(
        "max_velocity_norm",
        {"max_velocity_norm": float("inf")},
        id="inf-max_velocity_norm",
    ),
    pytest.param(
        "action_dim",
        {"action_dim": True, "action_low": (0.0,), "action_high": (1.0,), "max_velocity": (1.0,)},
        id="bool-action_dim",
    ),
    pytest.param(
        "max_force",
        {"max_force": True},
        id="bool-max_force",
    ),
]


@pytest.mark.parametrize(("field", "overrides"), MALFORMED_TYPES)
def test_malformed_types_rejected_naming_the_field(field, overrides):
    with pytest.raises(ValueError) as exc:
        EmbodimentSpec(**_kwargs(**overrides))
    assert f"field {field!r}" in str(exc.value), str(exc.value)


def test_dim_names_list_is_normalised_to_tuple():
    spec = EmbodimentSpec(**_kwargs(dim_names=["x", "y", "z"]))
    assert spec == EmbodimentSpec(**_kwargs(dim_names=("x", "y", "z")))
    hash(spec)


# ---- serialisation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_to_dict_from_dict_round_trip(name):
    spec = get_embodiment(name)
    d = spec.to_dict()
    assert {f.name for f in dataclasses.fields(EmbodimentSpec)} == set(d)
    assert EmbodimentSpec.from_dict(d) == spec
    # through JSON as stored in checkpoint metadata
    again = EmbodimentSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec
    assert again.to_dict() == d
    assert hash(again) == hash(spec)


def test_round_trip_with_optional_fields():
    spec = EmbodimentSpec(
        **_kwargs(max_velocity_norm=1.5, max_acceleration=(2.0, 2.0, 3.0), dim_names=("x", "y", "z"), description="d")
    )
    assert EmbodimentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_from_dict_validates():
    d = get_embodiment("franka").to_dict()
    d["max_force"] = -1.0
    with pytest.raises(ValueError, match="'max_force'"):
        EmbodimentSpec.from_dict(d)
    d = get_embodiment("franka").to_dict()
    d["action_high"] = d["action_high"][:-1]
    with pytest.raises(ValueError, match="'action_high'"):
        EmbodimentSpec.from_dict(d)
    d = get_embodiment("franka").to_dict()
    d["surprise"] = 1
    with pytest.raises(TypeError, match="surprise"):
        EmbodimentSpec.from_dict(d)


def test_from_dict_does_not_mutate_input():
    d = get_embodiment("aloha").to_dict()
    before = json.dumps(d)
    EmbodimentSpec.from_dict(d)
    assert json.dumps(d) == before


# ---- registering a fifth robot -------------------------------------------------------------------------
def test_register_fifth_robot(fifth_robot):
    assert len(EMBODIMENTS) == 5
    assert get_embodiment("pointer") is fifth_robot
    assert "pointer" in env_names()
    env = make_env("pointer", seed=3)
    obs, info = env.reset()
    assert obs["proprio"].shape == (4,) and env.action_space.shape == (2,)
    assert info["is_success"] is False
    check_env(env.unwrapped, skip_render_check=True)
    ok, n, failed = expert_success(make_env("pointer"), range(20))
    assert ok == n, f"pointer expert failed on seeds {failed}"
    # the built-in bodies are untouched
    assert set(NAMES) <= set(env_names())
    assert make_env("franka").unwrapped.embodiment_spec is EMBODIMENTS["franka"]


def test_fifth_robot_is_removed_by_fixture():
    # runs after test_register_fifth_robot in file order: the fixture restored the registries
    assert "pointer" not in EMBODIMENTS
    assert "pointer" not in env_names()
    assert len(EMBODIMENTS) == 4


def test_register_refuses_duplicates(fifth_robot):
    with pytest.raises(ValueError, match="'pointer'.*already registered"):
        register_embodiment(POINTER_SPEC)
    with pytest.raises(ValueError, match="'franka'.*already registered"):
        register_embodiment(dataclasses.replace(get_embodiment("franka"), max_force=99.0))
    # replace=True may swap a user body, never a built-in one
    with pytest.raises(ValueError, match="'franka'.*built in"):
        register_embodiment(dataclasses.replace(get_embodiment("franka"), max_force=99.0), replace=True)
    assert get_embodiment("franka").max_force == 30.0
    stronger = dataclasses.replace(POINTER_SPEC, max_force=20.0)
    assert register_embodiment(stronger, replace=True) is stronger
    assert get_embodiment("pointer").max_force == 20.0


def test_register_rejects_non_specs(clean_registry):
    with pytest.raises(TypeError, match="EmbodimentSpec"):
        register_embodiment(POINTER_SPEC.to_dict())  # type: ignore[arg-type]
    assert "pointer" not in EMBODIMENTS


def test_register_spec_without_simulator(clean_registry):
    register_embodiment(dataclasses.replace(POINTER_SPEC, name="ghost"))
    assert get_embodiment("ghost").name == "ghost"
    with pytest.raises(ValueError, match="'ghost'"):
        make_env("ghost")


def test_register_env_rejects_non_fleet_env():
    with pytest.raises(TypeError, match="FleetEnv"):
        register_env("pointer", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="FleetEnv"):
        register_env("pointer", make_env("franka"))  # type: ignore[arg-type]
    assert "pointer" not in fleet.sim._REGISTRY


def test_make_env_unknown_name():
    with pytest.raises(ValueError, match="'spot'") as exc:
        make_env("spot")
    assert "franka" in str(exc.value)


@pytest.mark.xfail(
    strict=True,
    reason="BUG fleet/sim/__init__.py:33-39 make_env/env_names load the built-ins only `if not _REGISTRY`, so a "
    "register_env() before the first make_env() leaves _REGISTRY non-empty and franka/aloha/hello/leap are "
    "never registered ('no simulator for embodiment franka')",
)
def test_register_env_before_first_make_env_keeps_builtins(monkeypatch, clean_registry):
    monkeypatch.setattr(fleet.sim, "_REGISTRY", {})  # as in a fresh process
    register_embodiment(POINTER_SPEC)
    register_env("pointer", PointerEnv)
    assert set(NAMES) | {"pointer"} <= set(env_names())
    make_env("franka")
