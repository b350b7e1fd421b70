"""What online adaptation trains and judges on: corrections and rehearsal samples with their backbone
memory (`Cached`), and the deterministic scores a candidate head is gated by (`head_loss`,
`head_action_error`). The rounds themselves are in adapt.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleet.data.correction import Correction
from fleet.policy.demos import DemoSet

if TYPE_CHECKING:
    import torch

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
    from fleet.policy.demos import collect

    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"rehearsal_set: episodes must be a positive int, got {episodes!r}")
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
    def cat(parts: Sequence[Cached]) -> Cached | None:
        import torch

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
    import torch

    from fleet.policy.batch import PolicyBatch, normalize_actions

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


def _mean_over(head, data: Cached | None, seed: int, eval_batch: int, score) -> float | None:
    """Row-weighted mean of `score(part, generator)` over `data` in chunks of `eval_batch`, with `head` in eval
    mode and no autograd (its mode restored after). None when `data` is empty. The generator is seeded with
    `seed`, so two heads are compared on the same noise draws."""
    import torch

    if data is None or len(data) == 0:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    total = 0.0
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), eval_batch):
                part = data.take(torch.arange(start, min(len(data), start + eval_batch)))
                total += float(score(part, gen)) * len(part)
    finally:
        head.train(was_training)
    return total / len(data)


def head_loss(head, data: Cached | None, seed: int, eval_batch: int = 256) -> float | None:
    """Mean loss of `head` on `data` (None when empty). Deterministic: a flow head's noise and times come
    from a generator seeded with `seed`, so two heads are compared on the same draws."""
    return _mean_over(
        head, data, seed, eval_batch, lambda part, gen: head.loss(part.memory, part.pad_mask, part.actions, gen)[0]
    )


def head_action_error(head, data: Cached | None, seed: int, eval_batch: int = 256) -> float | None:
    """Mean absolute error (normalized units) of the actions `head` would execute on `data`: its greedy chunk
    (a flow head: the mean of 2 samples; the fleet runs 4, but two heads compared on the same seeded noise
    need fewer, and 4 cost ~1 s a round) over the first `loss_head_steps` steps, the ones a robot executes
    before asking again. None when `data` is empty. Deterministic like `head_loss`.

    This is what closed-loop success follows; the training loss need not: a token head's cross-entropy
    can fall while its most likely bins move away from the target."""
    steps = head.config.loss_head_steps
    k = 2 if getattr(head, "kind", "") == "flow" else 1

    def error(part, gen):
        chunk = head.predict(part.memory, part.pad_mask, k, 0.0, gen)["chunk"]
        return (chunk[:, :steps] - part.actions[:, :steps]).abs().mean()

    return _mean_over(head, data, seed, eval_batch, error)


def relabel(data: Cached | None, offset: np.ndarray) -> Cached | None:
    """`data` with `offset` (D,) added to every action and clipped to the range: what the expert commands
    on hardware whose commands are offset by -`offset`."""
    import torch

    if data is None or not np.any(offset):
        return data
    shifted = (data.actions + torch.from_numpy(offset)).clamp(-1.0, 1.0)
    return Cached(data.memory, data.pad_mask, shifted)


def bounded(data: Cached | None, n: int) -> Cached | None:
    return data if data is None or len(data) <= n else data.tail(n)
