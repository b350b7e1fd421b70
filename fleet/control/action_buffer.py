"""Action-chunk recycling: hand out one action per control tick from the policy's chunks, merging seams.

A chunk pushed with `obs_tick` holds the actions meant for ticks obs_tick, obs_tick + 1, ...; where it overlaps
what is already planned, the `aggregate` rule merges the two, so a new chunk does not jerk the robot. The `rtc`
rule (real-time chunking) merges nothing: the buffer hands the plan to the next request (`request_prefix`, as
the safety layer will send it: `SafetyLayer.preview`), the server makes the new chunk continue it, and the
buffer switches to the new chunk at the seam.

`align` says where a late chunk starts. "time" (the default): action i runs at tick obs_tick + i, so the actions
for ticks that passed while the policy thought are dropped and the robot runs the rest of the plan open loop.
"arrival": the chunk starts at the first tick it can still serve, with its first action, so a reply d ticks late
acts as a closed-loop policy d ticks behind the world. Ages (the safety layer's staleness) count from the
observation either way.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fleet.validate import check_choice, check_int, check_number

AGGREGATES = ("latest", "weighted", "temporal_ensemble", "conservative", "rtc")
ALIGNS = ("time", "arrival")


@dataclass(frozen=True)
class BufferConfig:
    """How chunks are stored, merged and refilled."""

    chunk_size: int = 16
    # longest chunk push() accepts: the policy's horizon
    recompute_every: int = 4
    # ask for the next chunk once this many ticks have passed since the newest chunk's observation
    aggregate: str = "latest"
    # seam rule, one of AGGREGATES (see ActionBuffer)
    ensemble_m: float = 0.01
    # temporal_ensemble decay m in w_i = exp(-m * i), i = 0 for the oldest prediction of a tick (ACT's default)
    low_water: int = 1
    # also refill when fewer than this many actions are buffered from the current tick on
    request_timeout: int | None = None
    # a request pending this many ticks is presumed lost and needs_refill turns true again; None = chunk_size
    rtc_delay: int | None = None
    # rtc: how many planned actions a request commits (they execute before its reply arrives); None = measured:
    # the largest latency, in ticks, of the last `latency_window` replies (an overestimate only freezes more)
    latency_window: int = 8
    # rtc: replies whose latency the measured delay is taken over
    rtc_soft: int | None = None
    # rtc: planned actions past the committed ones that a request also sends (the policy follows them with a
    # weight decaying to 0 at their end, so the seam stays smooth); None = recompute_every (the execution
    # horizon: the part of the new chunk executed before the next request); chunk_size = the whole remaining
    # plan (the paper's soft mask, which cost aloha 94 -> 52 % at replan 4: the robot stops reacting); 0 = the
    # committed ones only (nothing at all when none are committed: then it is `latest`)
    align: str = "time"
    # where a chunk that arrives d > 0 ticks after its observation starts (ALIGNS). "time": action i at tick
    # obs_tick + i, the first d dropped. "arrival": action 0 at the first tick not yet served, so nothing is
    # skipped and the robot runs d ticks behind. Identical when replies arrive in time. rtc commits
    # time-aligned actions, so it needs "time"

    def __post_init__(self) -> None:
        check_int("BufferConfig.chunk_size", self.chunk_size, lo=1, expected="a positive int")
        check_int("BufferConfig.recompute_every", self.recompute_every, 1, self.chunk_size)
        check_int("BufferConfig.low_water", self.low_water, 1, self.chunk_size)
        if self.request_timeout is not None:
            check_int("BufferConfig.request_timeout", self.request_timeout, lo=1, expected="a positive int")
        check_choice("BufferConfig.aggregate", self.aggregate, AGGREGATES)
        check_number("BufferConfig.ensemble_m", self.ensemble_m, lo=0)
        if self.rtc_delay is not None:
            check_int("BufferConfig.rtc_delay", self.rtc_delay, 0, self.chunk_size)
        check_int("BufferConfig.latency_window", self.latency_window, lo=1, expected="a positive int")
        if self.rtc_soft is not None:
            check_int("BufferConfig.rtc_soft", self.rtc_soft, 0, self.chunk_size)
        check_choice("BufferConfig.align", self.align, ALIGNS)
        if self.align == "arrival" and self.aggregate == "rtc":
            raise ValueError(
                "BufferConfig.align: expected 'time' with aggregate='rtc' (its prefix is the plan for the ticks the "
                "reply skips), got 'arrival'"
            )


class _Slot:
    """The plan for one tick: action = total / weight (weight is 1 except under temporal_ensemble)."""

    __slots__ = ("total", "weight", "count", "obs_tick")

    def __init__(self, action: np.ndarray, obs_tick: int) -> None:
        self.total, self.weight, self.count, self.obs_tick = action, 1.0, 1, obs_tick

    @property
    def action(self) -> np.ndarray:
        return self.total / self.weight if self.weight != 1.0 else self.total.copy()


def _tick(name: str, value: object) -> int:
    if isinstance(value, np.integer):  # a numpy int is an int here (np.bool_ is not one)
        value = int(value)
    return check_int(name, value, lo=0, expected="a non-negative int tick")


class ActionBuffer:
    """Planned actions per tick, with seam merging.

    Aggregates, where a new chunk overlaps the plan:
      latest            the new chunk replaces the plan.
      weighted          linear cross-fade over the L overlapping ticks: the k-th (k = 0..L-1) gets weight
                        (k + 1) / (L + 1) on the new chunk, so the seam ramps from the old plan to the new one.
      temporal_ensemble ACT: every prediction of a tick is averaged with w_i = exp(-m * i), i = 0 for the oldest,
                        kept as running sums per tick.
      conservative      per dimension, the candidate closer to the last handed-out action (the smaller change;
                        before the first pop, the smaller magnitude); ties keep the plan.
      rtc               real-time chunking: the new chunk replaces the plan at the seam, no blending; what
                        makes the seam smooth is the request, which carries the plan (`request_prefix`) so
                        the policy continues it (fleet/policy/rtc.py). Against a server that ignores the
                        prefix it is `latest`.

    Refill protocol: when `needs_refill(tick)` is true, ask the policy with obs_tick = tick and call
    `mark_requested(tick)`; `push` clears the request, `cancel_request` drops it. Callers that push
    synchronously may skip `mark_requested`. Ticks restart at 0 after `reset()`.
    """

    def __init__(
        self, chunk_size: int = 16, recompute_every: int = 4, aggregate: str = "latest", **options: object
    ) -> None:
        self.config = BufferConfig(chunk_size, recompute_every, aggregate, **options)
        self.action_dim: int | None = None  # fixed by the first push
        self.last_obs_tick: int | None = None  # obs_tick of the newest chunk behind the last popped action
        self._stats = dict.fromkeys(("chunks_pushed", "actions_popped", "dropped_stale", "starved_ticks"), 0)
        self._stats |= dict.fromkeys(("merges", "seams", "dropped_out_of_order"), 0)
        # ticks between a chunk's observation and its arrival, per reply (rtc's committed delay); kept across episodes
        self._latencies: deque[int] = deque(maxlen=self.config.latency_window)
        self.reset()

    @classmethod
    def from_config(cls, config: BufferConfig) -> ActionBuffer:
        return cls(**{f: getattr(config, f) for f in config.__dataclass_fields__})

    def reset(self) -> None:
        """New episode: forget the plan and any pending request (counters are kept)."""
        self._slots: dict[int, _Slot] = {}
        self._next_tick = 0  # the earliest tick pop() may still serve; earlier ones have passed
        self._newest_obs: int | None = None
        self._pending_since: int | None = None
        self._last_action: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def pending(self) -> bool:
        return self._pending_since is not None

    def mark_requested(self, tick: int) -> None:
        """A chunk was requested at `tick`; needs_refill stays false until it arrives or times out."""
        self._pending_since = _tick("tick", tick)

    def cancel_request(self) -> None:
        """The request failed: allow the next needs_refill to ask again at once."""
        self._pending_since = None

    def needs_refill(self, tick: int) -> bool:
        """True when no request is pending (or it timed out) and either the buffer holds fewer than
        low_water actions from `tick` on, or recompute_every ticks passed since the newest chunk's obs_tick."""
        tick = _tick("tick", tick)
        if self._pending_since is not None:
            timeout = self.config.request_timeout or self.config.chunk_size
            if tick - self._pending_since < timeout:
                return False
        if self._newest_obs is None:
            return True
        if sum(1 for t in self._slots if t >= tick) < self.config.low_water:
            return True
        return tick - self._newest_obs >= self.config.recompute_every

    def push(self, chunk: np.ndarray, obs_tick: int) -> int:
        """Add chunk (T, D) with T <= chunk_size, action i meant for tick obs_tick + i.
        Returns how many of its actions were kept (those for passed ticks are dropped and counted)."""
        arr = np.asarray(chunk)
        obs_tick = _tick("obs_tick", obs_tick)
        want_d = self.action_dim if self.action_dim is not None else "D"
        if arr.dtype.kind not in "fiu" or arr.ndim != 2 or not 1 <= arr.shape[0] <= self.config.chunk_size:
            want = f"(T<={self.config.chunk_size}, {want_d})"
            raise ValueError(f"chunk: expected a numeric array of shape {want}, got {arr.shape}")
        if self.action_dim is not None and arr.shape[1] != self.action_dim:
            raise ValueError(f"chunk: expected shape (T, {self.action_dim}) like earlier chunks, got {arr.shape}")
        self.action_dim = arr.shape[1]
        self._pending_since = None
        if self._newest_obs is not None and obs_tick < self._newest_obs:
            # a reply overtaken by a newer one: its plan is older than what is buffered
            self._stats["dropped_out_of_order"] += 1
            return 0
        self._stats["chunks_pushed"] += 1
        self._latencies.append(max(0, self._next_tick - obs_tick))
        self._newest_obs = obs_tick
        late = max(0, self._next_tick - obs_tick)
        # time: action i belongs to tick obs_tick + i, the late ones are dropped; arrival: action 0 runs first
        start = obs_tick if self.config.align == "time" else obs_tick + late
        first = late if self.config.align == "time" else 0
        self._stats["dropped_stale"] += min(first, arr.shape[0])
        ticks = range(start + first, start + arr.shape[0])
        overlap = [t for t in ticks if t in self._slots]
        ramp = {t: (k + 1) / (len(overlap) + 1) for k, t in enumerate(overlap)}
        self._stats["merges"] += len(overlap)
        self._stats["seams"] += int(bool(overlap))
        for t in ticks:
            new = np.array(arr[t - start], np.float64)
            slot = self._slots.get(t)
            if slot is None or self.config.aggregate in ("latest", "rtc"):
                self._slots[t] = _Slot(new, obs_tick)
                continue
            self._merge(slot, new, ramp[t])
            slot.obs_tick = obs_tick
        return len(ticks)

    def _merge(self, slot: _Slot, new: np.ndarray, w_new: float) -> None:
        how = self.config.aggregate
        if how == "weighted":
            slot.total = (1.0 - w_new) * slot.action + w_new * new
            slot.weight = 1.0
        elif how == "temporal_ensemble":
            w = math.exp(-self.config.ensemble_m * slot.count)
            slot.total = slot.total + w * new
            slot.weight += w
        else:  # conservative
            old = slot.action
            ref = self._last_action if self._last_action is not None else np.zeros_like(old)
            slot.total = np.where(np.abs(new - ref) < np.abs(old - ref), new, old)
            slot.weight = 1.0
        slot.count += 1

    def pop(self, tick: int) -> np.ndarray | None:
        """The action (D,) float64 for `tick`, or None when starved. Planned actions for earlier ticks are
        dropped (counted as stale); ticks must not go backwards."""
        tick = _tick("tick", tick)
        if tick < self._next_tick:
            raise ValueError(f"tick: expected >= {self._next_tick} (ticks already served), got {tick}")
        for t in [t for t in self._slots if t < tick]:
            del self._slots[t]
            self._stats["dropped_stale"] += 1
        self._next_tick = tick + 1
        slot = self._slots.pop(tick, None)
        if slot is None:
            self._stats["starved_ticks"] += 1
            return None
        action = slot.action
        self._stats["actions_popped"] += 1
        self._last_action, self.last_obs_tick = action, slot.obs_tick
        return action.copy()

    def peek(self, tick: int) -> np.ndarray | None:
        """The action (D,) pop(tick) would hand out now, or None; changes nothing."""
        slot = self._slots.get(_tick("tick", tick))
        return None if slot is None else slot.action

    @property
    def measured_delay(self) -> int:
        """rtc: the delay a request commits now: `rtc_delay` if set, else the largest latency (ticks from a
        chunk's observation to its arrival) of the last latency_window replies, 0 before the first."""
        if self.config.rtc_delay is not None:
            return self.config.rtc_delay
        return max(self._latencies, default=0)

    @property
    def reply_delays(self) -> tuple[int, ...]:
        """Ticks from each of the last latency_window replies' observation to its arrival (0: in time)."""
        return tuple(self._latencies)

    def request_prefix(self, tick: int, executes: Callable[[np.ndarray], np.ndarray] | None = None) -> dict | None:
        """rtc mode: the request fields that let the policy continue the plan, {"prefix": (n, D) float32, the
        planned actions for ticks tick, tick + 1, ... (n <= chunk_size, up to the first unplanned tick and at
        most d + rtc_soft), "prefix_delay": d <= n, how many of them will execute before the reply arrives};
        pass them to fleet.protocol.make_request. None in the other modes, when nothing is planned for `tick`,
        and when rtc_soft is 0 and nothing is committed.
        executes: (n, D) plan -> (n, D) what the robot will really send for it (`SafetyLayer.preview`); the
        prefix is then that, so the policy continues from where the robot will be. None: the plan as it is."""
        tick = _tick("tick", tick)
        if self.config.aggregate != "rtc" or tick not in self._slots:
            return None
        delay, soft = self.measured_delay, self.config.rtc_soft
        longest = min(self.config.chunk_size, delay + (self.config.recompute_every if soft is None else soft))
        plan = []
        while tick + len(plan) in self._slots and len(plan) < longest:
            plan.append(self._slots[tick + len(plan)].action)
        if not plan:
            return None
        prefix = np.asarray(plan if executes is None else executes(np.asarray(plan)), np.float32)
        if prefix.shape != (len(plan), len(plan[0])):
            raise ValueError(f"executes: expected it to return shape {(len(plan), len(plan[0]))}, got {prefix.shape}")
        return {"prefix": prefix, "prefix_delay": min(delay, len(prefix))}

    def stats(self) -> dict[str, int]:
        """Counters: chunks_pushed, actions_popped, dropped_stale, starved_ticks, merges (overlapping ticks
        merged), seams (pushes that overlapped the plan), dropped_out_of_order; plus buffered and pending now."""
        return dict(self._stats) | {"buffered": len(self._slots), "pending": int(self.pending)}
