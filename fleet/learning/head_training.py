"""The training step of a head-adaptation round: a copy of the current head trained on a mix of samples
with cached backbone memory (the backbone and the head's proprio stem stay frozen), and its word adapters.

What a round trains on: every batch mixes this round's new corrections (`new_share`), earlier corrections
(`earlier_share`) and pretraining-style expert samples of the unshifted simulator (the rest), so what the
head already did well is rehearsed rather than forgotten. A missing source's share goes to the others in
proportion.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from fleet.learning.candidate_gate import head_action_error
from fleet.learning.round_config import AdaptConfig
from fleet.learning.round_data import Cached
from fleet.learning.word_adapters import WordAdapters


@dataclass
class Mix:
    """Where a round's batches come from: (rows, share of each batch) per source; None or empty: none."""

    new: Cached
    earlier: Cached | None
    rehearsal: Cached | None
    rehearsal_share: float

    def sources(self, config: AdaptConfig, words_only: bool) -> list[tuple[Cached, float]]:
        sources = [(self.new, config.new_share), (self.earlier, config.earlier_share)]
        if not words_only:  # only corrections carry adapted words (each runs the backbone)
            sources.append((self.rehearsal, self.rehearsal_share))
        return [(d, w) for d, w in sources if d is not None and len(d) and w > 0]


def warm_up(head, data: Cached, batch_size: int) -> None:
    """One training step and one decode on a throwaway copy of `head`, so the first round does not pay
    torch's one-time kernel and allocator set-up (about a second on 2 cores)."""
    head = copy.deepcopy(head).train()
    part = data.take(torch.arange(min(len(data), batch_size)))
    loss, _ = head.loss(part.memory, part.pad_mask, part.actions, torch.Generator().manual_seed(0))
    loss.backward()
    head_action_error(head, part, seed=0)


def _optimizer(head, words: WordAdapters, config: AdaptConfig, words_only: bool):
    """(AdamW, the decoder's trainable parameters, the adapted words' rows as a Parameter or None, their ids).
    The stem is frozen (it runs before the cached memory); words_only freezes the whole decoder."""
    params = [p for n, p in head.named_parameters() if not n.startswith("stem.") and not words_only]
    for n, p in head.named_parameters():
        p.requires_grad_(not n.startswith("stem.") and not words_only)
    groups = [{"params": params}] if params else []
    # word adapters: only the rows of adapted words train (every other row stays exactly as it is)
    word_rows, ids = None, None
    if words.ids and config.word_lr > 0:
        ids = torch.tensor(words.ids, dtype=torch.long)
        word_rows = torch.nn.Parameter(head.word_delta.detach().index_select(0, ids).clone())
        groups.append({"params": [word_rows], "lr": config.word_lr, "weight_decay": 0.0, "word": True})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay), params, word_rows, ids


def train_candidate(
    current,
    mix: Mix,
    words: WordAdapters,
    config: AdaptConfig,
    generator: torch.Generator,
    deadline: float | None = None,
    words_only: bool = False,
) -> tuple[object, float | None, int]:
    """(a copy of `current` trained on `mix`, its last training loss or None, steps done). At least one step
    runs; later ones only before `deadline` (perf_counter). words_only: train the word adapters alone, on
    corrections only (rehearsal cannot move them)."""
    cfg = config
    device = _device(cfg.device)
    head = copy.deepcopy(current)
    head.train()
    opt, params, word_rows, ids = _optimizer(head, words, cfg, words_only)
    table = head.word_delta.detach().clone()
    # on a device: the decoder trains there (Module.to keeps the Parameter objects the optimizer holds);
    # the word adapters' rows stay on the host with the backbone that re-encodes them, their gradient
    # crossing back through the copy of the memory
    head.to(device)
    step_gen = generator
    if device.type != "cpu":
        step_gen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    sources = mix.sources(cfg, words_only)
    weights = np.array([w for _, w in sources], np.float64)
    rows = max(1, cfg.batch_size // 2) if words_only else cfg.batch_size  # half a batch when each runs the backbone
    counts = np.maximum(1, np.round(rows * weights / weights.sum()).astype(int))
    last = None
    done = 0
    for step in range(cfg.steps):
        if deadline is not None and step > 0 and time.perf_counter() > deadline:
            break  # at least one step always runs
        for g in opt.param_groups:
            g["lr"] = (cfg.word_lr if g.get("word") else cfg.lr) * (1.0 - 0.9 * step / max(1, cfg.steps - 1))
        parts = [
            d.take(torch.randint(0, len(d), (int(k),), generator=generator))
            for (d, _), k in zip(sources, counts, strict=True)
        ]
        if word_rows is not None:  # corrections naming adapted words: through the backbone, with autograd
            step_table = table.index_copy(0, ids, word_rows)
            parts = [words.reencode(part, step_table, grad=True) for part in parts]
        batch = Cached.cat(parts)
        memory, pad_mask, actions = (x.to(device) for x in (batch.memory, batch.pad_mask, batch.actions))
        loss, _ = head.loss(memory, pad_mask, actions, step_gen)
        if not loss.requires_grad:  # words only, and this batch drew no row naming an adapted word
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if params:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = float(loss.detach())
        done += 1
    head.cpu()
    if word_rows is not None:
        head.word_delta.copy_(table.index_copy(0, ids, word_rows.detach()))
    head.eval()
    return head, last, done


def _device(name: str) -> torch.device:
    """torch.device for AdaptConfig.device, with the serving path's clear error where it does not exist."""
    if name == "cpu":
        return torch.device("cpu")
    from fleet.policy.inference.device_backend import resolve_device

    return resolve_device(name)
