"""Teach a new body from demonstrations: its token row, proprio stem and head, with the backbone frozen.

    model.add_embodiment(CATALOG["so100"], like="franka")          # fleet.policy.model: new parts at v0
    data = OnboardData.from_demos(model, collect("so100", 100))     # image tokens encoded once (frozen)
    report = train_new_body(model, "so100", data, seconds=60)       # only the new parts change

The backbone's vision encoder does not depend on the new parts (its keypoints read the image and the
instruction words), so each demonstration's image tokens are computed once; every step then runs the frozen
transformer forward and backward (to reach the token row and the stem) and the new head. `train_scratch` is
the baseline the experiment compares against: the same architecture, every weight trained, from random init.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fleet.policy.batch import PolicyBatch, normalize_actions
from fleet.policy.demos import DemoSet

ENCODE_BATCH = 256  # rows per frozen vision-encoder call when caching image tokens


@dataclass
class OnboardData:
    """One body's demonstrations as training tensors, image tokens precomputed with the frozen encoder."""

    name: str
    tokens: torch.Tensor  # (N, n_tokens, d) float32 image tokens
    proprio: torch.Tensor  # (N, P) float32
    instr: torch.Tensor  # (N, L) int64
    actions: torch.Tensor  # (N, T, D) float32 normalized to [-1, 1]
    episodes: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_demos(cls, model, demos: DemoSet) -> OnboardData:
        """Encode `demos` of a body the model has (images through the frozen vision encoder, once)."""
        name = demos.embodiment
        spec = model.specs[name]
        if len(demos) == 0:
            raise ValueError(f"OnboardData: no demonstrations of {name!r}")
        instr = np.stack([model.vocab.encode(t, model.config.max_instr_len) for t in demos.instructions])
        images = torch.from_numpy(np.ascontiguousarray(demos.images))
        instr_t = torch.from_numpy(instr)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(demos), ENCODE_BATCH):
                sl = slice(start, start + ENCODE_BATCH)
                parts.append(model.backbone.vision_tokens(images[sl], instr_t[sl]).float().clone())
        return cls(
            name,
            torch.cat(parts),
            torch.from_numpy(np.ascontiguousarray(demos.proprio[:, : spec.proprio_dim], np.float32)),
            instr_t,
            torch.from_numpy(normalize_actions(spec, demos.actions)),
            demos.episodes,
        )

    def extend(self, other: OnboardData) -> OnboardData:
        """These rows and then `other`'s (the same body): a round's data grown by the demonstrations that
        arrived while it trained."""
        if other.name != self.name:
            raise ValueError(f"OnboardData.extend: rows of {other.name!r}, not {self.name!r}")
        return OnboardData(
            self.name,
            torch.cat([self.tokens, other.tokens]),
            torch.cat([self.proprio, other.proprio]),
            torch.cat([self.instr, other.instr]),
            torch.cat([self.actions, other.actions]),
            self.episodes + other.episodes,
        )


@dataclass
class OnboardReport:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per logged block of steps


def new_body_parameters(model, name: str) -> list[torch.nn.Parameter]:
    """What onboarding trains: the added head's parameters (decoder, output, stem, token row). Refuses a
    pretrained body: its head is adapted online by the learner (HeadAdapter), not onboarded."""
    if not model.is_added(name):
        raise ValueError(f"{name!r} is a pretrained body of this model; only added bodies are onboarded")
    return list(model.head(name).parameters())


def set_proprio_stats(model, name: str, data: OnboardData) -> None:
    """Standardize the new stem's input with the demonstrations' proprio statistics."""
    p = data.proprio
    model.set_proprio_stats(name, p.mean(0).numpy(), p.std(0).numpy() if len(p) > 1 else np.ones(p.shape[1]))


