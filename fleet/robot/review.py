"""The human behind a robot (a scripted teleoperator in simulation): `OperatorReview` judges each new chunk and
turns an override into a `fleet.data.correction.Correction`, kept until the correction sink takes it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# the module itself, not fleet.data: robot processes run without pyarrow, which fleet.data's store needs
from fleet.data.correction import Correction
from fleet.embodiments import EmbodimentSpec
from fleet.robot.config import RobotConfig
from fleet.robot.interface import Task
from fleet.sim.teleop import TeleopConfig, Teleoperator

CorrectionSink = Callable[[list[Correction]], None]
# receives each batch of corrections; raises if it could not take them (they are kept for the next try)


def remaining_proposal(chunk: np.ndarray, elapsed: int, size: int) -> np.ndarray:
    """What is left of `chunk` (planned `elapsed` ticks ago) from now on, padded with its last action to `size`."""
    rest = chunk[min(elapsed, len(chunk) - 1) :]
    return np.concatenate([rest, np.repeat(rest[-1:], size - len(rest), axis=0)])


class OperatorReview:
    """Reviews new chunks with a Teleoperator (when `config.teleop`), and holds the corrections made."""

    def __init__(self, config: RobotConfig, spec: EmbodimentSpec) -> None:
        self.config, self.spec = config, spec
        self.teleop = Teleoperator(TeleopConfig(tolerance=config.teleop_tolerance)) if config.teleop else None
        self.pending: list[Correction] = []
        self._span = np.asarray(spec.action_high, np.float32) - np.asarray(spec.action_low, np.float32)

    def review(
        self,
        task: Task,
        obs: dict,
        chunk: np.ndarray,
        obs_tick: int,
        *,
        tick: int,
        episode: int,
        head_version: int,
        asked_for_help: bool,
    ) -> Correction | None:
        """The human judges what is left of the proposal from `tick` on (the robot is at `obs`) against what the
        task's demonstrator would do; a correction when they override it (also kept in `pending`), None when they
        let it run."""
        proposal = remaining_proposal(chunk, tick - obs_tick, self.spec.chunk_size)
        expert = task.demonstrate(self.spec.chunk_size)
        if expert is None:  # nobody at this robot can demonstrate: the proposal runs
            return None
        decision = self.teleop.judge(expert, proposal, self._span, asked_for_help=asked_for_help)
        if not decision.override:
            return None
        correction = Correction.new(
            robot_id=self.config.robot_id,
            embodiment=self.config.embodiment,
            episode=episode,
            tick=tick,
            image=obs["image"],
            proprio=obs["proprio"],
            instruction=obs["instruction"],
            # non-finite proposals are recorded as the workspace bound they would have been clipped to
            policy_chunk=np.nan_to_num(proposal.astype(np.float32), nan=0.0, posinf=1e6, neginf=-1e6),
            corrected_chunk=decision.chunk.astype(np.float32),
            head_version=head_version,
            reason=decision.reason,
            shift=self.config.shift or "",
        )
        self.pending.append(correction)
        return correction

    def flush(self, sink: CorrectionSink | None) -> int:
        """Hand the pending corrections to `sink`, returning how many; if it raises, they stay pending (in
        order, ahead of newer ones) and the error propagates."""
        if not self.pending or sink is None:
            return 0
        batch, self.pending = self.pending, []
        try:
            sink(batch)
        except Exception:
            self.pending = batch + self.pending
            raise
        return len(batch)
