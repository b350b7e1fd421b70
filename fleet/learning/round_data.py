"""What head adaptation trains and validates on: corrections and rehearsal samples with their backbone
memory (`Cached`), and the pools one head keeps between rounds (`HeadData`). The rounds themselves are in
head_adapter.py; the scores a candidate is judged by in candidate_gate.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fleet.data.correction import Correction
from fleet.learning.round_config import AdaptConfig
from fleet.policy.batch import PolicyBatch, normalize_actions
from fleet.policy.demos import DemoSet, collect
from fleet.validate import check_int

REHEARSAL_SEED = 7_000_000
# rehearsal episodes use seeds far from pretraining (0..) and evaluation (1_000_000_007..) seeds


def corrections_to_demos(corrections: Sequence[Correction], name: str) -> DemoSet:
    """Corrections of embodiment `name` as a DemoSet: (image, proprio, instruction) -> corrected chunk."""
    if not corrections:
        raise ValueError(f"corrections_to_demos: no corrections of {name!r}")
    for i, c in enumerate(corrections):
        if c.embodiment != name:
            raise ValueError(f"corrections[{i}]: embodiment {c.embodiment!r}, expected {name!r}")
    return DemoSet(
        name,
        np.stack([np.asarray(c.image, np.uint8) for c in corrections]),
        np.stack([np.asarray(c.proprio, np.float32) for c in corrections]),
        [c.instruction for c in corrections],
        np.stack([np.asarray(c.corrected_chunk, np.float32) for c in corrections]),
    )


def rehearsal_set(name: str, episodes: int = 120, seed: int = 0, states_per_episode: float = 4.0) -> DemoSet:
    """Pretraining-style expert samples of `name` in the unshifted simulator (about `states_per_episode`
    visited states kept per episode, as pretraining keeps them)."""
    check_int("rehearsal_set.episodes", episodes, lo=1, expected="a positive int")
    pilot = collect(name, min(episodes, 8), seed=REHEARSAL_SEED + seed * 1000 + 999)
    keep = min(1.0, states_per_episode * pilot.episodes / max(1, len(pilot)))
    return collect(name, episodes, seed=REHEARSAL_SEED + seed * 1000, keep=keep)


@dataclass
class Cached:
    """Samples of one embodiment with their backbone memory, ready to train or validate a head on.

    `inputs` (corrections only): the raw rows {"image" uint8, "proprio", "instr"} the memory came from,
    kept so rows whose instruction holds an adapted word can be re-encoded with new word adapters."""

    memory: torch.Tensor  # (N, S, d) float32
    pad_mask: torch.Tensor  # (N, S) bool, True = padding
    actions: torch.Tensor  # (N, T, D) float32 normalized
    inputs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.memory.shape[0])

    @staticmethod
    def cat(parts: Sequence[Cached | None]) -> Cached | None:
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        inputs = None
        if all(p.inputs is not None for p in parts):
            inputs = {k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs}
        return Cached(*(torch.cat([getattr(p, f) for p in parts]) for f in ("memory", "pad_mask", "actions")), inputs)

    def take(self, idx: torch.Tensor) -> Cached:
        inputs = None if self.inputs is None else {k: v.index_select(0, idx) for k, v in self.inputs.items()}
        return Cached(self.memory.index_select(0, idx), self.pad_mask.index_select(0, idx), self.actions[idx], inputs)

    def tail(self, n: int) -> Cached:
        inputs = None if self.inputs is None else {k: v[-n:] for k, v in self.inputs.items()}
        return Cached(self.memory[-n:], self.pad_mask[-n:], self.actions[-n:], inputs)


def encode_demos(model, demos: DemoSet, eval_batch: int = 256, keep_inputs: bool = False) -> Cached:
    """Backbone memory of every sample, once (no_grad: the stem and backbone are frozen during adaptation).
    keep_inputs: also keep the raw rows (Cached.inputs), to re-encode them under new word adapters."""
    name = demos.embodiment
    spec = model.specs[name]
    n = len(demos)
    emb = model.vocab.token_id(spec.token)
    cache: dict[str, np.ndarray] = {}
    length = model.config.max_instr_len
    instr = np.stack([cache.setdefault(t, model.vocab.encode(t, length)) for t in demos.instructions])
    actions = torch.from_numpy(normalize_actions(spec, demos.actions))
    mems, masks = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, eval_batch):
                sl = slice(start, min(n, start + eval_batch))
                rows = sl.stop - sl.start
                batch = PolicyBatch(
                    image=torch.from_numpy(np.ascontiguousarray(demos.images[sl])),
                    proprio=torch.from_numpy(np.ascontiguousarray(demos.proprio[sl], dtype=np.float32)),
                    instr_ids=torch.from_numpy(instr[sl]),
                    emb_idx=torch.full((rows,), emb, dtype=torch.long),
                    embodiments=[name] * rows,
                )
                memory, pad_mask, _ = model.encode(batch)
                mems.append(memory.detach().clone())
                masks.append(pad_mask.detach().clone())
    finally:
        model.train(was_training)
    inputs = None
    if keep_inputs:
        inputs = {
            "image": torch.from_numpy(np.ascontiguousarray(demos.images)),
            "proprio": torch.from_numpy(np.ascontiguousarray(demos.proprio, dtype=np.float32)),
            "instr": torch.from_numpy(instr),
        }
    return Cached(torch.cat(mems), torch.cat(masks), actions, inputs)


def relabel(data: Cached | None, offset: np.ndarray) -> Cached | None:
    """`data` with `offset` (D,) added to every action and clipped to the range: what the expert commands
    on hardware whose commands are offset by -`offset`."""
    if data is None or not np.any(offset):
        return data
    shifted = (data.actions + torch.from_numpy(offset)).clamp(-1.0, 1.0)
    return Cached(data.memory, data.pad_mask, shifted)


def bounded(data: Cached | None, n: int) -> Cached | None:
    return data if data is None or len(data) <= n else data.tail(n)


class HeadData:
    """The samples one head's rounds train and validate on, kept between rounds:

      rehearsal_train, rehearsal_val   the rehearsal set, encoded once here and split once
      earlier, earlier_val             every earlier round's corrections: the training part (the newest
                                       `max_corrections`) and the held-out part (never trained on)

    Its random generator (seeded by `config.seed`) draws the rehearsal split and each round's held-out share.
    """

    def __init__(self, model, name: str, rehearsal: DemoSet | None, config: AdaptConfig) -> None:
        self.model, self.name, self.config = model, name, config
        self._rng = np.random.default_rng(config.seed)
        self.rehearsal_train: Cached | None = None
        self.rehearsal_val: Cached | None = None
        self.earlier: Cached | None = None
        self.earlier_val: Cached | None = None
        if rehearsal is not None and len(rehearsal):
            data = encode_demos(model, rehearsal, config.eval_batch)
            perm = torch.from_numpy(self._rng.permutation(len(data)))
            n_val = min(config.rehearsal_val, len(data) // 4) if len(data) >= 8 else 0
            self.rehearsal_val = data.take(perm[:n_val]) if n_val else None
            self.rehearsal_train = data.take(perm[n_val:])

    def encode(self, corrections: list[Correction]) -> Cached:
        """Corrections with their memory and raw rows (re-encoded later when they name an adapted word)."""
        demos = corrections_to_demos(corrections, self.name)
        return encode_demos(self.model, demos, self.config.eval_batch, keep_inputs=True)

    def split_holdout(self, new: Cached) -> tuple[Cached, Cached | None]:
        """(training part, held-out part) of a round's new corrections: `holdout` of them, at least one of 5+."""
        holdout = self.config.holdout
        n = len(new)
        n_hold = int(round(holdout * n)) if n >= 5 else 0
        n_hold = max(1, n_hold) if n >= 5 and holdout > 0 else n_hold
        perm = torch.from_numpy(self._rng.permutation(n))
        return new.take(perm[n_hold:]), (new.take(perm[:n_hold]) if n_hold else None)

    def keep(self, train: Cached, holdout: Cached | None) -> None:
        """A round's corrections join the earlier pools (whatever its verdict)."""
        self.earlier = bounded(Cached.cat([self.earlier, train]), self.config.max_corrections)
        self.earlier_val = bounded(Cached.cat([self.earlier_val, holdout]), max(1, self.config.rehearsal_val))

    def rehearsal(self, offset: np.ndarray | None) -> tuple[Cached | None, Cached | None]:
        """(training, validation) rehearsal rows, their labels shifted by a hardware change's `offset`."""
        if offset is None:
            return self.rehearsal_train, self.rehearsal_val
        return relabel(self.rehearsal_train, offset), relabel(self.rehearsal_val, offset)
