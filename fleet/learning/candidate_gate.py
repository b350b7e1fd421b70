"""How a candidate head is judged before it may be published: deterministic scores on data it never trained
on (`head_loss`, `head_action_error`) and the gate over them (`judge_candidate`).

  - rehearsal: a held-out slice of the pretraining-style samples. The candidate passes when its loss and
    the error of the actions it would execute (`head_action_error`: greedy chunk, first steps) are each
    at most `(1 + rehearsal_tolerance)` times the current head's (2 % by default). The action error is
    the one that matters: on a development model three novel_object rounds lowered the rehearsal
    cross-entropy (0.182 -> 0.166) while the executed-action error rose (0.075 -> 0.085) and closed-loop
    success on the original objects fell from 34 % to 15 % (100 episodes); the loss alone let them through.
  - held-out corrections: a share (`holdout`) of every round's new corrections never enters training;
    the candidate must not be worse than the current head on them (else it learnt nothing useful).
  - earlier held-out corrections (every earlier round's held-out share) are reported alongside, and gate
    a head that has no rehearsal set.
"""

from __future__ import annotations

import math

import torch

from fleet.learning.round_config import AdaptConfig
from fleet.learning.round_data import Cached


def _mean_over(head, data: Cached | None, seed: int, eval_batch: int, score) -> float | None:
    """Row-weighted mean of `score(part, generator)` over `data` in chunks of `eval_batch`, with `head` in eval
    mode and no autograd (its mode restored after). None when `data` is empty. The generator is seeded with
    `seed`, so two heads are compared on the same noise draws."""
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


def rehearsal_scores(head, rehearsal_val: Cached | None, config: AdaptConfig) -> dict:
    """{"rehearsal", "rehearsal_action_error"} of `head`, on one fixed seed: a head's scores stay comparable
    (and cacheable) across rounds."""
    return {
        "rehearsal": head_loss(head, rehearsal_val, config.seed, config.eval_batch),
        "rehearsal_action_error": head_action_error(head, rehearsal_val, config.seed, config.eval_batch),
    }


def judge_candidate(before: dict, after: dict, train_loss: float | None, config: AdaptConfig) -> tuple[bool, str, dict]:
    """(accepted, "ok" or why not, the gate's figures) for a candidate scored `after` against the current
    head's `before` (each {"rehearsal", "rehearsal_action_error", "holdout", "earlier_holdout"})."""
    tol = config.rehearsal_tolerance
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
                why = f"worse on rehearsal: executed-action error {err_after:.4f} > {err_before:.4f} x (1 + {tol})"
                return False, why, gate
    else:
        gate["on"] = None  # nothing to rehearse (no rehearsal set, first round)
    if config.require_holdout_improvement and before["holdout"] is not None:
        if not after["holdout"] <= before["holdout"] + 1e-6:
            why = f"no better on held-out corrections: loss {after['holdout']:.4f} > {before['holdout']:.4f}"
            return False, why, gate
    return True, "ok", gate
