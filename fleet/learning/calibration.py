"""Hardware changes during adaptation: under a shift in `hardware_shifts` (the actuators were recalibrated,
`actuator_bias`) the embodiment's pretraining labels are off by the change: the expert itself now commands
differently, and no head fits the old and the new label of the same observation.

`HardwareCalibration` models such a change as a command offset per action dimension and estimates it from
the corrections: each corrected chunk minus what the *reference* head (the one the rehearsal labels were
made for) predicts for the same observation, averaged over every correction since the change (steps at a
range limit excluded, since a clipped command hides the offset). A dimension whose mean is `calibration_z`
standard errors from zero and at least `calibration_min` gets its rehearsal labels shifted by it (clipped to
the range); the others keep theirs. Rehearsal then stays in the mix and in the gate, so the parts of the
task no correction covered yet stay in shape while the offset is learnt.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fleet.data.correction import Correction
from fleet.learning.round_config import AdaptConfig
from fleet.learning.round_data import Cached


def shift_names(shift: str | None) -> list[str]:
    """The parts of a combined shift ("actuator_bias+lighting", "a,b")."""
    if not shift:
        return []
    return [p.strip() for p in str(shift).replace(",", "+").split("+") if p.strip()]


class HardwareCalibration:
    """The command offset of head `name`'s hardware since a change, estimated from corrections.

    `offset` is None until a correction under a hardware shift arrives, then (D,) normalized units (zero in
    the dimensions whose offset is not established)."""

    def __init__(self, model, name: str, config: AdaptConfig) -> None:
        self.spec, self.config = model.specs[name], config
        # the head the rehearsal labels were made for (frozen): after a hardware change, corrections are
        # compared with its predictions to estimate the new calibration (a command offset per dimension)
        self.reference = copy.deepcopy(model.head(name)).eval().requires_grad_(False)
        self.changed = False
        self.offset: np.ndarray | None = None  # (D,) normalized offset applied to rehearsal labels
        self._residuals: list[torch.Tensor] = []  # per correction: (D,) mean residual, NaN where unusable

    def key(self) -> tuple | None:
        """The offset as a hashable key (rounded): what a cached rehearsal score was computed under."""
        return None if self.offset is None else tuple(np.round(self.offset, 6).tolist())

    def observe(self, corrections: list[Correction], new: Cached) -> None:
        """Note the corrections (rows of `new`) made under a hardware shift; re-estimate the offset."""
        hardware = [any(s in self.config.hardware_shifts for s in shift_names(c.shift)) for c in corrections]
        if not any(hardware):
            return
        self.changed = True
        idx = torch.tensor([i for i, h in enumerate(hardware) if h], dtype=torch.long)
        self._residuals.append(self._residual(new.take(idx)))
        estimate = self._estimate()
        # keep the labels (and the cached rehearsal scores) unless the estimate really moved
        if self.offset is None or np.abs(estimate - self.offset).max() > 0.1 * self.config.calibration_min:
            self.offset = estimate

    def physical(self, offset: np.ndarray | None = None) -> list[float] | None:
        """`offset` (default: the current one) in the embodiment's physical units (half the range per
        normalized unit); None without one."""
        offset = self.offset if offset is None else offset
        if offset is None:
            return None
        half = (np.asarray(self.spec.action_high) - np.asarray(self.spec.action_low)) / 2.0
        return [round(float(v), 6) for v in offset * half]

    def _residual(self, data: Cached) -> torch.Tensor:
        """Per correction, the mean over its chunk of (corrected - reference head's prediction) per dimension,
        normalized units; NaN where every step sat at a range limit (a clipped command hides the offset)."""
        with torch.no_grad():
            gen = torch.Generator().manual_seed(self.config.seed)
            k = 4 if self.spec.head == "flow" else 1  # a flow head's mean of 4 samples, as the fleet executes
            ref = self.reference.predict(data.memory, data.pad_mask, k, 0.0, gen)["chunk"]
        target = data.actions
        usable = (ref.abs() < 0.97) & (target.abs() < 0.97)
        diff = torch.where(usable, target - ref, torch.zeros_like(ref))
        count = usable.sum(dim=1)
        return torch.where(
            count > 0, diff.sum(dim=1) / count.clamp_min(1), torch.full_like(count, float("nan"), dtype=ref.dtype)
        )

    def _estimate(self) -> np.ndarray:
        """(D,) command offset (normalized) per dimension from every correction since the hardware changed:
        the mean residual where it is `calibration_z` standard errors from zero and at least
        `calibration_min`, else 0 (that dimension's old labels still hold)."""
        r = torch.cat(self._residuals).double().numpy()  # (N, D)
        out = np.zeros(r.shape[1], np.float32)
        for d in range(r.shape[1]):
            x = r[:, d][np.isfinite(r[:, d])]
            if len(x) < 3:
                continue
            mean, se = float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
            if abs(mean) >= self.config.calibration_min and abs(mean) > self.config.calibration_z * se:
                out[d] = mean
        return out
