"""Demonstration mode: a policy link whose every chunk comes from the operator, not the policy.

A robot of a body the fleet has no trained head for yet (`fleet embodiment add`) runs with
`RobotConfig(demonstrate=True)`: its `RobotLoop` talks to a `DemonstrationLink` over the task's demonstrator
(`Task.demonstrate`: the scripted teleoperator in simulation, a person with a leader arm on a real robot) instead
of the policy server. The link speaks the PolicyClient protocol (submit / poll / cancel, fleet.robot.client), so
the action buffer and the safety layer are the ones policy episodes use. Each reply carries
`"demonstration": True`; the loop stores its chunk as a `Correction` with no policy action (`policy_chunk=None`,
reason "demo") that reaches the replay actor like every correction, where the body's onboarding learner reads it.
Once the body's first head is served, `RobotLoop.start_policy()` switches the robot to the policy server at the
next episode boundary.

    link = DemonstrationLink(lambda: task.demonstrate(spec.chunk_size), spec)
    link.submit(request); reply = link.poll()         # {"chunk": (T, D), "demonstration": True, ...}
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleet.embodiments import EmbodimentSpec


class DemonstrationLink:
    """PolicyClient over the operator: answers at once with `demonstrate()`, the operator's next chunk."""

    def __init__(self, demonstrate: Callable[[], np.ndarray | None], spec: EmbodimentSpec) -> None:
        self.demonstrate = demonstrate
        self.spec = spec
        self.chunks = 0
        self._reply: dict | None = None

    def submit(self, request: dict) -> None:
        if request.get("embodiment") not in (None, self.spec.name):
            raise ValueError(f"demonstration link for {self.spec.name!r} got a request for {request['embodiment']!r}")
        chunk = self.demonstrate()
        if chunk is None:
            raise RuntimeError(f"demonstration mode: nobody at this {self.spec.name} robot can demonstrate")
        chunk = np.asarray(chunk, np.float32)
        self.chunks += 1
        reply = {
            "chunk": chunk,
            "demonstration": True,  # the loop stores it as a correction with no policy action
            "head_version": 0,
            "embodiment": self.spec.name,
            "robot_id": request.get("robot_id"),
            "request_id": request.get("request_id"),
            "obs_tick": request.get("obs_tick"),
        }
        if self.spec.head == "token":
            reply["entropy"] = np.zeros(chunk.shape, np.float32)  # the operator is sure: nothing to escalate
        self._reply = reply

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        reply, self._reply = self._reply, None
        return reply

    def cancel(self) -> None:
        self._reply = None
