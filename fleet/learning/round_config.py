"""`AdaptConfig`: the knobs of one head-adaptation round (fleet/learning/head_adapter.py).

No torch here: the launcher and `fleet up` validate a learner's configuration in processes that never
load a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fleet.serving.device import check_device
from fleet.validate import check_bool, check_int, check_number, fail

HARDWARE_SHIFTS: tuple[str, ...] = ("actuator_bias",)


@dataclass(frozen=True)
class AdaptConfig:
    """Knobs of one adaptation round. `from_dict` refuses unknown keys."""

    steps: int = 100
    # optimizer steps per round
    batch_size: int = 32
    # rows per step
    max_round_seconds: float | None = 4.5
    # a round's time budget: training stops early when what is left would not fit the validation that
    # follows (about as long as the one before training) on a loaded machine or with a slow head;
    # metrics["steps_done"] says how many steps ran. None = always all `steps`
    lr: float = 3e-4
    # AdamW learning rate (linearly decayed to a tenth over the round)
    weight_decay: float = 0.0
    new_share: float = 0.25
    # share of each batch drawn from this round's new corrections (training part)
    earlier_share: float = 0.25
    # share drawn from earlier rounds' corrections; the rest is pretraining rehearsal. A missing source's
    # share goes to the others in proportion. On the shipped franka head under actuator_bias (40 unseen
    # episodes per point, success after 20/50/100/150/200 corrections) 1/4 new, 1/4 earlier, 1/2 rehearsal
    # gave 85/100/85/88/78 %, where 1/2 new, 1/4, 1/4 gave 60/97/63 % (later rounds overfit the few strays
    # a good head still makes)
    holdout: float = 0.2
    # share of each round's new corrections held out for validation (at least one when there are 5+)
    rehearsal_tolerance: float = 0.02
    # a candidate may have at most this much higher relative rehearsal loss than the current head
    rehearsal_val: int = 256
    # pretraining-style samples held out from the rehearsal set to validate on (and the most earlier
    # held-out corrections kept for validation)
    max_corrections: int = 2000
    # earlier corrections kept (the newest), with their cached backbone memory (~24 kB each)
    hardware_shifts: tuple[str, ...] = HARDWARE_SHIFTS
    # shifts that change the embodiment's action mapping: its rehearsal labels get recalibrated (module docstring)
    calibration_z: float = 3.0
    # after a hardware change, a dimension's command offset is applied to the rehearsal labels only when
    # its estimate is this many standard errors from zero ...
    calibration_min: float = 0.02
    # ... and at least this large (normalized units: 0.02 is 1 % of the dimension's range)
    require_holdout_improvement: bool = True
    # refuse a candidate that is worse than the current head on this round's held-out corrections
    word_lr: float = 6e-3
    # learning rate of the head's word adapters: the vectors added to the embeddings of instruction words
    # the rehearsal set never uses (novel object names). 0 = never adapt words. On the franka head under
    # novel_object within the learner's 4.5 s rounds (40 unseen episodes, success after 20/50/100/150/200
    # corrections): 3e-3 gave 28/22/50/50/50 %, 6e-3 22/38/62/72/72 %, 1e-2 35/20/22/18/60 % (unstable)
    words_only: bool = True
    # a round whose new corrections name adapted words trains the word adapters alone (the decoder stays as
    # it is, so rehearsal is bit-identical): training the decoder on them too made the rehearsal gate refuse
    # every such round on the franka head (executed-action error +3.6 %, loss +4.4 %)
    eval_batch: int = 256
    # rows per forward pass when encoding and validating
    device: str = "cpu"
    # where a round's training steps run: "cpu", "cuda" or "cuda:N". The samples' backbone memory is
    # cached on the host as before; each step's batch and the candidate head go to the device, and the
    # trained head comes back to the host for validation and publishing
    seed: int = 0

    def __post_init__(self) -> None:
        f = "AdaptConfig."
        check_bool(f + "words_only", self.words_only)
        check_device(f + "device", self.device)
        for name in ("steps", "batch_size", "rehearsal_val", "max_corrections", "eval_batch"):
            lo = 0 if name == "rehearsal_val" else 1
            check_int(f + name, getattr(self, name), lo=lo, expected="a positive int" if lo else "an int >= 0")
        shares = ("new_share", "earlier_share", "holdout", "rehearsal_tolerance", "calibration_z", "calibration_min")
        for name in ("lr", "weight_decay", "word_lr", *shares):
            check_number(f + name, getattr(self, name), lo=0)
        m = self.max_round_seconds
        if (
            m is not None
            and check_number(f + "max_round_seconds", m, finite=False, expected="None or seconds > 0") <= 0
        ):
            fail(f + "max_round_seconds", "None or seconds > 0", m)
        if not self.lr > 0:
            fail(f + "lr", "> 0", self.lr)
        if self.new_share + self.earlier_share > 1.0 or self.new_share <= 0:
            raise ValueError(
                f"AdaptConfig.new_share ({self.new_share}) must be > 0 and new_share + earlier_share "
                f"({self.earlier_share}) at most 1"
            )
        if self.holdout >= 1.0:
            fail(f + "holdout", "a share in [0, 1)", self.holdout)
        if isinstance(self.hardware_shifts, str) or not all(isinstance(s, str) for s in self.hardware_shifts):
            fail(f + "hardware_shifts", "a tuple of shift names", self.hardware_shifts)
        object.__setattr__(self, "hardware_shifts", tuple(self.hardware_shifts))

    @classmethod
    def from_dict(cls, d: dict | None) -> AdaptConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AdaptConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
