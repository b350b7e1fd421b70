"""The controller loop's math (pure Python scalars, no numpy: it runs at 1 kHz per robot, where a numpy call's
fixed cost of a microsecond or more per operation would dominate 7 to 24 dimensions).

`CommandController` turns policy actions (one per policy period, already through the `SafetyLayer`) into
setpoints at the body's command rate: it interpolates linearly from the setpoint the robot is at towards each
new policy action over one policy period, then limits every setpoint per command period, as libfranka's
`limitRate` does per millisecond:

  velocity      |x_k - x_{k-1}| <= max_velocity * dt
  acceleration  |v_k - v_{k-1}| <= max_acceleration * dt^2   (velocities per tick, v_k = x_k - x_{k-1})
  jerk          |a_k - a_{k-1}| <= max_jerk * dt^3           (only where the body declares max_jerk)
  workspace     action_low <= x_k <= action_high

Velocity, acceleration and workspace are hard. The jerk bound is kept wherever it can be met inside them; where
it cannot (a target that moves towards a wall faster than a jerk-limited stop allows), the hard bounds win
and `jerk_overrides` counts the tick.

A body that declares no acceleration limit gets max_velocity * control_hz (full speed within one policy
period): without one, linear interpolation changes velocity in a single millisecond at every policy action.
The tracker brakes ahead of the target (the largest velocity from which the acceleration limit still stops
in time), so it does not overshoot; with a jerk limit it may overshoot slightly, never past a limit.
`hold(target)` is the e-stop: the target at once, no limits (braking must not wait for the rate limiter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fleet.embodiments import CommandSpec, EmbodimentSpec


def brake(d: float, a: float) -> float:
    """The fastest step (>= 0) towards a point `d` ahead from which steps that shrink by at most `a` each still stop
    on or before it. From step v the robot then moves v - a, v - 2a, ... and finally 0: distance
    D(v) = (m + 1) v - a m (m + 1) / 2 with m = ceil(v / a) - 1; this solves D(v) = d exactly (piecewise linear)."""
    if d <= 0.0:
        return 0.0
    v = 0.5 * (math.sqrt(a * a + 8.0 * a * d) - a)  # the continuous answer, to find the right piece
    m = max(math.ceil(v / a) - 1, 0)
    for _ in range(4):
        v = d / (m + 1) + 0.5 * a * m
        if v > (m + 1) * a:
            m += 1
        elif m > 0 and v <= m * a:
            m -= 1
        else:
            break
    return min(v, d / (m + 1) + 0.5 * a * m)


class CommandLimits:
    """Per-command-period bounds for one body at `command_hz` (lists of floats, one per action dim)."""

    def __init__(self, spec: EmbodimentSpec, command_hz: float, command: CommandSpec | None = None) -> None:
        dt = 1.0 / float(command_hz)
        self.dt = dt
        self.low = list(spec.action_low)
        self.high = list(spec.action_high)
        self.vel = [v * dt for v in spec.max_velocity]
        acc = spec.max_acceleration or tuple(4.0 * v * spec.control_hz for v in spec.max_velocity)
        self.acc = [a * dt * dt for a in acc]
        jerk = command.max_jerk if command is not None else None
        if jerk is not None and len(jerk) != spec.action_dim:
            n = spec.action_dim
            raise ValueError(f"CommandSpec.max_jerk: expected {n} values for {spec.name}, got {len(jerk)}")
        self.jerk = None if jerk is None else [j * dt**3 for j in jerk]
        # an over-estimate of the distance needed to stop from full speed: farther from a target, no braking bound
        self.far = [v * (v / a + 1.0) * 0.5 + 0.125 * a for v, a in zip(self.vel, self.acc, strict=True)]


class CommandController:
    """One robot's setpoint generator. `set_target` at the policy rate, `tick` at the command rate."""

    def __init__(self, limits: CommandLimits, start: Sequence[float], period: float) -> None:
        """`period`: seconds over which the setpoint moves from one policy action to the next (at most a policy
        period; the runtime uses a share of it, see RuntimeConfig.interpolation)."""
        self.limits = limits
        self.period = float(period)
        self.ticks = 0
        self.limited = 0  # ticks where a rate limit changed the interpolated setpoint
        self.jerk_overrides = 0  # dimension-ticks where the jerk bound gave way to a hard bound (velocity, ...)
        self.reset(start)

    def reset(self, start: Sequence[float], t: float = 0.0) -> None:
        """Start at `start` (D,), at rest (a new episode: where the body is)."""
        x = [min(max(float(v), lo), hi) for v, lo, hi in zip(start, self.limits.low, self.limits.high, strict=True)]
        self.x = x
        self.v = [0.0] * len(x)
        self.a = [0.0] * len(x)
        self._from = list(x)
        self._to = list(x)
        self._t0 = t

    def desired(self, t: float) -> list[float]:
        """The interpolated setpoint at time t (before limits)."""
        alpha = (t - self._t0) / self.period
        if alpha >= 1.0:
            return self._to
        if alpha <= 0.0:
            return self._from
        return [f + alpha * (g - f) for f, g in zip(self._from, self._to, strict=True)]

    def set_target(self, action: Sequence[float], t: float) -> None:
        """A new policy action at time t: interpolate from where the interpolation is now to it over one period."""
        self._from = list(self.desired(t))
        # inside the workspace: the tracker brakes for the target, so it never has to be stopped by the wall
        lim = self.limits
        self._to = [min(max(float(v), lo), hi) for v, lo, hi in zip(action, lim.low, lim.high, strict=True)]
        self._t0 = t

    def hold(self, target: Sequence[float]) -> list[float]:
        """E-stop: command `target` now and stay there (velocity and acceleration forgotten)."""
        self.x = [float(v) for v in target]
        self.v = [0.0] * len(self.x)
        self.a = [0.0] * len(self.x)
        self._from = self._to = list(self.x)
        self.ticks += 1
        return self.x

    def tick(self, t: float) -> list[float]:
        """The setpoint for the command period at time t, inside every limit."""
        lim = self.limits
        want = self.desired(t)
        x, v, a = self.x, self.v, self.a
        jerk = lim.jerk
        limited = False
        for i in range(len(x)):
            xi, vi = x[i], v[i]
            err = want[i] - xi
            if err == 0.0 and vi == 0.0 and a[i] == 0.0:
                continue  # at the target, at rest
            vmax, amax = lim.vel[i], lim.acc[i]
            # the hard range of this tick's step: acceleration and velocity bounds ...
            lo, hi = vi - amax, vi + amax
            if lo < -vmax:
                lo = -vmax
            if hi > vmax:
                hi = vmax
            # ... and no faster towards a workspace wall than still stops before it (the target may move away);
            # the exact bound only when a cheap over-estimate of the stopping distance says it may bind
            room = lim.high[i] - xi
            if hi > 0.0 and hi * (hi / amax + 1.0) * 0.5 + 0.125 * amax >= room:
                hi = min(hi, brake(room, amax))
            room = xi - lim.low[i]
            if lo < 0.0 and lo * (lo / amax - 1.0) * 0.5 + 0.125 * amax >= room:
                lo = max(lo, -brake(room, amax))
            if lo > hi:  # cannot happen from a state inside the bounds; decelerate as hard as allowed
                lo = hi = vi - amax if vi > 0 else vi + amax
            if jerk is not None:
                # the jerk bound, leaving room to bring the acceleration back to zero before the velocity bound;
                # where it cannot be met inside the hard bounds above, they win and the tick is counted
                ai, jmax = a[i], jerk[i]
                up = 0.5 * (math.sqrt(jmax * jmax + 8.0 * jmax * max(vmax - vi, 0.0)) - jmax)
                down = 0.5 * (math.sqrt(jmax * jmax + 8.0 * jmax * max(vmax + vi, 0.0)) - jmax)
                jlo = max(lo, vi + ai - jmax, vi - max(down, -ai - jmax))
                jhi = min(hi, vi + ai + jmax, vi + max(up, ai - jmax))
                if jlo <= jhi:
                    lo, hi = jlo, jhi
                else:
                    self.jerk_overrides += 1
            # the step wanted: onto the target, but no faster than still stops on it
            vn = err
            d = err if err > 0.0 else -err
            if d <= lim.far[i]:
                cap = brake(d, amax)
                if d > cap:
                    vn = cap if err > 0.0 else -cap
            if vn < lo:
                vn = lo
            elif vn > hi:
                vn = hi
            if vn != err:
                limited = True
            xn = xi + vn
            if xn > lim.high[i]:
                xn = lim.high[i]
            elif xn < lim.low[i]:
                xn = lim.low[i]
            vn = xn - xi
            a[i] = vn - vi
            v[i] = vn
            x[i] = xn
        self.ticks += 1
        self.limited += limited
        return x
