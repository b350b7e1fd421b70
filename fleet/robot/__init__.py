"""The robot side (numpy only, no torch, no Ray, no pyarrow): one robot's control loop and what it is made of.

config.py  RobotConfig: one robot's settings, validated
loop.py    RobotLoop (buffer -> confidence -> degradation -> operator review -> safety -> step), TickResult
client.py  the PolicyClient protocol, check_reply / PolicyReplyError, PolicyLink (the request in flight)
review.py  OperatorReview: the (scripted) human's review of a chunk -> a Correction record
report.py  RobotStats (counters, link health), EpisodeOutcome of an episode, robot_report (the status dict)
"""

from fleet.robot.client import PolicyClient, PolicyLink, PolicyReplyError, check_reply
from fleet.robot.config import RobotConfig
from fleet.robot.loop import RobotLoop, TickResult
from fleet.robot.report import RobotStats, robot_report
from fleet.robot.review import OperatorReview

__all__ = [
    "OperatorReview",
    "PolicyClient",
    "PolicyLink",
    "PolicyReplyError",
    "RobotConfig",
    "RobotLoop",
    "RobotStats",
    "TickResult",
    "check_reply",
    "robot_report",
]
