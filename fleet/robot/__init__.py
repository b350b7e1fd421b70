"""The robot side (numpy only, no torch, no Ray, no pyarrow): one robot's control loop and what it is made of.

interface.py   Robot (LeRobot's names: connect, observation/action features, get_observation, send_action) and
               Task (instruction, success, episode resets, a demonstrator for corrections)
sim_robot.py   SimRobot / SimTask: our four simulators behind those interfaces
gym_robot.py   GymRobot / GymTask / gym_embodiment: any gymnasium env as a robot (not imported by default)
config.py      RobotConfig: one robot's settings, validated
loop.py        RobotLoop (buffer -> confidence -> degradation -> operator review -> safety -> command), TickResult
runtime.py     RobotRuntime: camera, proprio, policy and controller loops at their own rates
scheduler.py   Scheduler: periodic loops of many robots on one thread, absolute deadlines, wall or sim clock
background.py  BackgroundClient, DeferredSink, IOThread: the network kept off the control thread
client.py      the PolicyClient protocol, check_reply / PolicyReplyError, PolicyLink (the request in flight)
review.py      OperatorReview: the (scripted) human's review of a chunk -> a Correction record
report.py      RobotStats (counters, link health), EpisodeOutcome of an episode, robot_report (the status dict)
"""

from fleet.robot.client import PolicyClient, PolicyLink, PolicyReplyError, check_reply
from fleet.robot.config import RobotConfig
from fleet.robot.interface import EpisodeStatus, Robot, RobotNotConnectedError, Task
from fleet.robot.loop import RobotLoop, TickResult
from fleet.robot.report import RobotStats, robot_report
from fleet.robot.review import OperatorReview
from fleet.robot.sim_robot import SimRobot, SimTask, sim_robot

__all__ = [
    "EpisodeStatus",
    "Robot",
    "RobotNotConnectedError",
    "SimRobot",
    "SimTask",
    "Task",
    "sim_robot",
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
