"""One timing per technique of `fleet bench infer`, over the batches of one size: each returns the baseline's
and the technique's ms for the whole list of batches and the largest action difference it makes (the
benchmark divides by the number of batches and writes the row; fleet/bench/infer.py says what rows mean).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fleet.bench.infer_measure import Timing, action_diff, action_diffs, over_batches, predict
from fleet.policy.inference.backend import TorchBackend
from fleet.policy.inference.encoder_cache import EncoderCache
from fleet.policy.inference.lora import add_lora, merge_lora


def time_backend(model, items: list, refs: list, fp32, backend, timing: Timing) -> tuple[float, float, np.ndarray]:
    """A backend's whole policy call against eager fp32: (base ms, ms, every action difference)."""
    diffs = np.concatenate(
        [action_diffs(model, predict(backend, b, k), ref) for (b, k, _), ref in zip(items, refs, strict=True)]
    )
    base_ms, ms = timing.paired(
        over_batches(items, lambda b, k, _: fp32.predict(b, n_samples=k)),
        over_batches(items, lambda b, k, _: backend.predict(b, n_samples=k)),
    )
    return base_ms, ms, diffs


def time_kv_cache(model, items: list, timing: Timing) -> tuple[float, float, float] | None:
    """The token heads' chunk decode with and without the KV cache: (base ms, ms, largest difference as a
    share of the normalized range); None when no batch has a token-head row."""
    decodes = []
    for b, _, _ in items:
        with torch.inference_mode():
            memory, pad_mask, _ = model.encode(b)
        for name, idx in b.groups().items():
            if model.specs[name].head == "token":
                decodes.append((model.head(name), memory[idx].detach(), pad_mask[idx]))
    if not decodes:
        return None
    with torch.inference_mode():
        diff = 0.0
        for head, mem, pm in decodes:
            a = head.decode(mem, pm, use_cache=True).actions
            u = head.decode(mem, pm, use_cache=False).actions
            diff = max(diff, float((a - u).abs().max()) / 2.0)  # normalized range is 2 wide
        base_ms, ms = timing.paired(
            over_batches(decodes, lambda h, m, p: h.decode(m, p, use_cache=False)),
            over_batches(decodes, lambda h, m, p: h.decode(m, p, use_cache=True)),
        )
    return base_ms, ms, diff


def time_encoder_cache(
    model, items: list, refs: list, fp32, whole_call: bool, timing: Timing
) -> tuple[str, float, float, float]:
    """Per-robot image tokens from a primed EncoderCache (a static scene): (scope, base ms, ms, difference).
    whole_call: time the whole policy call, else the image tokens alone."""
    cache = EncoderCache()
    for b, _, robots in items:  # prime: the scene is static from here on
        cache.tokens(robots, b.image.numpy(), b.instr_ids.numpy(), fp32.image_tokens)

    def cached_tokens(b, robots):
        return cache.tokens(robots, b.image.numpy(), b.instr_ids.numpy(), fp32.image_tokens)

    diff = max(
        action_diff(model, predict(fp32, b, k, image_tokens=cached_tokens(b, r)), ref)
        for (b, k, r), ref in zip(items, refs, strict=True)
    )
    if not whole_call:
        base_ms, ms = timing.paired(
            over_batches(items, lambda b, k, r: fp32.image_tokens(b.image.numpy(), b.instr_ids.numpy())),
            over_batches(items, lambda b, k, r: cached_tokens(b, r)),
        )
        return "image tokens", base_ms, ms, diff
    base_ms, ms = timing.paired(
        over_batches(items, lambda b, k, _: fp32.predict(b, n_samples=k)),
        over_batches(items, lambda b, k, r: fp32.predict(b, n_samples=k, image_tokens=cached_tokens(b, r))),
    )
    return "policy call", base_ms, ms, diff


def time_lora_merge(model, items: list, timing: Timing) -> tuple[float, float, float]:
    """A copy of the model with rank-8 adapters (random, as if trained) on every head: unmerged vs merged."""
    adapted = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for name in adapted.specs:
        with torch.no_grad():
            for p in add_lora(adapted.head(name), rank=8, alpha=16.0):
                p.normal_(0.0, 0.01, generator=gen)
    merged = copy.deepcopy(adapted)
    for name in merged.specs:
        merge_lora(merged.head(name))
    a, m = TorchBackend(adapted), TorchBackend(merged)
    diff = max(action_diff(model, predict(m, b, k), predict(a, b, k)) for b, k, _ in items)
    base_ms, ms = timing.paired(
        over_batches(items, lambda b, k, _: a.predict(b, n_samples=k)),
        over_batches(items, lambda b, k, _: m.predict(b, n_samples=k)),
    )
    return base_ms, ms, diff
