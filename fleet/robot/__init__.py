"""The robot side (numpy only, no torch, no Ray): one robot's control loop and the client protocol it speaks.

loop.py  RobotLoop (buffer -> confidence -> degradation -> teleop review -> safety -> step), RobotConfig,
         the PolicyClient protocol, TickResult
"""

from fleet.robot.loop import PolicyClient, PolicyReplyError, RobotConfig, RobotLoop, TickResult

__all__ = ["PolicyClient", "PolicyReplyError", "RobotConfig", "RobotLoop", "TickResult"]
