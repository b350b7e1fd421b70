"""Online adaptation of one action head (the backbone stays frozen): one round on new corrections.

    adapter = HeadAdapter(model, "franka", rehearsal=rehearsal_set("franka", episodes=120))  # adapt_data.py
    result = adapter.round(corrections)            # trains a candidate, validates it, returns it
    if result.accepted:                            # no worse on rehearsal, better on held-out corrections
        adapter.accept(result, version=v + 1)      # the next round continues from it

Why a round is cheap: a head owns its proprio stem, whose token feeds *into* the backbone; everything
after the backbone (the decoder blocks, the direct path, the output layer) reads only the backbone's
memory. Adaptation keeps the stem frozen with the backbone, so each sample's memory is computed once,
under `torch.no_grad`, when the sample first arrives (rehearsal data when the adapter is built, a
correction in the round that brings it) and kept; a round then trains the rest of the head on cached
memory, never running the vision encoder or the backbone transformer in its loop.

What a round trains on: every batch mixes this round's new corrections (`new_share`), earlier
corrections (`earlier_share`) and pretraining-style expert samples of the unshifted simulator (the
rest), so what the head already did well is rehearsed rather than forgotten.

How a candidate is judged, on data it never trained on:
  - rehearsal: a held-out slice of the pretraining-style samples. The candidate passes when its loss and
    the error of the actions it would execute (`head_action_error`: greedy chunk, first steps) are each
    at most `(1 + rehearsal_tolerance)` times the current head's (2 % by default). The action error is
    the one that matters: on a development model three novel_object rounds lowered the rehearsal
    cross-entropy (0.182 -> 0.166) while the executed-action error rose (0.075 -> 0.085) and closed-loop
    success on the original objects fell from 34 % to 15 % (100 episodes); the loss alone let them through.
  - held-out corrections: a share (`holdout`) of every round's new corrections never enters training;
    the candidate must not be worse than the current head on them (else it learnt nothing useful).
  - earlier held-out corrections (every earlier round's held-out share) are reported alongside.
Hardware changes: under a shift in `hardware_shifts` (the actuators were recalibrated, `actuator_bias`)
the embodiment's pretraining labels are off by the change: the expert itself now commands differently,
and no head fits the old and the new label of the same observation. The adapter models such a change
as a command offset per action dimension and estimates it from the corrections: each corrected chunk
minus what the *reference* head (the one the rehearsal labels were made for) predicts for the same
observation, averaged over every correction since the change (steps at a range limit excluded, since a
clipped command hides the offset). A dimension whose mean is `calibration_z` standard errors from zero
and at least `calibration_min` gets its rehearsal labels shifted by it (clipped to the range); the others
keep theirs. Rehearsal then stays in the mix and in the gate, so the parts of the task no correction
covered yet stay in shape while the offset is learnt. The other embodiments' heads are never touched.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fleet.data.correction import Correction
from fleet.learning.adapt_config import AdaptConfig
from fleet.learning.adapt_data import (
    Cached,
    bounded,
    corrections_to_demos,
    encode_demos,
    head_action_error,
    head_loss,
    relabel,
)
from fleet.policy.demos import DemoSet

if TYPE_CHECKING:
    import torch
# torch is imported where it is used (callers that only need AdaptConfig import fleet.learning.adapt_config)


# ---- rounds --------------------------------------------------------------------------------------
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
    """Adapts head `name` of `model` round by round. `model` is only changed by `accept` / `set_head`.

    Keeps, between rounds: the rehearsal samples with their memory (encoded once, here), and every
    earlier correction (training part and held-out part, the newest `max_corrections`) with its memory.
    """

    def __init__(self, model, name: str, rehearsal: DemoSet | None = None, config: AdaptConfig | None = None):
        import torch

        if name not in model.specs:
            raise ValueError(f"HeadAdapter: the model has no head {name!r}; it has {sorted(model.specs)}")
        self.model, self.name = model, name
        self.config = cfg = config or AdaptConfig()
        self.spec = model.specs[name]
        self._rng = np.random.default_rng(cfg.seed)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.rounds = 0
        self.hardware_changed = False
        # the head the rehearsal labels were made for (frozen): after a hardware change, corrections are
        # compared with its predictions to estimate the new calibration (a command offset per dimension)
        self.reference = copy.deepcopy(model.head(name)).eval().requires_grad_(False)
        self._residuals: list[torch.Tensor] = []  # per correction: (D,) mean residual, NaN where unusable
        self.calibration: np.ndarray | None = None  # (D,) normalized offset applied to rehearsal labels
        # the current head's rehearsal loss and action error, keyed by (head version, calibration): they only
        # change when the head or the labels do, so a round after an accepted or refused one skips them
        self._rehearsal_scores: tuple[tuple, dict] | None = None
        self.rehearsal_train: Cached | None = None
        self.rehearsal_val: Cached | None = None
        self.earlier: Cached | None = None  # earlier rounds' training corrections
        self.earlier_val: Cached | None = None  # earlier rounds' held-out corrections (never trained on)
        # word ids the rehearsal set uses (their adapters stay zero); None: no rehearsal, so no word adapters
        self.known_ids: set[int] | None = None
        self.word_ids: list[int] = []  # ids this head adapts: in corrections, not in known_ids, not special
        t0 = time.perf_counter()
        if rehearsal is not None and len(rehearsal):
            if rehearsal.embodiment != name:
                raise ValueError(f"HeadAdapter: rehearsal set is for {rehearsal.embodiment!r}, not {name!r}")
            length = model.config.max_instr_len
            self.known_ids = {int(i) for t in set(rehearsal.instructions) for i in model.vocab.encode(t, length)}
            # the frozen parts never need gradients (word-adapter training runs the backbone with autograd on)
            model.backbone.requires_grad_(False)
            model.head(name).stem.requires_grad_(False)
            data = encode_demos(model, rehearsal, cfg.eval_batch)
            perm = torch.from_numpy(self._rng.permutation(len(data)))
            n_val = min(cfg.rehearsal_val, len(data) // 4) if len(data) >= 8 else 0
            self.rehearsal_val = data.take(perm[:n_val]) if n_val else None
            self.rehearsal_train = data.take(perm[n_val:])
            self._warm_up(self.rehearsal_train)
        self.prepare_seconds = time.perf_counter() - t0

    def _warm_up(self, data: Cached) -> None:
        """One training step and one decode on a throwaway copy of the head, so the first round does not pay
        torch's one-time kernel and allocator set-up (about a second on 2 cores)."""
        import torch

        head = copy.deepcopy(self.model.head(self.name)).train()
        part = data.take(torch.arange(min(len(data), self.config.batch_size)))
        loss, _ = head.loss(part.memory, part.pad_mask, part.actions, torch.Generator().manual_seed(0))
        loss.backward()
        head_action_error(head, part, seed=0)

    # ---- the head's state -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.model.head_versions[self.name])

    def accept(self, result: RoundResult, version: int) -> None:
        """Make `result`'s candidate the current head at `version` (what the next round starts from)."""
        if result.embodiment != self.name:
            raise ValueError(f"accept: the result is for {result.embodiment!r}, this adapter adapts {self.name!r}")
        self.set_head(result.state, version)
        if result.rehearsal_scores is not None:
            calib_key, scores = result.rehearsal_scores
            self._rehearsal_scores = ((int(version), calib_key), dict(scores))

    def set_head(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Replace the current head (a rollback, or a newer head published elsewhere)."""
        self.model.load_head_state_dict(self.name, state, version)
        self._rehearsal_scores = None

    def add_earlier(self, corrections: Sequence[Correction]) -> int:
        """Put corrections an earlier incarnation already learnt from into the pools (a restarted learner
        reloads them from the replay store), without a round. Returns how many were added."""
        corrections = list(corrections)[-self.config.max_corrections :]
        if not corrections:
            return 0
        train, holdout = self._ingest(corrections)
        self.earlier = bounded(Cached.cat([self.earlier, train]), self.config.max_corrections)
        self.earlier_val = bounded(Cached.cat([self.earlier_val, holdout]), max(1, self.config.rehearsal_val))
        return len(corrections)

    def _ingest(self, corrections: list[Correction]) -> tuple[Cached, Cached | None]:
        """Encode corrections once, note a hardware change and its residuals, split off the held-out share."""
        import torch

        cfg = self.config
        new = encode_demos(self.model, corrections_to_demos(corrections, self.name), cfg.eval_batch, keep_inputs=True)
        if self.known_ids is not None and cfg.word_lr > 0:
            words = self.model.vocab.words  # specials ([PAD], [UNK], [EMB_*]) are bracketed: never adapted
            seen = {int(i) for i in torch.unique(new.inputs["instr"]).tolist()}
            fresh = sorted(i for i in seen - self.known_ids if not words[i].startswith("[") and i not in self.word_ids)
            self.word_ids = sorted(self.word_ids + fresh)
        hardware = [any(s in cfg.hardware_shifts for s in _shift_names(c.shift)) for c in corrections]
        if any(hardware):
            self.hardware_changed = True
            idx = torch.tensor([i for i, h in enumerate(hardware) if h], dtype=torch.long)
            self._residuals.append(self._residual(new.take(idx)))
            estimate = self._estimate_calibration()
            # keep the labels (and the cached rehearsal scores) unless the estimate really moved
            moved = self.calibration is None or np.abs(estimate - self.calibration).max() > 0.1 * cfg.calibration_min
            if moved:
                self.calibration = estimate
        n = len(new)
        n_hold = int(round(cfg.holdout * n)) if n >= 5 else 0
        n_hold = max(1, n_hold) if n >= 5 and cfg.holdout > 0 else n_hold
        perm = torch.from_numpy(self._rng.permutation(n))
        return new.take(perm[n_hold:]), (new.take(perm[:n_hold]) if n_hold else None)

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
        n, n_hold = len(corrections), 0 if holdout is None else len(holdout)
        t_encode = time.perf_counter() - t0

        rehearsal_train, rehearsal_val = self.rehearsal_train, self.rehearsal_val
        if self.calibration is not None:
            rehearsal_train = relabel(rehearsal_train, self.calibration)
            rehearsal_val = relabel(rehearsal_val, self.calibration)
        rehearsal_share = 1.0 - cfg.new_share - cfg.earlier_share
        current = self.model.head(self.name)
        seed = cfg.seed * 7919 + self.rounds
        # rehearsal scores use one fixed seed, so a head's scores stay comparable (and cacheable) across rounds
        calib_key = None if self.calibration is None else tuple(np.round(self.calibration, 6).tolist())
        cache_key = (self.version, calib_key)
        if self._rehearsal_scores is not None and self._rehearsal_scores[0] == cache_key:
            rehearsal_before = dict(self._rehearsal_scores[1])
        else:
            rehearsal_before = {
                "rehearsal": head_loss(current, rehearsal_val, cfg.seed, cfg.eval_batch),
                "rehearsal_action_error": head_action_error(current, rehearsal_val, cfg.seed, cfg.eval_batch),
            }
            self._rehearsal_scores = (cache_key, rehearsal_before)
        # held-out corrections with an adapted word are scored on memory re-encoded with each head's adapters
        earlier_val_now = self._reencode(self.earlier_val, current.word_delta)
        before = rehearsal_before | {
            "holdout": head_loss(current, holdout, seed + 1, cfg.eval_batch),
            "earlier_holdout": head_loss(current, earlier_val_now, seed + 2, cfg.eval_batch),
        }
        t1 = time.perf_counter()
        deadline = None
        if cfg.max_round_seconds is not None:  # leave room for the validation after training (~ the one before)
            deadline = t0 + cfg.max_round_seconds - 1.2 * (t1 - t_encode - t0) - 0.05
        words_only = cfg.words_only and cfg.word_lr > 0 and self._names_adapted_words(train, holdout)
        candidate, train_loss, steps_done = self._train(
            current, train, self.earlier, rehearsal_train, rehearsal_share, deadline, words_only
        )
        t_train = time.perf_counter() - t1
        after = {
            "rehearsal": head_loss(candidate, rehearsal_val, cfg.seed, cfg.eval_batch),
            "rehearsal_action_error": head_action_error(candidate, rehearsal_val, cfg.seed, cfg.eval_batch),
            "holdout": head_loss(candidate, self._reencode(holdout, candidate.word_delta), seed + 1, cfg.eval_batch),
            "earlier_holdout": head_loss(
                candidate, self._reencode(self.earlier_val, candidate.word_delta), seed + 2, cfg.eval_batch
            ),
        }
        accepted, reason, gate = self._judge(before, after, train_loss)
        # the corrections stay for later rounds whatever the verdict
        self.earlier = bounded(Cached.cat([self.earlier, train]), cfg.max_corrections)
        self.earlier_val = bounded(Cached.cat([self.earlier_val, holdout]), max(1, cfg.rehearsal_val))
        self.rounds += 1
        state = {k: v.detach().clone() for k, v in candidate.state_dict().items()}
        seconds = time.perf_counter() - t0
        metrics = {
            "round": self.rounds,
            "from_version": self.version,
            "before": before,
            "after": after,
            "gate": gate,
            "train_loss_last": train_loss,
            "new": n,
            "train_rows": len(train),
            "holdout_rows": n_hold,
            "earlier_rows": 0 if self.earlier is None else len(self.earlier) - len(train),
            "rehearsal_rows": 0 if rehearsal_train is None else len(rehearsal_train),
            "hardware_changed": self.hardware_changed,
            "calibration": None if self.calibration is None else self._physical_offset(self.calibration),
            "seconds_encode": t_encode,
            "seconds_train": t_train,
            "steps": cfg.steps,
            "steps_done": steps_done,
            "adapted_words": [self.model.vocab.words[i] for i in self.word_ids],
            "words_only": words_only,
        }
        scores = (calib_key, {k: after[k] for k in ("rehearsal", "rehearsal_action_error")})
        return RoundResult(self.name, accepted, reason, state, metrics, seconds, scores)

    def _judge(self, before: dict, after: dict, train_loss: float | None) -> tuple[bool, str, dict]:
        cfg = self.config
        tol = cfg.rehearsal_tolerance
        # the rehearsal gate: held-out pretraining samples (recalibrated after a hardware change), or the
        # earlier held-out corrections when there is no rehearsal set
        key = "rehearsal" if before["rehearsal"] is not None else "earlier_holdout"
        gate = {"on": key, "before": before[key], "after": after[key], "tolerance": tol}
        finite = [v for v in (train_loss, after["holdout"], after[key]) if v is not None]
        if train_loss is None or not all(math.isfinite(v) for v in finite):
            return False, "the candidate's loss is not finite", gate
        if before[key] is not None:
            limit = before[key] * (1.0 + tol) + 1e-6
            gate["limit"] = limit
            if not after[key] <= limit:
                what = "rehearsal" if key == "rehearsal" else "earlier held-out corrections"
                return False, f"worse on {what}: loss {after[key]:.4f} > {before[key]:.4f} x (1 + {tol})", gate
            err_before, err_after = before["rehearsal_action_error"], after["rehearsal_action_error"]
            if key == "rehearsal" and err_before is not None:
                gate["action_error"] = {"before": err_before, "after": err_after}
                if not err_after <= err_before * (1.0 + tol) + 1e-6:
                    return (
                        False,
                        f"worse on rehearsal: executed-action error {err_after:.4f} > {err_before:.4f} x (1 + {tol})",
                        gate,
                    )
        else:
            gate["on"] = None  # nothing to rehearse (no rehearsal set, first round)
        if cfg.require_holdout_improvement and before["holdout"] is not None:
            if not after["holdout"] <= before["holdout"] + 1e-6:
                return (
                    False,
                    f"no better on held-out corrections: loss {after['holdout']:.4f} > {before['holdout']:.4f}",
                    gate,
                )
        return True, "ok", gate

    # ---- word adapters ------------------------------------------------------------------------------
    def _names_adapted_words(self, *parts: Cached | None) -> bool:
        import torch

        if not self.word_ids:
            return False
        ids = torch.tensor(self.word_ids)
        return any(
            p is not None and p.inputs is not None and bool(torch.isin(p.inputs["instr"], ids).any()) for p in parts
        )

    def _reencode(self, data: Cached | None, table, grad: bool = False) -> Cached | None:
        """`data` with the memory of its rows that hold an adapted word recomputed under word-adapter `table`
        (V, d) (with autograd when `grad`); other rows, and data without raw inputs, are returned as they are."""
        import torch

        from fleet.policy.batch import PolicyBatch

        if data is None or data.inputs is None or not self.word_ids:
            return data
        instr = data.inputs["instr"]
        rows = torch.isin(instr, torch.tensor(self.word_ids, dtype=instr.dtype)).any(1).nonzero().flatten()
        if rows.numel() == 0:
            return data
        emb = self.model.vocab.token_id(self.spec.token)
        mems = []
        with torch.set_grad_enabled(grad):
            for chunk in rows.split(self.config.eval_batch):
                batch = PolicyBatch(
                    image=data.inputs["image"].index_select(0, chunk),
                    proprio=data.inputs["proprio"].index_select(0, chunk),
                    instr_ids=instr.index_select(0, chunk),
                    emb_idx=torch.full((len(chunk),), emb, dtype=torch.long),
                    embodiments=[self.name] * len(chunk),
                )
                mems.append(self.model.encode(batch, word_deltas={self.name: table})[0])
        memory = data.memory.index_copy(0, rows, torch.cat(mems).to(data.memory.dtype))
        return Cached(memory, data.pad_mask, data.actions, data.inputs)

    # ---- hardware changes ---------------------------------------------------------------------------
    def _residual(self, data: Cached):
        """Per correction, the mean over its chunk of (corrected - reference head's prediction) per dimension,
        normalized units; NaN where every step sat at a range limit (a clipped command hides the offset)."""
        import torch

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

    def _estimate_calibration(self) -> np.ndarray:
        """(D,) command offset (normalized) per dimension from every correction since the hardware changed:
        the mean residual where it is `calibration_z` standard errors from zero and at least
        `calibration_min`, else 0 (that dimension's old labels still hold)."""
        import torch

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

    def _physical_offset(self, offset: np.ndarray) -> list[float]:
        """A normalized offset in the embodiment's physical units (half the range per normalized unit)."""
        half = (np.asarray(self.spec.action_high) - np.asarray(self.spec.action_low)) / 2.0
        return [round(float(v), 6) for v in offset * half]

    def _train(
        self,
        current,
        new: Cached,
        earlier: Cached | None,
        rehearsal: Cached | None,
        rehearsal_share: float,
        deadline: float | None = None,
        words_only: bool = False,
    ) -> tuple[object, float | None, int]:
        """A copy of `current` trained on the mix; the stem is frozen (it runs before the cached memory).
        words_only: train the word adapters alone, on corrections only (rehearsal cannot move them)."""
        import torch

        cfg = self.config
        head = copy.deepcopy(current)
        head.train()
        params = [p for n, p in head.named_parameters() if not n.startswith("stem.") and not words_only]
        for n, p in head.named_parameters():
            p.requires_grad_(not n.startswith("stem.") and not words_only)
        groups = [{"params": params}] if params else []
        # word adapters: only the rows of adapted words train (every other row stays exactly as it is)
        table, word_rows, ids = head.word_delta.detach().clone(), None, None
        if self.word_ids and cfg.word_lr > 0:
            ids = torch.tensor(self.word_ids, dtype=torch.long)
            word_rows = torch.nn.Parameter(table.index_select(0, ids).clone())
            groups.append({"params": [word_rows], "lr": cfg.word_lr, "weight_decay": 0.0, "word": True})
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sources = [(new, cfg.new_share), (earlier, cfg.earlier_share), (rehearsal, rehearsal_share)]
        if words_only:  # only corrections carry adapted words; half a batch of them (each runs the backbone)
            sources = sources[:2]
        sources = [(d, w) for d, w in sources if d is not None and len(d) and w > 0]
        weights = np.array([w for _, w in sources], np.float64)
        rows = max(1, cfg.batch_size // 2) if words_only else cfg.batch_size
        counts = np.maximum(1, np.round(rows * weights / weights.sum()).astype(int))
        last = None
        done = 0
        for step in range(cfg.steps):
            if deadline is not None and step > 0 and time.perf_counter() > deadline:
                break  # at least one step always runs
            for g in opt.param_groups:
                g["lr"] = (cfg.word_lr if g.get("word") else cfg.lr) * (1.0 - 0.9 * step / max(1, cfg.steps - 1))
            parts = [
                d.take(torch.randint(0, len(d), (int(k),), generator=self._gen))
                for (d, _), k in zip(sources, counts, strict=True)
            ]
            if word_rows is not None:  # corrections naming adapted words: through the backbone, with autograd
                step_table = table.index_copy(0, ids, word_rows)
                parts = [self._reencode(part, step_table, grad=True) for part in parts]
            batch = Cached.cat(parts)
            loss, _ = head.loss(batch.memory, batch.pad_mask, batch.actions, self._gen)
            if not loss.requires_grad:  # words only, and this batch drew no row naming an adapted word
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            last = float(loss.detach())
            done += 1
        if word_rows is not None:
            head.word_delta.copy_(table.index_copy(0, ids, word_rows.detach()))
        head.eval()
        return head, last, done


def _shift_names(shift: str | None) -> list[str]:
    if not shift:
        return []
    return [p.strip() for p in str(shift).replace(",", "+").split("+") if p.strip()]
