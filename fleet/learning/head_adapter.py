"""Online adaptation of one action head (the backbone stays frozen): one round on new corrections.

    adapter = HeadAdapter(model, "franka", rehearsal=rehearsal_set("franka", episodes=120))  # round_data.py
    result = adapter.round(corrections)            # trains a candidate, validates it, returns it
    if result.accepted:                            # no worse on rehearsal, better on held-out corrections
        adapter.accept(result, version=v + 1)      # the next round continues from it

Why a round is cheap: a head owns its proprio stem, whose token feeds *into* the backbone; everything
after the backbone (the decoder blocks, the direct path, the output layer) reads only the backbone's
memory. Adaptation keeps the stem frozen with the backbone, so each sample's memory is computed once,
under `torch.no_grad`, when the sample first arrives (rehearsal data when the adapter is built, a
correction in the round that brings it) and kept; a round then trains the rest of the head on cached
memory, never running the vision encoder or the backbone transformer in its loop.

A round, by concern:
  round_data.py       what it trains and validates on (rehearsal set, earlier corrections, held-out shares)
  head_training.py    the training step: the batch mix, the optimizer, the word adapters' rows
  candidate_gate.py   how the candidate is judged before it may be published
  calibration.py      hardware changes: the rehearsal labels follow a recalibrated actuator
  word_adapters.py    instruction words the rehearsal set never uses, adapted per head
  trained_head.py     the head and its version (the one writer of both)
The other embodiments' heads are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fleet.data.correction import Correction
from fleet.learning.calibration import HardwareCalibration
from fleet.learning.candidate_gate import head_loss, judge_candidate, rehearsal_scores
from fleet.learning.head_training import Mix, train_candidate, warm_up
from fleet.learning.round_config import AdaptConfig
from fleet.learning.round_data import Cached, HeadData
from fleet.learning.trained_head import TrainedHead
from fleet.learning.word_adapters import WordAdapters
from fleet.policy.demos import DemoSet


@dataclass
class RoundResult:
    """One round's candidate and its validation. `state` holds the candidate head's tensors."""

    embodiment: str
    accepted: bool
    reason: str
    # "ok", or why the candidate was refused
    state: dict[str, torch.Tensor] = field(repr=False)
    metrics: dict = field(default_factory=dict)
    # losses before/after on rehearsal and held-out corrections, sample counts, timings
    seconds: float = 0.0
    # wall time of the round (encoding the new corrections, training, validating)
    rehearsal_scores: tuple | None = field(default=None, repr=False)
    # (calibration key, the candidate's rehearsal scores): reused by the next round if it is accepted


class HeadAdapter:
    """Adapts head `name` of `model` round by round. `model` is only changed by `accept` (and by whoever
    holds `head`, the head's one writer: pass the learner's `TrainedHead` so both see every change).

    Keeps, between rounds (`data`): the rehearsal samples with their memory (encoded once, here), and every
    earlier correction (training part and held-out part, the newest `max_corrections`) with its memory.
    """

    def __init__(
        self,
        model,
        name: str,
        rehearsal: DemoSet | None = None,
        config: AdaptConfig | None = None,
        head: TrainedHead | None = None,
    ) -> None:
        if name not in model.specs:
            raise ValueError(f"HeadAdapter: the model has no head {name!r}; it has {sorted(model.specs)}")
        if rehearsal is not None and len(rehearsal) and rehearsal.embodiment != name:
            raise ValueError(f"HeadAdapter: rehearsal set is for {rehearsal.embodiment!r}, not {name!r}")
        self.model, self.name = model, name
        self.config = cfg = config or AdaptConfig()
        if head is not None and (head.model is not model or head.name != name):
            raise ValueError(f"HeadAdapter: `head` is {head.name!r} of another model, not this model's {name!r}")
        self.head = head if head is not None else TrainedHead(model, name)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.rounds = 0
        self.hardware = HardwareCalibration(model, name, cfg)
        # the current head's rehearsal scores, keyed by (head.changes, version, calibration key): they only change
        # when the head or the labels do, so a round after an accepted or refused one skips them
        self._rehearsal_scores: tuple[tuple, dict] | None = None
        self.words = WordAdapters(model, name, rehearsal, cfg.eval_batch, enabled=cfg.word_lr > 0)
        t0 = time.perf_counter()
        if rehearsal is not None and len(rehearsal):
            # the frozen parts never need gradients (word-adapter training runs the backbone with autograd on)
            model.backbone.requires_grad_(False)
            model.head(name).stem.requires_grad_(False)
        self.data = HeadData(model, name, rehearsal, cfg)
        if self.data.rehearsal_train is not None:
            warm_up(model.head(name), self.data.rehearsal_train, cfg.batch_size)
        self.prepare_seconds = time.perf_counter() - t0

    # ---- the head ---------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.head.version

    @property
    def calibration(self):
        """(D,) normalized command offset applied to the rehearsal labels since a hardware change, or None."""
        return self.hardware.offset

    @property
    def hardware_changed(self) -> bool:
        return self.hardware.changed

    def accept(self, result: RoundResult, version: int) -> None:
        """Make `result`'s candidate the current head at `version` (what the next round starts from)."""
        if result.embodiment != self.name:
            raise ValueError(f"accept: the result is for {result.embodiment!r}, this adapter adapts {self.name!r}")
        self.head.install(result.state, version)
        if result.rehearsal_scores is not None:
            calib_key, scores = result.rehearsal_scores
            self._rehearsal_scores = ((self.head.changes, self.version, calib_key), dict(scores))

    # ---- corrections ------------------------------------------------------------------------------
    def add_earlier(self, corrections: Sequence[Correction]) -> int:
        """Put corrections an earlier incarnation already learnt from into the pools (a restarted learner
        reloads them from the replay store), without a round. Returns how many were added."""
        corrections = list(corrections)[-self.config.max_corrections :]
        if not corrections:
            return 0
        self.data.keep(*self._ingest(corrections))
        return len(corrections)

    def _ingest(self, corrections: list[Correction]) -> tuple[Cached, Cached | None]:
        """Encode corrections once, note new words and a hardware change, split off the held-out share."""
        new = self.data.encode(corrections)
        self.words.discover(new)
        self.hardware.observe(corrections, new)
        return self.data.split_holdout(new)

    # ---- one round --------------------------------------------------------------------------------
    def round(self, corrections: Sequence[Correction]) -> RoundResult:
        """Train a candidate on `corrections` (this round's new ones) plus rehearsal; validate it.

        The model is not changed; the corrections join the earlier pool whatever the verdict.
        """
        t0 = time.perf_counter()
        cfg = self.config
        corrections = list(corrections)
        if not corrections:
            raise ValueError(f"round: no corrections for {self.name!r}")
        train, holdout = self._ingest(corrections)
        t_encode = time.perf_counter() - t0

        rehearsal_train, rehearsal_val = self.data.rehearsal(self.hardware.offset)
        current = self.head.module()
        seed = cfg.seed * 7919 + self.rounds
        before = self._scores_before(current, rehearsal_val, holdout, seed)
        t1 = time.perf_counter()
        deadline = None
        if cfg.max_round_seconds is not None:  # leave room for the validation after training (~ the one before)
            deadline = t0 + cfg.max_round_seconds - 1.2 * (t1 - t_encode - t0) - 0.05
        words_only = cfg.words_only and cfg.word_lr > 0 and self.words.named_in(train, holdout)
        mix = Mix(train, self.data.earlier, rehearsal_train, 1.0 - cfg.new_share - cfg.earlier_share)
        candidate, train_loss, steps_done = train_candidate(
            current, mix, self.words, cfg, self._gen, deadline, words_only
        )
        t_train = time.perf_counter() - t1
        after = self._scores_after(candidate, rehearsal_val, holdout, seed)
        accepted, reason, gate = judge_candidate(before, after, train_loss, cfg)
        self.data.keep(train, holdout)  # the corrections stay for later rounds whatever the verdict
        self.rounds += 1
        state = {k: v.detach().clone() for k, v in candidate.state_dict().items()}
        metrics = {
            "round": self.rounds,
            "from_version": self.version,
            "before": before,
            "after": after,
            "gate": gate,
            "train_loss_last": train_loss,
            "new": len(corrections),
            "train_rows": len(train),
            "holdout_rows": 0 if holdout is None else len(holdout),
            "earlier_rows": 0 if self.data.earlier is None else len(self.data.earlier) - len(train),
            "rehearsal_rows": 0 if rehearsal_train is None else len(rehearsal_train),
            "hardware_changed": self.hardware.changed,
            "calibration": self.hardware.physical(),
            "seconds_encode": t_encode,
            "seconds_train": t_train,
            "steps": cfg.steps,
            "steps_done": steps_done,
            "adapted_words": self.words.words(),
            "words_only": words_only,
        }
        scores = (self.hardware.key(), {k: after[k] for k in ("rehearsal", "rehearsal_action_error")})
        return RoundResult(self.name, accepted, reason, state, metrics, time.perf_counter() - t0, scores)

    def _scores_before(self, current, rehearsal_val: Cached | None, holdout: Cached | None, seed: int) -> dict:
        """The current head's scores: rehearsal (cached while neither the head nor the labels change) and
        held-out corrections (rows with an adapted word re-encoded under the head's own adapters)."""
        cfg = self.config
        cache_key = (self.head.changes, self.version, self.hardware.key())
        if self._rehearsal_scores is not None and self._rehearsal_scores[0] == cache_key:
            rehearsal_before = dict(self._rehearsal_scores[1])
        else:
            rehearsal_before = rehearsal_scores(current, rehearsal_val, cfg)
            self._rehearsal_scores = (cache_key, rehearsal_before)
        earlier_val = self.words.reencode(self.data.earlier_val, current.word_delta)
        return rehearsal_before | {
            "holdout": head_loss(current, holdout, seed + 1, cfg.eval_batch),
            "earlier_holdout": head_loss(current, earlier_val, seed + 2, cfg.eval_batch),
        }

    def _scores_after(self, candidate, rehearsal_val: Cached | None, holdout: Cached | None, seed: int) -> dict:
        """The candidate's scores on the same rows and seeds, under its own word adapters."""
        cfg = self.config
        delta = candidate.word_delta
        return rehearsal_scores(candidate, rehearsal_val, cfg) | {
            "holdout": head_loss(candidate, self.words.reencode(holdout, delta), seed + 1, cfg.eval_batch),
            "earlier_holdout": head_loss(
                candidate, self.words.reencode(self.data.earlier_val, delta), seed + 2, cfg.eval_batch
            ),
        }
