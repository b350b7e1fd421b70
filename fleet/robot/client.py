"""The robot's side of the policy server: the `PolicyClient` protocol a transport implements (the Ray clients in
actors/robot_io.py, the fakes in tests/mocks/fake_policy.py), the checks every reply passes (`check_reply`,
`PolicyReplyError`), and `PolicyLink`, which keeps one robot's request in flight: sent, overdue, abandoned,
answered."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fleet.control import ActionBuffer
from fleet.embodiments import EmbodimentSpec
from fleet.robot.report import RobotStats


class PolicyClient(Protocol):
    """Non-blocking access to the policy server; at most one request is outstanding per robot."""

    def submit(self, request: dict) -> None:
        """Start one act request (drops any earlier one still in flight). Raises if it cannot be sent."""

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        """The finished reply, or None while it is in flight after waiting up to `timeout_s` seconds.
        Raises if the request failed (server error reply, dead replica, lost connection)."""

    def cancel(self) -> None:
        """Forget the request in flight (its reply, if it ever comes, is dropped)."""


class PolicyReplyError(RuntimeError):
    """The server answered, but not with a usable chunk (an error reply or a malformed one)."""


class MismatchedReplyError(PolicyReplyError):
    """The reply answers some other request (another robot's, an earlier one, another embodiment)."""


ANSWER_KEYS = ("request_id", "robot_id", "embodiment", "obs_tick")
# what a reply must echo from its request to be accepted as the answer to it


def check_answers(reply: dict, request: dict) -> None:
    """Raise MismatchedReplyError unless `reply` echoes `request`'s ANSWER_KEYS. An error reply need only carry
    the request_id (the server may not have parsed the rest), and one without any id is taken as a refusal."""
    keys = ANSWER_KEYS if reply.get("error") is None else ("request_id",)
    for key in keys:
        if reply.get("error") is not None and reply.get(key) is None:
            continue
        if key not in reply:
            raise MismatchedReplyError(f"policy reply: no {key!r}, expected {request.get(key)!r}")
        if reply[key] != request.get(key):
            raise MismatchedReplyError(
                f"policy reply answers another request: {key} {reply[key]!r}, expected {request.get(key)!r}"
            )


def check_reply(reply: object, spec: EmbodimentSpec, request: dict | None = None) -> np.ndarray:
    """The reply's chunk (T, D) float32 with 1 <= T <= chunk_size, or PolicyReplyError naming what is wrong.
    With `request`, the reply must also answer it (`check_answers`)."""
    if not isinstance(reply, dict):
        raise PolicyReplyError(f"policy reply: expected a dict, got {type(reply).__name__}")
    if request is not None:
        check_answers(reply, request)
    if reply.get("error") is not None:
        raise PolicyReplyError(f"policy server refused the request: {reply['error']}")
    if "chunk" not in reply:
        raise PolicyReplyError("policy reply: no 'chunk'")
    try:
        chunk = np.asarray(reply["chunk"], np.float32)
    except (TypeError, ValueError) as exc:
        raise PolicyReplyError(f"policy reply: chunk is not a numeric array ({exc})") from None
    want = (spec.chunk_size, spec.action_dim)
    if chunk.ndim != 2 or not 1 <= chunk.shape[0] <= want[0] or chunk.shape[1] != want[1]:
        raise PolicyReplyError(f"policy reply: chunk shape {chunk.shape}, expected (T<={want[0]}, {want[1]})")
    return chunk


@dataclass
class PendingRequest:
    """The request in flight."""

    started: float
    # time.perf_counter() when it was sent
    tick: int
    # the episode tick of the observation it carries
    episode: int
    answers: dict
    # the request's ANSWER_KEYS: a reply must echo them
    waited: bool = False
    # sim mode: a tick already waited for it (once per request)
    overdue: bool = False
    # counted as overdue (its reply could only bring stale actions)


class PolicyLink:
    """One robot's requests over a PolicyClient: at most one in flight (one request per robot bounds a busy
    server's load), overdue after `stale_ticks`, abandoned after `timeout_ticks`. Every outcome is counted in
    `stats`, which also carries the link's health; the action buffer is told what was requested."""

    def __init__(
        self,
        client: PolicyClient,
        spec: EmbodimentSpec,
        buffer: ActionBuffer,
        stats: RobotStats,
        stale_ticks: int,
        timeout_ticks: int,
    ) -> None:
        self.client, self.spec, self.buffer, self.stats = client, spec, buffer, stats
        self.stale_ticks, self.timeout_ticks = stale_ticks, timeout_ticks
        self.request: PendingRequest | None = None

    def submit(self, request: dict, tick: int, episode: int) -> None:
        """Send `request` (observation of `tick`); a failure is recorded, never raised."""
        try:
            self.client.submit(request)
        except Exception as exc:  # noqa: BLE001 - a dead server must never stop the control loop
            self.stats.fail(f"policy submit failed: {type(exc).__name__}: {exc}")
            return
        answers = {k: request.get(k) for k in ANSWER_KEYS}
        self.request = PendingRequest(time.perf_counter(), tick, episode, answers)
        self.buffer.mark_requested(tick)

    def drop(self) -> None:
        """Forget the request in flight."""
        self.request = None
        self.buffer.cancel_request()
        try:
            self.client.cancel()
        except Exception:  # noqa: BLE001 - forgetting a request must never stop the control loop
            pass

    def expire(self, tick: int) -> None:
        """A request whose reply could now only bring stale actions is overdue: the robot holds and says so,
        but keeps waiting; after `timeout_ticks` it is abandoned (a hung replica) and asked again."""
        req = self.request
        if req is None:
            return
        waited = tick - req.tick
        secs = time.perf_counter() - req.started
        if waited > self.stale_ticks and not req.overdue:
            req.overdue = True
            self.stats.overdue_calls += 1
            self.stats.fail(
                f"policy reply overdue: none {waited} ticks ({secs:.2f}s) after the request; holding", "overdue"
            )
        if waited > self.timeout_ticks:
            self.stats.abandoned_calls += 1
            self.stats.fail(
                f"policy request abandoned: no reply in {waited} ticks ({secs:.2f}s); asking again", "overdue"
            )
            self.drop()

    def receive(self, tick: int, episode: int, wait_s: float = 0.0) -> tuple[dict, np.ndarray, int] | None:
        """The reply to the request in flight if it arrived (waiting up to `wait_s`) and is usable now:
        (reply, its chunk, the observation tick the chunk starts at). None while it is in flight, and for a
        failed, late, malformed or previous episode's reply (counted, and the request is forgotten)."""
        req = self.request
        if req is None:
            return None
        try:
            reply = self.client.poll(wait_s) if wait_s > 0 else self.client.poll()
        except Exception as exc:  # noqa: BLE001
            self.stats.fail(f"policy request failed: {type(exc).__name__}: {exc}")
            self.drop()
            return None
        if reply is None:
            return None
        self.request = None
        latency_ms = (time.perf_counter() - req.started) * 1e3
        self.stats.latencies_ms.append(latency_ms)
        self.stats.replies += 1
        if tick - req.tick > self.stale_ticks:  # every action in it is already stale
            self.stats.late_replies += 1
            self.stats.last_error = f"policy reply {latency_ms:.0f} ms late, its actions stale; asking again"
            self.stats.link = "slow"
            self.buffer.cancel_request()
            return None
        try:
            chunk = check_reply(reply, self.spec, req.answers)
        except PolicyReplyError as exc:
            self.stats.malformed_replies += 1
            self.stats.mismatched_replies += int(isinstance(exc, MismatchedReplyError))
            self.stats.fail(str(exc))
            self.buffer.cancel_request()
            return None
        self.stats.policy_calls += 1
        self.stats.last_error, self.stats.link = None, "ok"
        if req.episode != episode:
            self.buffer.cancel_request()
            return None  # a reply for an episode that already ended
        return reply, chunk, req.tick
