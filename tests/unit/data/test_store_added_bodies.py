"""The replay store takes a body added to the running fleet: its corrections (demonstrations included) are
validated against its spec, and a restarted store knows the body again and reloads its rows."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.data.correction import random_correction
from fleet.data.store import ADDED_FILE, ReplayStore
from fleet.embodiments import CATALOG, EMBODIMENTS, register_embodiment

SO100 = CATALOG["so100"]


def so100_demo(rng, **kw):
    """A valid so100 demonstration (built with a temporary registry entry, which random_correction reads)."""
    register_embodiment(SO100)
    try:
        return random_correction("so100", rng, policy_chunk=None, reason="demo", **kw)
    finally:
        EMBODIMENTS.pop("so100")


def test_an_added_body_is_accepted_and_survives_a_restart(tmp_path):
    rng = np.random.default_rng(0)
    specs = dict(EMBODIMENTS)  # this store's own registry: the process-wide one stays as it is
    store = ReplayStore(tmp_path, specs=specs)
    demo = so100_demo(rng)
    ack = store.add([demo.to_dict()])
    assert ack["accepted"] == [] and "embodiment" in ack["rejected"][0]["error"]  # unknown until registered
    assert store.register_embodiment(SO100.to_dict()) == ["so100"]
    assert store.add([demo.to_dict()])["accepted"] == [demo.id]
    assert (tmp_path / ADDED_FILE).exists()
    again = ReplayStore(tmp_path, specs=dict(EMBODIMENTS))  # a restarted replay actor
    assert again.added_at_start == ["so100"] and "so100" in again.specs
    (got,) = again.since("so100", 0)["corrections"]
    assert got == store.since("so100", 0)["corrections"][0] and got.policy_chunk is None
    assert "so100" not in EMBODIMENTS


def test_registering_refuses_a_builtin_name_and_a_malformed_spec(tmp_path):
    store = ReplayStore(tmp_path, specs=dict(EMBODIMENTS))
    with pytest.raises(ValueError, match="built in"):
        store.register_embodiment(EMBODIMENTS["franka"].to_dict())
    with pytest.raises((ValueError, TypeError)):
        store.register_embodiment(SO100.to_dict() | {"action_dim": -1})
    assert not (tmp_path / ADDED_FILE).exists()
    (tmp_path / ADDED_FILE).write_text("{not json")
    assert ReplayStore(tmp_path, specs=dict(EMBODIMENTS)).added_at_start == []  # unreadable: a warning, no crash


def test_an_export_of_a_fleets_log_includes_the_added_bodys_demonstrations(tmp_path):
    """`fleet export-corrections --log-dir` runs in a process that never registered so100: the spec kept beside
    the log lets the export validate and write its records (before, they were skipped without a word)."""
    from fleet.data.export import export_corrections

    rng = np.random.default_rng(1)
    store = ReplayStore(tmp_path / "log", specs=dict(EMBODIMENTS))
    store.register_embodiment(SO100.to_dict())
    demos = [so100_demo(rng, robot_id="robot-so100-0", episode=0, tick=t) for t in range(3)]
    franka = random_correction("franka", rng)
    assert len(store.add([c.to_dict() for c in demos] + [franka.to_dict()])["accepted"]) == 4
    assert "so100" not in EMBODIMENTS
    summary = export_corrections(tmp_path / "log", tmp_path / "out")
    assert summary["embodiments"] == {"franka": 1, "so100": 3}  # one exported episode per record
    assert sorted(summary["datasets"]) == ["franka", "so100"]
