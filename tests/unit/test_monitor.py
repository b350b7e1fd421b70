"""Monitor: drift detector power and false-alarm rate (fixed seeds), success-drop and latency alarms, snapshot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet.monitor import DriftDetector, Monitor, MonitorConfig


def detector(dim: int) -> DriftDetector:
    """A detector with the monitor's default settings."""
    cfg = MonitorConfig()
    return DriftDetector(dim, cfg.drift_window, cfg.drift_reference, cfg.drift_check_every, cfg.drift_alpha)


@pytest.mark.parametrize(("dim", "seed"), [(3, 0), (7, 1), (24, 2)])
def test_drift_false_alarms_on_under_one_percent_of_stationary_windows(dim, seed):
    rng = np.random.default_rng(seed)
    det = detector(dim)
    scale = rng.uniform(0.1, 5.0, dim)  # per-dimension scales and offsets must not matter
    for x in rng.standard_normal((21_000, dim)) * scale + 3.0:
        det.add(x)
    assert det.checks >= 2000
    assert det.alarms / det.checks < 0.01


def test_drift_false_alarms_with_correlated_dimensions():
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(14, 14))
    det = detector(14)
    for x in rng.standard_normal((21_000, 14)) @ mix:  # Bonferroni holds whatever the correlation
        det.add(x)
    assert det.alarms / det.checks < 0.01


@pytest.mark.parametrize("dim", [3, 7, 14, 24])
@pytest.mark.parametrize("which", ["one", "all"])
@pytest.mark.parametrize("seed", range(3))
def test_half_sigma_mean_shift_detected_within_200_samples(dim, which, seed):
    rng = np.random.default_rng(100 + seed)
    sigma = rng.uniform(0.1, 5.0, dim)
    det = DriftDetector(dim)
    for x in rng.standard_normal((det.window + det.reference, dim)) * sigma:
        det.add(x)
    shift = np.zeros(dim)
    if which == "one":
        shift[dim // 2] = 0.5 * sigma[dim // 2]
    else:
        shift[:] = 0.5 * sigma
    detected = [det.add(x * sigma + shift) for x in rng.standard_normal((200, dim))]
    assert any(detected)
    if which == "one":
        assert det.z_dim == dim // 2 or not det.alarm  # the alarm points at the shifted dimension


def test_monitor_reports_drift_alarm_per_embodiment():
    rng = np.random.default_rng(7)
    mon = Monitor()
    for x in rng.standard_normal((1000, 3)):
        mon.record_action("hello", x)
    assert mon.alarms() == []
    fired = [mon.record_action("hello", x + [0.0, 0.0, 0.5]) for x in rng.standard_normal((200, 3))]
    assert any(fired)
    kinds = {a["kind"] for a in mon.alarm_log}
    assert "action_drift" in kinds and mon.snapshot()["drift"]["hello"]["alarms"] >= 1


def test_success_drop_alarm_per_robot_embodiment_and_fleet():
    cfg = MonitorConfig(success_window=20, success_reference=40, success_drop=0.2, success_min_count=10)
    mon = Monitor(cfg)
    for i in range(60):
        mon.record_episode("r1", "franka", success=i % 10 != 0)  # 90%
        mon.record_episode("r2", "hello", success=i % 10 != 0)
    assert mon.alarms() == []
    for i in range(20):
        mon.record_episode("r1", "franka", success=i % 2 == 0)  # 50%
        mon.record_episode("r2", "hello", success=i % 10 != 0)
    keys = {(a["scope"], a["key"]) for a in mon.alarms() if a["kind"] == "success_drop"}
    assert keys == {("robot", "r1"), ("embodiment", "franka")}  # the fleet's windows mix r1 and r2: 70% vs 70%
    assert mon.success_rate(robot_id="r1") == 0.5 and mon.success_rate(embodiment="hello") == 0.9
    assert mon.success_rate() == pytest.approx(0.7)
    for _ in range(20):
        mon.record_episode("r2", "hello", success=False)
    keys = {(a["scope"], a["key"]) for a in mon.alarms() if a["kind"] == "success_drop"}
    assert ("fleet", "fleet") in keys and ("robot", "r2") in keys


def test_success_alarm_needs_the_minimum_count():
    mon = Monitor(MonitorConfig(success_window=20, success_reference=40, success_min_count=15))
    for ok in [True] * 10 + [False] * 20:
        mon.record_episode("r1", "leap", ok)
    assert mon.alarms() == []  # 10 reference episodes < 15


def test_latency_percentiles_and_budget_alarm():
    mon = Monitor(MonitorConfig(latency_budget_ms=90.0, latency_min_count=20))
    for ms in range(1, 101):
        mon.record_latency("r1", float(ms))
    lat = mon.latency("r1")
    assert lat["count"] == 100 and lat["p50"] == pytest.approx(50.5) and lat["p99"] == pytest.approx(99.01)
    assert {(a["kind"], a["key"]) for a in mon.alarms()} == {("latency", "r1"), ("latency", "fleet")}
    for _ in range(900):
        mon.record_latency("r1", 10.0)  # the window moves on: back under budget
    assert mon.alarms() == [] and len(mon.alarm_log) == 2


def test_snapshot_is_plain_json():
    mon = Monitor(MonitorConfig(success_window=5, success_reference=5, success_min_count=2))
    rng = np.random.default_rng(0)
    for i in range(12):
        mon.record_episode(f"r{i % 2}", "aloha", success=bool(i % 3), t=float(i))
        mon.record_latency(f"r{i % 2}", 30.0 + i)
        mon.record_action("aloha", rng.normal(size=14))
    snap = json.loads(json.dumps(mon.snapshot(), allow_nan=False))
    assert set(snap) == {"success", "drift", "latency", "alarms", "alarm_log"}
    assert snap["success"]["embodiment"]["aloha"]["episodes"] == 12
    assert [p["episodes"] for p in snap["success"]["fleet"]["fleet"]["history"]] == [5, 10]
    assert set(snap["latency"]["robot"]) == {"r0", "r1"} and snap["latency"]["fleet"]["count"] == 12
    assert snap["drift"]["aloha"]["samples"] == 12


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.record_action("franka", np.zeros((2, 7))), "action"),
        (lambda m: (m.record_action("franka", np.zeros(7)), m.record_action("franka", np.zeros(6))), r"\(7,\)"),
        (lambda m: m.record_action("franka", np.full(7, np.nan)), "finite"),
        (lambda m: m.record_latency("r1", -1.0), "ms"),
        (lambda m: m.record_episode("r1", "franka", "yes"), "success"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(Monitor())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"drift_window": 1}, "drift_window"),
        ({"drift_alpha": 0.0}, "drift_alpha"),
        ({"success_drop": 1.0}, "success_drop"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MonitorConfig(**kwargs)
