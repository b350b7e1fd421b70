"""Integration tier: one real local Ray for the whole test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray (2 CPUs, small object store) shared by every integration test."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": never join a stale cluster left in /tmp/ray by `ray start` or `fleet up`
        ray.init(
            address="local",
            num_cpus=int(os.environ.get("FLEET_TEST_CPUS", "4")),
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            namespace="fleet-tests",
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
