"""Demonstration mode: a policy link whose every chunk comes from the operator, not the policy.

A robot of a body the fleet has no trained head for yet talks to a `DemonstrationLink` instead of the policy
server. It speaks the PolicyClient protocol (submit / poll / cancel, like fleet.robot.client), so the episode
loop, its action buffer and its safety layer are the ones policy episodes use; each reply carries
`"demonstration": True`, which tells the episode loop (`fleet.learning.onboard_live.OnboardRobot`) to store the
chunk as a demonstration with no policy action (the operator drove it all). Once the body's first head is
published the robot switches to the policy server. `fleet.robot.RobotLoop` (the pretrained bodies' robot actors)
does not read the flag: the onboarding actor runs the new body's robots itself.

    link = DemonstrationLink(env)                     # the scripted teleoperator over the robot's simulator
    link.submit(request); reply = link.poll()         # {"chunk": (T, D), "demonstration": True, ...}
"""

from __future__ import annotations

import numpy as np

from fleet.sim.teleop import Teleoperator


class DemonstrationLink:
    """PolicyClient over the operator: answers at once with the teleoperator's next chunk for the robot's env."""

    def __init__(self, env, teleoperator: Teleoperator | None = None) -> None:
        self.env = env
        self.teleoperator = teleoperator or Teleoperator()
        self.spec = env.unwrapped.embodiment_spec
        self.chunks = 0
        self._reply: dict | None = None

    def submit(self, request: dict) -> None:
        if request.get("embodiment") not in (None, self.spec.name):
            raise ValueError(f"demonstration link for {self.spec.name!r} got a request for {request['embodiment']!r}")
        chunk = self.teleoperator.demonstrate(self.env).astype(np.float32)
        self.chunks += 1
        reply = {
            "chunk": chunk,
            "demonstration": True,  # the loop stores it as a correction with no policy action
            "head_version": 0,
            "embodiment": self.spec.name,
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
