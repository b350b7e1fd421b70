"""What one robot counts and reports: `RobotStats` (the counters and the policy link's health), the
`EpisodeOutcome` record of a finished episode, and `robot_report`, the status dict `RobotLoop.report()` returns."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fleet.protocol import EpisodeOutcome

if TYPE_CHECKING:  # type hints only: loop.py imports this module
    from fleet.robot.loop import RobotLoop

LATENCY_WINDOW = 512
# policy round trips kept for the latency percentiles (the newest)
RECENT_EPISODES = 100
# finished episodes behind the recent success and intervention rates


@dataclass
class RobotStats:
    """One robot's counters since it started (all episodes), and the state of its policy link."""

    episodes_done: int = 0
    successes: int = 0
    interventions: int = 0
    corrections_sent: int = 0
    moved_ticks: int = 0
    held_ticks: int = 0
    fault_holds: int = 0
    # ticks held because no fresh action was there (server slow, hung or dead)
    policy_calls: int = 0
    failed_calls: int = 0
    overdue_calls: int = 0
    late_replies: int = 0
    replies: int = 0
    # every reply received (used, late or malformed): latencies_ms holds the newest
    abandoned_calls: int = 0
    malformed_replies: int = 0
    mismatched_replies: int = 0
    # replies that answered another request (robot, embodiment, request id or observation tick); also malformed
    estop_resets: int = 0
    # operator resets of a latched force e-stop
    demonstrations: int = 0
    # demonstration mode: chunks the operator gave, each stored as a correction with no policy action
    demo_episodes: int = 0
    # episodes the operator drove throughout (demonstration mode)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))
    episode_interventions: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))
    # per recent episode: how often the human stepped in
    link: str = "ok"
    # "ok" | "slow" (last reply too late) | "overdue" (waiting too long) | "down" (failed)
    last_error: str | None = None

    def fail(self, message: str, link: str = "down") -> None:
        """A policy call went wrong: say so; a failed call ("down") is also counted."""
        self.failed_calls += int(link == "down")
        self.last_error, self.link = message, link

    def episode_end(self, success: bool, interventions: int) -> None:
        self.episodes_done += 1
        self.successes += int(success)
        self.outcomes.append(success)
        self.episode_interventions.append(interventions)


def episode_outcome(
    robot_id: str,
    embodiment: str,
    episode: int,
    success: bool,
    versions: set[int],
    interventions: int,
    ticks: int,
    shift: str | None,
) -> EpisodeOutcome:
    """The outcome of a finished episode that ran chunks of the head `versions`."""
    return EpisodeOutcome(
        robot_id=robot_id,
        embodiment=embodiment,
        episode=episode,
        success=bool(success),
        # the one head version every chunk of the episode came from; None when it ran two (a swap
        # mid-episode) or none (it held throughout): such an episode says nothing about one version
        head_version=next(iter(versions)) if len(versions) == 1 else None,
        head_versions=tuple(sorted(versions)),
        interventions=interventions,
        ticks=ticks,
        shift=shift or "",
        t=time.time(),
    )


def _mean(values: deque) -> float | None:
    return float(np.mean(values)) if values else None


def robot_report(loop: RobotLoop) -> dict:
    """The robot's status: identity, state, counters, latency percentiles, recent transitions, safety."""
    s = loop.stats
    # no policy latency while the operator drives (the demonstration link's replies wait one tick, by design)
    lat = np.asarray(s.latencies_ms) if s.latencies_ms and not loop.demonstrating else None
    return {
        "id": loop.config.robot_id,
        "embodiment": loop.config.embodiment,
        "state": loop.state,
        "phase": loop.phase,
        "demonstrations": s.demonstrations,
        "demo_episodes": s.demo_episodes,
        "degradation": loop.degradation.state.value,
        "policy_link": s.link,
        "episodes": s.episodes_done,
        "successes": s.successes,
        "success_rate": (s.successes / s.episodes_done) if s.episodes_done else None,
        "recent_success_rate": _mean(s.outcomes),
        # falls as the policy improves: with a human correcting strays, success alone can hide it
        "recent_interventions_per_episode": _mean(s.episode_interventions),
        "interventions": s.interventions,
        "corrections_pending": len(loop.operator.pending),
        "corrections_sent": s.corrections_sent,
        "head_version": loop.head_version,
        "ticks": loop.total_ticks,
        "held_ticks": s.held_ticks,
        "fault_holds": s.fault_holds,
        "starved_ticks": loop.buffer.stats()["starved_ticks"],
        # how late replies come, in control ticks (the largest of the last 8), and where such a chunk starts
        "reply_delay_ticks": max(loop.buffer.reply_delays, default=None),
        "align": loop.buffer.config.align,
        "policy_calls": s.policy_calls,
        "failed_calls": s.failed_calls,
        "overdue_calls": s.overdue_calls,
        "late_replies": s.late_replies,
        "abandoned_calls": s.abandoned_calls,
        "malformed_replies": s.malformed_replies,
        "mismatched_replies": s.mismatched_replies,
        "tick_errors": loop.tick_errors,
        "frame_holds": loop.frame_holds,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
        "first_tick": loop.first_tick,
        "transitions": [t.to_dict() for t in list(loop.degradation.transitions)[-5:]],
        "safety": loop.safety.stats(),
        "estop_latched": loop.safety.estopped,
        "estop_resets": s.estop_resets,
        "last_error": s.last_error,
    }
