"""The last gate before a robot moves: every action passes `SafetyLayer`, which returns what was actually sent.

Order: force e-stop (latched) > contact stop (a force above `contact_stop` x max_force: the stop action at once, for
this tick only) > missing/non-finite/stale input (hold) > workspace clip (the action bounds, then the spec's
`position_limits` walls and the body's `workspace_guard`, given the robot's proprio) > acceleration > velocity (per
dimension, then the norm of the change) > the walls again (a wall is never crossed to honour a rate limit). Limits hold
exactly in float64; an action already inside every limit is returned bit-identical, in its own dtype (a changed
one is float64, because rounding to float32 could step an ulp outside a limit).

Hold: the target on bad input and under e-stop is the stop action (config, else spec), else the last sent action
("stay where you are", right for position targets), else `neutral_action` before anything was sent. A
fault's hold still obeys the velocity bounds (so a velocity-commanded base ramps to its stop_action); an
e-stop sends it at once and stays latched until `reset_estop()`. Bad input is a counted fault, never an
exception; only a malformed call (wrong shape, bad force or age) raises ValueError, changing nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from fleet.embodiments import EmbodimentSpec
from fleet.validate import fail, is_number

COUNTERS = ("calls", "modified", "missing", "non_finite", "stale", "workspace", "acceleration", "velocity")
COUNTERS += ("estop_trips", "estop_ticks", "contact_stops", "held")


@dataclass(frozen=True)
class SafetyConfig:
    """Robot-side safety settings; the hard limits themselves come from the `EmbodimentSpec`."""

    velocity_scale: float = 1.0
    # initial factor on both velocity bounds, in (0, 1]; DegradationPolicy's CONSERVATIVE mode lowers it at run time
    max_action_age_s: float | None = None
    # an action older than this (the `age_s` argument) is stale and held; None = one chunk (chunk_size * dt)
    stop_action: tuple[float, ...] | None = None
    # what holds and e-stops aim for. None = the spec's stop_action (zeros for velocity/delta commands, where
    # repeating the last command would keep the robot moving); if that is None too, the last sent action
    neutral_action: tuple[float, ...] | None = None
    # held before anything was ever sent; None = zeros clipped into the workspace
    limit_acceleration: bool = True
    # enforce spec.max_acceleration when the spec has one (the spec's builtin bodies have none)
    contact_stop: float | None = None
    # a bumper's protective stop, off by default: a measured force above this share of max_force sends the stop
    # action at once on this tick, not latched (the next tick's command goes through as usual). Bodies without a
    # stop action (position targets) have none. At 0.5 it removed hello's e-stop trips (2 in 2000 unseen
    # episodes) but cost 2 of 500 episodes and 9 % longer ones on another block (README "Contact stop")
    workspace_guard: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    # a body's own task-space wall, for limits no per-dimension wall can state (so100: "the fingertip stays above
    # the table", through its forward kinematics): guard(action (D,) float64, proprio (P,) float64) -> (D,), a
    # step no larger than the action's in any dimension. Applied with the position walls, before and after the
    # rate limits, whenever a proprio reading is given. The robot supplies it (`Robot.workspace_guard`)

    def __post_init__(self) -> None:
        vs = self.velocity_scale
        if not (is_number(vs) and 0 < vs <= 1):
            fail("SafetyConfig.velocity_scale", "a number in (0, 1]", vs)
        age = self.max_action_age_s
        if age is not None and not (is_number(age) and age > 0):
            fail("SafetyConfig.max_action_age_s", "None or a positive number of seconds", age)
        stop_at = self.contact_stop
        if stop_at is not None and not (is_number(stop_at) and 0 < stop_at < 1):
            fail("SafetyConfig.contact_stop", "None or a share of max_force in (0, 1)", stop_at)
        for name in ("stop_action", "neutral_action"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                vec = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"SafetyConfig.{name}: expected None or a sequence of floats, got {value!r}") from None
            if not vec or not all(math.isfinite(v) for v in vec):
                raise ValueError(f"SafetyConfig.{name}: expected a non-empty sequence of finite floats, got {value!r}")
            object.__setattr__(self, name, vec)


@dataclass(frozen=True)
class SafetyReport:
    """What the layer did to one action. Amounts are max absolute changes over dimensions, 0.0 = did not fire."""

    modified: bool  # the sent action differs from the requested one (always true for a hold on bad input)
    held: bool  # the hold/stop action was sent instead of the request
    missing: bool  # no action was given (starved buffer)
    non_finite: bool  # the request (or the proprio reading a position wall needs) had NaN or Inf
    stale: bool  # the request was older than max_action_age_s
    estop: bool  # the e-stop is latched on this tick
    estop_tripped: bool  # this tick's force reading tripped it
    contact_stop: bool  # this tick's force reading, under the e-stop's limit, stopped the robot for this tick
    force_norm: float | None  # the measured force/torque norm, None when not given
    workspace: float  # change made by clipping into [action_low, action_high] and the position walls
    acceleration: float  # change made by the acceleration limit
    velocity: float  # change made by the per-dimension and norm velocity limits
    max_change: float | None  # max |sent - requested|; None when the request was missing or non-finite

    @property
    def fault(self) -> bool:
        """The policy's action could not be used at all."""
        return self.missing or self.non_finite or self.stale

    @property
    def fired(self) -> tuple[str, ...]:
        """Names of the constraints that acted, in the order they are applied."""
        flags = {"force_estop": self.estop, "contact_stop": self.contact_stop, "missing": self.missing}
        flags["non_finite"] = self.non_finite
        flags |= {"stale": self.stale, "workspace": self.workspace > 0, "acceleration": self.acceleration > 0}
        flags["velocity"] = self.velocity > 0
        return tuple(name for name, on in flags.items() if on)

    def to_dict(self) -> dict:
        """Plain JSON-able dict, with the `fired` list."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"fault": self.fault, "fired": list(self.fired)}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if a.size else 0.0


class SafetyLayer:
    """Stateful safety filter for one robot: remembers the last sent action, the e-stop latch and counters."""

    def __init__(self, spec: EmbodimentSpec, config: SafetyConfig | None = None) -> None:
        self.spec = spec
        self.config = config = SafetyConfig() if config is None else config
        self._low = np.asarray(spec.action_low, np.float64)
        self._high = np.asarray(spec.action_high, np.float64)
        self._vmax = np.asarray(spec.max_velocity, np.float64)
        self._amax = None
        if spec.max_acceleration is not None and config.limit_acceleration:
            self._amax = np.asarray(spec.max_acceleration, np.float64)
        self.max_action_age_s = config.max_action_age_s or spec.chunk_size * spec.dt
        stop = config.stop_action if config.stop_action is not None else spec.stop_action
        self._stop = None if stop is None else self._config_vector("SafetyConfig.stop_action", stop)
        neutral = np.zeros(spec.action_dim) if config.neutral_action is None else config.neutral_action
        self._neutral = self._config_vector("SafetyConfig.neutral_action", neutral)
        self.velocity_scale = config.velocity_scale
        walls = spec.position_limits
        self._wall_a = np.array([w[0] for w in walls], np.intp)
        self._wall_p = np.array([w[1] for w in walls], np.intp)
        self._wall_lo = np.array([w[2] for w in walls], np.float64)
        self._wall_hi = np.array([w[3] for w in walls], np.float64)
        self._last: np.ndarray | None = None  # float64 copy of the last sent action
        self._last_delta: np.ndarray | None = None  # its change from the one before (for the acceleration limit)
        self._estopped = False
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def _config_vector(self, name: str, value) -> np.ndarray:
        vec = np.asarray(value, np.float64)
        if vec.shape != (self.spec.action_dim,) or not np.isfinite(vec).all():
            d = self.spec.action_dim
            raise ValueError(f"{name}: expected {d} finite floats for {self.spec.name}, got shape {vec.shape}")
        # a configured target outside the workspace is clipped in, never sent as given
        return np.clip(vec, self._low, self._high)

    @property
    def velocity_scale(self) -> float:
        """Factor on both velocity bounds, in (0, 1]; 0.5 halves the allowed change per tick."""
        return self._velocity_scale

    @velocity_scale.setter
    def velocity_scale(self, value: float) -> None:
        if not (is_number(value) and 0 < value <= 1):
            fail("velocity_scale", "a number in (0, 1]", value)
        self._velocity_scale = float(value)

    @property
    def estopped(self) -> bool:
        """True from a force trip until `reset_estop()`."""
        return self._estopped

    @property
    def last_sent(self) -> np.ndarray | None:
        """(D,) float64 copy of the last sent action, None before the first."""
        return None if self._last is None else self._last.copy()

    def reset_estop(self) -> None:
        """Clear the e-stop latch (an operator's explicit decision; nothing else clears it)."""
        self._estopped = False

    def trip_estop(self, force_norm: float) -> bool:
        """A force reading taken outside `__call__` (the controller loop reads force every command period): latch
        the e-stop if `force_norm` is above max_force or not a number. True when this call tripped it."""
        if force_norm <= self.spec.max_force or self._estopped:
            return False
        self._estopped = True
        self.counts["estop_trips"] += 1
        return True

    def latch_estop(self) -> None:
        """Latch the e-stop without a force reading: a latch restored from before a restart (not a new trip)."""
        self._estopped = True

    def reset(self, last_action: np.ndarray | None = None) -> None:
        """New episode: forget the motion history. `last_action` (D,) = where the robot is, if known,
        so the first action is velocity-limited from there. The e-stop latch is kept."""
        seed = None if last_action is None else self._config_vector("last_action", last_action)
        self._last, self._last_delta = seed, None if seed is None else np.zeros_like(seed)

    def preview(self, actions, proprio=None) -> np.ndarray:
        """(n, D) float64: what this layer would send for `actions` (n, D) on the next n ticks if nothing else
        happened meanwhile (no force reading, fresh actions, the walls at `proprio`, this velocity scale). The
        layer itself is unchanged. Real-time chunking commits these to the policy: they, not the plan, are what
        the robot will execute (the rate limits bend a plan's steps, and a continuation of the unbent plan starts
        from a state the robot never reaches)."""
        arr = np.asarray(actions)
        if arr.ndim != 2:
            raise ValueError(f"actions: expected shape (n, {self.spec.action_dim}), got {arr.shape}")
        shadow = copy.copy(self)  # __call__ rebinds the arrays it changes and updates only the counts in place
        shadow.counts = dict(self.counts)
        out = np.empty((len(arr), self.spec.action_dim), np.float64)
        for i, action in enumerate(arr):
            out[i] = shadow(action, proprio=proprio)[0]
        return out

    def stats(self) -> dict[str, int]:
        """Counters per constraint since construction."""
        return dict(self.counts)

    def _guard_proprio(self, proprio) -> np.ndarray | None:
        """The whole reading the workspace guard needs, checked; None without a guard or a reading."""
        if self.config.workspace_guard is None or proprio is None:
            return None
        p = np.asarray(proprio)
        if p.dtype.kind not in "fiu" or p.shape != (self.spec.proprio_dim,):
            raise ValueError(
                f"proprio: expected a numeric array of shape ({self.spec.proprio_dim},) for {self.spec.name}, "
                f"got shape {p.shape} dtype {p.dtype}"
            )
        return p.astype(np.float64)

    def _wall_positions(self, proprio) -> np.ndarray:
        """The current positions the walls bound, (n_walls,) float64; empty without walls or without proprio."""
        if proprio is None or not self._wall_a.size:
            return np.empty(0)
        p = np.asarray(proprio)
        if p.dtype.kind not in "fiu" or p.shape != (self.spec.proprio_dim,):
            raise ValueError(
                f"proprio: expected a numeric array of shape ({self.spec.proprio_dim},) for {self.spec.name}, "
                f"got shape {p.shape} dtype {p.dtype}"
            )
        return p[self._wall_p].astype(np.float64)

    def _guarded(self, action: np.ndarray, proprio) -> np.ndarray:
        """The body's workspace guard (SafetyConfig.workspace_guard) on `action`, when it has one and a reading is
        given. A guard that returns a malformed step, or a larger one in any dimension, is not trusted: hold."""
        guard = self.config.workspace_guard
        if guard is None or proprio is None:
            return action
        out = np.asarray(guard(action.copy(), np.asarray(proprio, np.float64)), np.float64)
        if out.shape != action.shape or not np.isfinite(out).all() or (np.abs(out) > np.abs(action) + 1e-12).any():
            return np.zeros_like(action) if self._stop is None else self._stop.copy()
        return out

    def _walls(self, action: np.ndarray, position: np.ndarray, proprio=None) -> np.ndarray:
        """Clip the walled dimensions so that position + action stays in [low, high] (never past the action
        bounds: a position already outside a wall is commanded back at most at the bound's speed); then the
        body's workspace guard."""
        action = self._guarded(action, proprio)
        if not position.size:
            return action
        a = self._wall_a
        out = action.copy()
        lo = np.clip(self._wall_lo - position, self._low[a], self._high[a])
        hi = np.clip(self._wall_hi - position, self._low[a], self._high[a])
        out[a] = np.clip(out[a], lo, np.maximum(lo, hi))
        return out

    def _validate(self, action, force, age_s) -> tuple[np.ndarray | None, float | None]:
        """Check every input before any state changes, so a rejected call leaves the layer as it was."""
        if action is not None:
            action = np.asarray(action)
            if action.dtype.kind not in "fiu" or action.shape != (self.spec.action_dim,):
                raise ValueError(
                    f"action: expected a numeric array of shape ({self.spec.action_dim},) for {self.spec.name}, "
                    f"got shape {action.shape} dtype {action.dtype}"
                )
        force_norm = None
        if force is not None:
            f = np.asarray(force, np.float64) if np.asarray(force).dtype.kind in "fiu" else None
            if f is None or f.ndim > 1 or f.size == 0:
                raise ValueError(f"force: expected a number or a 1-D force/torque vector, got {force!r}")
            # a sensor reading NaN cannot vouch for safety: its norm is NaN and trips the e-stop below
            force_norm = float(np.sqrt(np.sum(f * f)))
        if age_s is not None and not (is_number(age_s) and age_s >= 0):
            fail("age_s", "None or a non-negative number of seconds", age_s)
        return action, force_norm

    def _limit(self, target: np.ndarray, use_acceleration: bool) -> tuple[np.ndarray, float, float]:
        """Move from the last sent action towards `target` (inside the workspace) within the rate limits.

        Returns (sent (D,) float64, acceleration change, velocity change). Both limits only shrink the step
        towards an in-bounds target, and the final clip only moves a component towards the in-bounds last
        action, so the result is inside the workspace and within the velocity bounds.
        """
        last = self._last
        if last is None:  # nothing sent yet: no motion to limit
            return target, 0.0, 0.0
        delta = target - last
        acc = 0.0
        if use_acceleration and self._amax is not None and self._last_delta is not None:
            step = self._amax * self.spec.dt**2
            limited = np.clip(delta, self._last_delta - step, self._last_delta + step)
            acc, delta = _max_abs(limited, delta), limited
        before = delta
        vlim = self._vmax * self.spec.dt * self._velocity_scale
        delta = np.clip(delta, -vlim, vlim)
        norm, bound = float(np.linalg.norm(delta)), self.spec.velocity_norm_bound * self.spec.dt * self._velocity_scale
        if norm > bound:
            delta = delta * (bound / norm)
        vel = _max_abs(delta, before)
        if acc == 0 and vel == 0:
            # untouched: return the target itself, since last + (target - last) can differ from it by an ulp
            return target, 0.0, 0.0
        return np.clip(last + delta, self._low, self._high), acc, vel

    def __call__(
        self, action: np.ndarray | None, force=None, age_s: float | None = None, proprio=None
    ) -> tuple[np.ndarray, SafetyReport]:
        """Filter one action. action: (D,) float, or None when the buffer had nothing for this tick.
        force: measured force/torque, a number or a vector (its norm counts), or None. age_s: seconds since the
        observation the action was computed from, or None if fresh/unknown. proprio: the robot's current
        (proprio_dim,) reading, which the spec's position_limits walls need (None: the walls are not applied;
        a non-finite reading in a wall's dimension holds, as a non-finite action does).
        Returns (sent (D,): the request's own array values when nothing fired, else float64; the report)."""
        requested, force_norm = self._validate(action, force, age_s)
        position = self._wall_positions(proprio)
        guard_proprio = self._guard_proprio(proprio)
        c = self.counts
        c["calls"] += 1
        tripped = force_norm is not None and not force_norm <= self.spec.max_force
        if tripped and not self._estopped:
            self._estopped = True
            c["estop_trips"] += 1
        missing = requested is None
        non_finite = not missing and not (bool(np.isfinite(requested).all()) and bool(np.isfinite(position).all()))
        non_finite = non_finite or (guard_proprio is not None and not bool(np.isfinite(guard_proprio).all()))
        stale = not missing and not non_finite and age_s is not None and age_s > self.max_action_age_s
        hold = self._stop if self._stop is not None else (self._last if self._last is not None else self._neutral)
        ws = acc = vel = 0.0
        at = self.config.contact_stop
        contact_stop = (
            not self._estopped
            and at is not None
            and self._stop is not None
            and force_norm is not None
            and force_norm > at * self.spec.max_force
        )
        if self._estopped or contact_stop:
            # braking is the one change that must not wait for the rate limiter
            sent, held = hold.copy(), True
            c["estop_ticks" if self._estopped else "contact_stops"] += 1
        elif missing or non_finite or stale:
            # stopping is always allowed, so the acceleration limit does not delay a hold
            sent, acc, vel = self._limit(hold, use_acceleration=False)
            held = True
        else:
            x = requested.astype(np.float64)
            clipped = self._walls(np.clip(x, self._low, self._high), position, guard_proprio)
            ws = _max_abs(clipped, x)
            sent, acc, vel = self._limit(clipped, use_acceleration=True)
            walled = self._walls(sent, position, guard_proprio)
            ws, sent = max(ws, _max_abs(walled, sent)), walled
            held = False
        max_change = None if (missing or non_finite) else _max_abs(sent, requested.astype(np.float64))
        modified = max_change is None or max_change > 0
        out = sent if modified else requested.copy()  # untouched: bit-identical, own dtype
        # with no earlier action to compare, assume the robot starts at rest
        self._last_delta = np.zeros_like(sent) if self._last is None else sent - self._last
        self._last = np.array(sent, np.float64)
        for name, on in (("modified", modified), ("missing", missing), ("non_finite", non_finite), ("stale", stale)):
            c[name] += int(on)
        for name, amount in (("workspace", ws), ("acceleration", acc), ("velocity", vel)):
            c[name] += int(amount > 0)
        c["held"] += int(held)
        report = SafetyReport(
            modified=modified,
            held=held,
            missing=missing,
            non_finite=non_finite,
            stale=stale,
            estop=self._estopped,
            estop_tripped=tripped,
            contact_stop=contact_stop,
            force_norm=force_norm,
            workspace=ws,
            acceleration=acc,
            velocity=vel,
            max_change=max_change,
        )
        return out, report
