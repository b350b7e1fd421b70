"""Chaos tier: faults injected into a real local Ray (one per session, as the integration tier's). Every test
here is marked `chaos` and skipped by the default run; `python -m pytest -q -m chaos` runs them. Each prints
the figures it measured (run with -s to see them)."""

from __future__ import annotations

import uuid

import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.train import build_model
from tests.integration.conftest import ray_session  # noqa: F401 - the session's Ray, shared with this tier
from tests.mocks.tiny_policy import TINY

NAMES = tuple(EMBODIMENTS)[:4]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A tiny policy checkpoint (the real architecture, built in milliseconds)."""
    ckpt = tmp_path_factory.mktemp("chaos-policy") / "policy"
    save_checkpoint(build_model(NAMES, 0, TINY), ckpt)
    return str(ckpt)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:6]
