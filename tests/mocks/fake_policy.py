"""Fake policy servers for `fleet.robot.RobotLoop`: they speak the PolicyClient protocol (submit / poll / cancel).

    env = make_env("franka")
    client = ExpertPolicy(env)                 # answers with the simulator expert's chunk
    loop = RobotLoop(RobotConfig("r0", "franka"), client, env=env)
    client.mode = "dead"                       # from now on every call fails, as if the server died

Modes: "expert" (the privileged expert's chunk, confident), "slow" (the expert, `delay_polls` polls late),
"dead" (submit raises), "hung" (accepted, never answered), "error" (the server's error reply),
"noisy" (flow samples that disagree wildly: low confidence), "novel" (features far from `FEATURE_STATS`),
"zeros" (the stop action: a useless policy whose episodes fail).
"""

from __future__ import annotations

import time

import numpy as np

from fleet.embodiments import get_embodiment

MODES = ("expert", "slow", "dead", "hung", "error", "noisy", "novel", "zeros")
FEATURE_DIM = 4
FEATURE_STATS = {"mean": [0.0] * FEATURE_DIM, "precision": np.eye(FEATURE_DIM).tolist()}
# in-distribution features for the "novel" mode: the fake sends features at distance ~50 from these


class FakePolicy:
    """A scripted PolicyClient over one robot's simulator `env` (the same env object the RobotLoop steps)."""

    def __init__(self, env, mode: str = "expert", delay_polls: int = 0, head_version: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.env = env
        self.mode = mode
        self.delay_polls = delay_polls
        self.head_version = head_version
        self.requests: list[dict] = []
        self.cancelled = 0
        self._reply: dict | None = None
        self._polls_left = 0
        self._hung = False

    @property
    def spec(self):
        return get_embodiment(self.env.unwrapped.embodiment)

    def submit(self, request: dict) -> None:
        if self.mode == "dead":
            raise ConnectionError("policy server unreachable (fake: dead)")
        self.requests.append(request)
        self._hung = self.mode == "hung"
        self._reply = None if self._hung else self._answer(request)
        self._polls_left = self.delay_polls if self.mode == "slow" else 0

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self.mode == "dead" and (self._reply is not None or self._hung):
            self._reply, self._hung = None, False
            raise ConnectionError("policy replica died (fake: dead)")
        if self._hung or self._reply is None:
            if self._hung and timeout_s > 0:
                time.sleep(min(timeout_s, 0.01))  # a hung server makes the caller wait; keep tests quick
            return None
        if self._polls_left > 0 and timeout_s <= 0:  # waiting for it (sim mode) gets it
            self._polls_left -= 1
            return None
        reply, self._reply = self._reply, None
        return reply

    def cancel(self) -> None:
        self.cancelled += 1
        self._reply, self._hung = None, False

    def _answer(self, request: dict) -> dict:
        spec = self.spec
        if self.mode == "error":
            return {"error": "image: expected shape (64, 64, 3) (fake: error)", "request_id": request["request_id"]}
        if self.mode == "zeros":
            stop = spec.stop_action or tuple(
                0.5 * (lo + hi) for lo, hi in zip(spec.action_low, spec.action_high, strict=True)
            )
            chunk = np.tile(np.asarray(stop, np.float32), (spec.chunk_size, 1))
        else:
            chunk = self.env.unwrapped.expert_chunk().astype(np.float32)
        reply = {"chunk": chunk, "head_version": self.head_version}
        reply |= {k: request[k] for k in ("request_id", "robot_id", "embodiment", "obs_tick")}  # what a server echoes
        k = int(request.get("n_samples", 1))
        if spec.head == "flow" and k > 1:
            spread = 1.0 if self.mode == "noisy" else 0.0
            noise = np.random.default_rng(len(self.requests)).standard_normal((k, *chunk.shape)).astype(np.float32)
            reply["samples"] = chunk[None] + spread * noise * (np.asarray(spec.action_high) - spec.action_low)
        elif spec.head == "token":
            level = 3.0 if self.mode == "noisy" else 0.0
            reply["entropy"] = np.full(chunk.shape, level, np.float32)
            reply["n_bins"] = 16
        far = 50.0 if self.mode == "novel" else 0.1
        reply["features"] = np.full(FEATURE_DIM, far, np.float32)
        return reply


def ExpertPolicy(env, **kw) -> FakePolicy:  # noqa: N802 - reads as a class at call sites
    return FakePolicy(env, "expert", **kw)


def SlowPolicy(env, delay_polls: int = 3, **kw) -> FakePolicy:  # noqa: N802
    return FakePolicy(env, "slow", delay_polls=delay_polls, **kw)


def DeadPolicy(env, **kw) -> FakePolicy:  # noqa: N802
    return FakePolicy(env, "dead", **kw)


def HungPolicy(env, **kw) -> FakePolicy:  # noqa: N802
    return FakePolicy(env, "hung", **kw)


class SpacePolicy:
    """A PolicyClient for any registered body (no simulator behind it): each reply is a chunk drawn uniformly from
    the body's action bounds, with a confident uncertainty signal, echoing the request like a server. For plumbing
    tests on environments the shipped policy has no head for (GymRobot)."""

    def __init__(self, embodiment: str, seed: int = 0) -> None:
        self.spec = get_embodiment(embodiment)
        self.rng = np.random.default_rng(seed)
        self.requests: list[dict] = []
        self._reply: dict | None = None

    def submit(self, request: dict) -> None:
        self.requests.append(request)
        spec = self.spec
        lo, hi = np.asarray(spec.action_low), np.asarray(spec.action_high)
        chunk = self.rng.uniform(lo, hi, (spec.chunk_size, spec.action_dim)).astype(np.float32)
        reply = {"chunk": chunk, "head_version": 1, "features": np.zeros(FEATURE_DIM, np.float32)}
        reply |= {k: request[k] for k in ("request_id", "robot_id", "embodiment", "obs_tick")}
        if spec.head == "flow":
            reply["samples"] = np.repeat(chunk[None], max(2, int(request.get("n_samples", 2))), axis=0)
        else:
            reply["entropy"], reply["n_bins"] = np.zeros(chunk.shape, np.float32), 16
        self._reply = reply

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        reply, self._reply = self._reply, None
        return reply

    def cancel(self) -> None:
        self._reply = None