def train_new_body(
    model,
    name: str,
    data: OnboardData,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    fit_stats: bool = True,
    log_every: int = 50,
    progress: Callable[[int, float], None] | None = None,
    more: Callable[[], OnboardData | None] | None = None,
    more_every: int = 25,
) -> OnboardReport:
    """Train the added body `name` on `data` for `steps` steps or `seconds` of wall time (whichever is given;
    both: the first reached). The backbone and every other head are not touched (no gradient reaches them:
    requires_grad is off for the backbone and only the new head's parameters are in the optimizer).

    more: asked every `more_every` steps for the data grown by what arrived since (None: nothing new); the
    round then samples from all of it (and refits the proprio statistics with fit_stats), so a round can start
    on its first demonstrations while the robots are still recording the rest."""
    if steps is None and seconds is None:
        raise ValueError("train_new_body: give steps or seconds")
    params = new_body_parameters(model, name)
    if fit_stats:
        set_proprio_stats(model, name, data)
    head = model.head(name)
    emb_id = model.vocab.token_id(model.specs[name].token)
    backbone_flags = [p.requires_grad for p in model.backbone.parameters()]
    model.backbone.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    report = OnboardReport()
    t0 = time.perf_counter()
    model.train()
    block: list[float] = []
    try:
        while (steps is None or report.steps < steps) and (seconds is None or time.perf_counter() - t0 < seconds):
            idx = torch.randint(0, len(data), (batch_size,), generator=gen)
            tokens, instr = data.tokens.index_select(0, idx), data.instr.index_select(0, idx)
            proprio_tok = head.stem(data.proprio.index_select(0, idx))
            emb = torch.full((batch_size,), emb_id, dtype=torch.long)
            memory, pad_mask, _ = model.backbone.transformer(tokens, emb, proprio_tok, instr)
            loss, _ = head.loss(memory, pad_mask, data.actions.index_select(0, idx), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if steps is not None:  # a known length: decay linearly to a tenth, for a precise final fit
                for group in opt.param_groups:
                    group["lr"] = lr * (1.0 - 0.9 * report.steps / steps)
            opt.step()
            report.steps += 1
            if more is not None and report.steps % more_every == 0:
                grown = more()
                if grown is not None:
                    data = grown
                    if fit_stats:
                        set_proprio_stats(model, name, data)
            block.append(float(loss.detach()))
            if len(block) >= log_every:
                report.losses.append(float(np.mean(block)))
                block = []
                if progress is not None:
                    progress(report.steps, report.losses[-1])
    finally:
        model.eval()
        for p, flag in zip(model.backbone.parameters(), backbone_flags, strict=True):
            p.requires_grad_(flag)
    if block:
        report.losses.append(float(np.mean(block)))
    report.seconds = time.perf_counter() - t0
    return report


def train_scratch(
    model,
    demos: DemoSet,
    seconds: float,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> OnboardReport:
    """The baseline: every weight of `model` (a fresh FleetPolicy of the same architecture) trained by behaviour
    cloning on `demos` for `seconds` of wall time. Only the demonstrations' actions supervise it, as for the
    shared run (no privileged object positions)."""
    name = demos.embodiment
    spec = model.specs[name]
    model.set_proprio_stats(name, demos.proprio.mean(0), demos.proprio.std(0) if len(demos) > 1 else 1.0)
    images = torch.from_numpy(np.ascontiguousarray(demos.images))
    proprio = torch.from_numpy(np.ascontiguousarray(demos.proprio, np.float32))
    instr = torch.from_numpy(np.stack([model.vocab.encode(t, model.config.max_instr_len) for t in demos.instructions]))
    actions = torch.from_numpy(normalize_actions(spec, demos.actions))
    emb_id = model.vocab.token_id(spec.token)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    report = OnboardReport()
    t0 = time.perf_counter()
    model.train()
    block: list[float] = []
    try:
        while time.perf_counter() - t0 < seconds:
            idx = torch.randint(0, len(demos), (batch_size,), generator=gen)
            batch = PolicyBatch(
                images.index_select(0, idx),
                proprio.index_select(0, idx),
                instr.index_select(0, idx),
                torch.full((batch_size,), emb_id, dtype=torch.long),
                [name] * batch_size,
                actions.index_select(0, idx),
            )
            loss, _ = model.action_loss(batch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            report.steps += 1
            block.append(float(loss.detach()))
            if len(block) >= 50:
                report.losses.append(float(np.mean(block)))
                block = []
    finally:
        model.eval()
    if block:
        report.losses.append(float(np.mean(block)))
    report.seconds = time.perf_counter() - t0
    return report
