"""What `fleet embodiment add --spec FILE` reads: the new body's EmbodimentSpec plus how to onboard it.

    {"name": "so100", "action_dim": 6, "head": "token", "proprio_dim": 7, "action_low": [...], ...,
     "sim": "so100", "like": "franka", "robots": 2, "demos_per_round": 10}

Every field is checked on arrival; an error names the field and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from fleet import validate
from fleet.embodiments import EmbodimentSpec

MAX_SPEC_BYTES = 64 * 1024


@dataclass(frozen=True)
class OnboardSpec:
    """A body to add to a running fleet and the onboarding plan."""

    spec: EmbodimentSpec
    # the body itself (registry entry, safety limits, head kind)
    sim: str
    # the simulator its robots drive (fleet.sim.make_env name); a real robot would name its driver here
    like: str | None = None
    # a pretrained body to warm-start the new token row and head from (None: the mean token row, a fresh head)
    robots: int = 2
    # robots of the new body to start
    demo_noise: float = 0.2
    # demonstration mode's injected noise (DART, Laskey et al. 2017): each executed command is the operator's plus
    # Gaussian noise of this share of the dimension's range, before the safety layer; the stored chunks are the
    # operator's intent, so demonstrations show how to recover from the states a slightly wrong policy visits.
    # More noise teaches more per demonstration: at 100 so100 demonstrations 0.1 gave 37-86 %, 0.2 gave 97-100 %
    # (`fleet experiment onboard --noise`, and the live recorder). so100's workspace guard keeps a noisy step from
    # pushing the fingertip into the table: without it 0.2 latched the force e-stop in 8 of 90 demonstrations, with
    # it in none of 90. A body without such a guard may need less noise
    first_round_demos: int = 20
    # demonstrations (episodes) the first training round waits for before it starts. The robots keep
    # demonstrating while it trains, and every episode that arrives joins its data as it goes, so the round ends
    # having seen about first_round_demos + (its training time x the demonstration rate). Each robot demonstrates
    # at the body's control rate in a realtime fleet (so100 at noise 0.2: about 51 ticks an episode at 10 Hz, so
    # 2 robots give about 0.38 a second) and as fast as the simulator steps in a fleet run flat out; on a real
    # robot each is an operator's episode (`fleet experiment onboard` measures what fewer cost)
    first_round_steps: int = 1000
    # optimizer steps of the first round: one schedule over a set that grows while it trains. Beside a realtime
    # fleet on 2 cores the round runs about 5 steps a second, so 2 so100 robots add about 75 demonstrations
    # meanwhile and v1 learns from about 95 (offline at that ratio: 96-97 % on unseen scenes; README "Adding a
    # robot body"). Many short rounds on a growing set learn far more slowly
    demos_per_round: int = 10
    # after the first round, the learner trains again after every this many new demonstrations or corrections
    steps_per_round: int = 300
    # optimizer steps per later training round (backbone frozen; only the new parts)
    train_threads: int = 1
    # torch threads for training and the held-out check. The onboarding actor runs at the lowest CPU priority, so
    # it takes only what the fleet's robots and replicas leave free. Beside a realtime fleet on 2 cores, 1 thread
    # ran 103-111 ms per step and 2 threads 136-144 ms (each waits for the other at every barrier); more pay
    # only where cores are idle
    check_episodes: int = 10
    # held-out closed-loop episodes (scenes no demonstration used) a candidate must pass before it is published
    check_success: float = 0.8
    # share of those episodes that must succeed for v1 to be published
    max_demos: int = 400
    # demonstrations kept (the oldest go first): bounds the learner's memory
    watch_episodes: int = 10
    # after v(k) -> v(k+1) (k >= 1), policy episodes of v(k+1) the rollback watch waits for before it judges
    reference_episodes: int = 20
    # the newest policy episodes of v(k) it compares them with (fleet.learning.rollout.judge_rollout)
    success_drop: float = 0.15
    # a drop in success larger than this, confirmed by a one-sided test at 5 %, re-publishes v(k) as v(k+2)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, EmbodimentSpec):
            validate.fail("onboard spec", "an EmbodimentSpec", type(self.spec).__name__)
        if not isinstance(self.sim, str) or not self.sim:
            validate.fail("onboard spec: field 'sim'", "a simulator name such as 'so100'", self.sim)
        if self.like is not None and not isinstance(self.like, str):
            validate.fail("onboard spec: field 'like'", "null or a pretrained body's name", self.like)
        validate.check_int("onboard spec: field 'robots'", self.robots, lo=0, hi=64)
        validate.check_number("onboard spec: field 'demo_noise'", self.demo_noise, lo=0.0, hi=1.0)
        validate.check_int("onboard spec: field 'demos_per_round'", self.demos_per_round, lo=1, hi=10_000)
        validate.check_int("onboard spec: field 'steps_per_round'", self.steps_per_round, lo=1, hi=100_000)
        validate.check_int("onboard spec: field 'first_round_steps'", self.first_round_steps, lo=1, hi=100_000)
        validate.check_int("onboard spec: field 'train_threads'", self.train_threads, lo=1, hi=256)
        validate.check_int("onboard spec: field 'check_episodes'", self.check_episodes, lo=1, hi=1000)
        validate.check_number("onboard spec: field 'check_success'", self.check_success, lo=0.0, hi=1.0)
        validate.check_int("onboard spec: field 'max_demos'", self.max_demos, lo=self.demos_per_round, hi=100_000)
        validate.check_int(
            "onboard spec: field 'first_round_demos' (at most max_demos)", self.first_round_demos, 1, self.max_demos
        )
        validate.check_int("onboard spec: field 'watch_episodes'", self.watch_episodes, lo=1, hi=10_000)
        validate.check_int("onboard spec: field 'reference_episodes'", self.reference_episodes, lo=1, hi=10_000)
        validate.check_number("onboard spec: field 'success_drop'", self.success_drop, lo=0.01, hi=0.99)

    @classmethod
    def from_dict(cls, raw: object) -> OnboardSpec:
        if not isinstance(raw, dict):
            validate.fail("onboard spec", "a JSON object", type(raw).__name__)
        plan_fields = {f.name for f in fields(cls)} - {"spec"}
        spec_fields = {f.name for f in fields(EmbodimentSpec)}
        unknown = sorted(set(raw) - plan_fields - spec_fields)
        if unknown:
            validate.fail("onboard spec", f"only fields {sorted(plan_fields | spec_fields)}", f"unknown {unknown}")
        missing = [
            k for k in ("name", "action_dim", "head", "proprio_dim", "action_low", "action_high") if k not in raw
        ]
        if missing:
            validate.fail(
                "onboard spec",
                "the EmbodimentSpec fields name, action_dim, head, proprio_dim, ...",
                f"missing {missing}",
            )
        try:
            spec = EmbodimentSpec.from_dict({k: v for k, v in raw.items() if k in spec_fields})
        except TypeError as exc:
            raise ValueError(f"onboard spec: {exc}") from None
        plan = {k: raw[k] for k in plan_fields if k in raw}
        plan.setdefault("sim", spec.name)
        return cls(spec=spec, **plan)

    def to_dict(self) -> dict:
        out = self.spec.to_dict()
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"})
        return out


def load_spec_file(path: str | os.PathLike) -> OnboardSpec:
    """Read and validate a spec file (JSON, at most 64 KiB)."""
    p = Path(path)
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise ValueError(f"{p}: larger than {MAX_SPEC_BYTES} bytes; a spec is a small JSON object")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    return OnboardSpec.from_dict(raw)
