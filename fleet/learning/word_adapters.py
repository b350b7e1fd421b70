"""A head's word adapters during adaptation: which instruction words it adapts, and the backbone memory of
rows that name them, recomputed under a given adapter table.

A word adapter is a vector the head adds to the embedding of an instruction word the rehearsal set never
uses (a novel object's name); every other word's row stays zero, so known instructions encode exactly as
before. Rows that name an adapted word cannot use their cached memory: it depends on the adapters, so they
run through the backbone again (with autograd while the adapters train).
"""

from __future__ import annotations

import torch

from fleet.learning.round_data import Cached
from fleet.policy.batch import PolicyBatch
from fleet.policy.demos import DemoSet


class WordAdapters:
    """The words head `name` of `model` adapts. Without a rehearsal set (nothing says which words are known)
    or with `enabled` False, it adapts none."""

    def __init__(self, model, name: str, rehearsal: DemoSet | None, eval_batch: int, enabled: bool) -> None:
        self.model, self.name, self.eval_batch = model, name, eval_batch
        # word ids the rehearsal set uses (their adapters stay zero); None: no rehearsal, so no word adapters
        self.known_ids: set[int] | None = None
        if rehearsal is not None and len(rehearsal) and enabled:
            length = model.config.max_instr_len
            self.known_ids = {int(i) for t in set(rehearsal.instructions) for i in model.vocab.encode(t, length)}
        self.ids: list[int] = []  # ids this head adapts: in corrections, not in known_ids, not special

    def words(self) -> list[str]:
        return [self.model.vocab.words[i] for i in self.ids]

    def discover(self, new: Cached) -> None:
        """Adapt, from now on, every word of `new` (corrections with raw inputs) the rehearsal set never uses."""
        if self.known_ids is None:
            return
        words = self.model.vocab.words  # specials ([PAD], [UNK], [EMB_*]) are bracketed: never adapted
        seen = {int(i) for i in torch.unique(new.inputs["instr"]).tolist()}
        fresh = sorted(i for i in seen - self.known_ids if not words[i].startswith("[") and i not in self.ids)
        self.ids = sorted(self.ids + fresh)

    def named_in(self, *parts: Cached | None) -> bool:
        """Does any row of `parts` name an adapted word?"""
        if not self.ids:
            return False
        ids = torch.tensor(self.ids)
        return any(
            p is not None and p.inputs is not None and bool(torch.isin(p.inputs["instr"], ids).any()) for p in parts
        )

    def reencode(self, data: Cached | None, table: torch.Tensor, grad: bool = False) -> Cached | None:
        """`data` with the memory of its rows that hold an adapted word recomputed under word-adapter `table`
        (V, d) (with autograd when `grad`); other rows, and data without raw inputs, are returned as they are."""
        if data is None or data.inputs is None or not self.ids:
            return data
        instr = data.inputs["instr"]
        rows = torch.isin(instr, torch.tensor(self.ids, dtype=instr.dtype)).any(1).nonzero().flatten()
        if rows.numel() == 0:
            return data
        emb = self.model.vocab.token_id(self.model.specs[self.name].token)
        mems = []
        with torch.set_grad_enabled(grad):
            for chunk in rows.split(self.eval_batch):
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
