"""Inference-optimization benchmark: the course notes' speedup table, measured on this machine.

    fleet bench infer --json --out runs/bench-infer
    fleet experiment quantize --json --out runs/quantize     # the precision rows + per-embodiment success

One row per technique and batch size: {"technique", "batch", "scope", "baseline_ms", "ms", "speedup",
"max_action_diff", "success_delta", ...}.

- scope says what is timed: "policy call" (collated batch -> reply rows: backbone + heads), "token decoding"
  (the token heads' chunk decode), "image tokens" (the vision encoder's output for the batch) or
  "per control tick" (chunk recycling: the policy's cost spread over the ticks one chunk serves).
- batch 1 is the mean over one request of each embodiment; a larger batch mixes the embodiments round
  robin, as the fleet's server sees them. Flow rows draw FLOW_SAMPLES samples (the robots' default).
- baseline and technique are timed in alternating rounds and each is the median round, so load from
  other processes on the machine hits both alike; speedup = baseline_ms / ms.
- max_action_diff: the largest |chunk - fp32 eager chunk| over the batch's rows, steps and dimensions, as
  a share of that dimension's action range (flow rows from the same noise); mean_action_diff the mean (a
  token head's max is one bin flipped where two bins nearly tie; the mean says how often that happens).
- success_delta: closed-loop success rate (fleet.policy.evaluate, safety layer on, unseen seeds) with the
  technique minus without, over `episodes` per embodiment (a fraction: -0.01 is one point lower);
  0.0 where the outputs are identical by construction and measured so (max_action_diff 0), None where
  not evaluated.

Observations are real simulator frames recorded before timing. Torch and ONNX Runtime get the same
thread count (default 1: on 2 cores the other one is left to everything else).

This module runs the benchmark step by step; infer_measure.py has the model, the frames, timing and the
closed-loop measures, infer_techniques.py one timing per technique, infer_report.py the table and the plot.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import numpy as np
import torch

from fleet.bench.infer_measure import (
    FLOW_SAMPLES,
    Timing,
    backend_policy,
    load_model,
    make_batches,
    observations,
    over_batches,
    predict,
    recycling_ratio,
    static_frame_share,
    success,
)
from fleet.bench.infer_report import format_table, write_plot
from fleet.bench.infer_techniques import time_backend, time_encoder_cache, time_kv_cache, time_lora_merge
from fleet.policy.inference.backend import PolicyBackend, TorchBackend
from fleet.policy.inference.onnx_backend import OnnxBackend

__all__ = ["FLOW_SAMPLES", "PRECISION_TECHNIQUES", "TECHNIQUES", "format_table", "run_infer_bench", "write_plot"]

PRECISION_TECHNIQUES = ("bf16", "int8", "onnx-fp32", "onnx-int8")
TECHNIQUES = PRECISION_TECHNIQUES + ("kv-cache", "encoder-cache", "encoder-cache-call", "recycling", "lora-merge")
LABELS = {
    "bf16": "bf16 (torch autocast)",
    "int8": "int8 (torch.ao dynamic)",
    "onnx-fp32": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8",
    "kv-cache": "KV cache (token heads)",
    "encoder-cache": "vision-encoder cache",
    "encoder-cache-call": "vision-encoder cache, whole call",
    "recycling": "chunk recycling",
    "lora-merge": "LoRA merge (rank 8)",
}
NOTES_CLAIMS = {
    "int8": "2-3x, <1% quality",
    "onnx-fp32": "2-5x (TensorRT/ONNX), none",
    "kv-cache": "2x, none",
    "encoder-cache": "3x if static, none",
    "recycling": "4-8x, depends on horizon",
    "lora-merge": "1.5x, none",
}


class Rows(list):
    """The benchmark's rows; `add` appends one (and logs it)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__()
        self.log = log

    def add(self, tech: str, size: int, scope: str, base_ms: float, ms: float, diff: float | None, **extra) -> None:
        self.append(
            {
                "technique": LABELS[tech],
                "key": tech,
                "batch": size,
                "scope": scope,
                "baseline_ms": base_ms,
                "ms": ms,
                "speedup": base_ms / ms if ms > 0 else None,
                "max_action_diff": diff,
                "success_delta": None,
                "notes_claim": NOTES_CLAIMS.get(tech),
            }
            | extra
        )
        self.log(f"{LABELS[tech]:34s} batch {size:3d}: {base_ms:8.2f} -> {ms:8.2f} ms ({base_ms / ms:5.2f}x)")

    def set_success(self, tech: str, delta: float, base: float) -> None:
        for row in self:
            if row["key"] == tech:
                row["success_delta"], row["baseline_success"] = delta, base


# ----- the benchmark ----------------------------------------------------------------------------------------
def run_infer_bench(
    checkpoint=None,
    batches=(1, 64),
    episodes: int = 10,
    embodiments=None,
    repeats: int = 5,
    min_round_s: float = 0.2,
    threads: int = 1,
    techniques=TECHNIQUES,
    random_init: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict:
    """{"rows": [...], "model": {...}, "config": {...}, "success": {...}, "recycling": {...}, ...} (module doc)."""
    sizes = _check_options(techniques, batches)
    torch.set_num_threads(int(threads))
    model, source = load_model(checkpoint, random_init, log)
    names = _check_embodiments(model, embodiments)
    pools = observations(names, max(1, -(-max(sizes) // len(names))))
    backends = _make_backends(model, techniques, names, threads, log)
    timing = Timing(repeats, min_round_s)
    rows = Rows(log)
    for size in sizes:
        _time_size(model, pools, size, techniques, backends, timing, rows)
    extra: dict = {}
    if "recycling" in techniques:
        extra["recycling"] = _recycling(model, names, pools, sizes, backends["fp32"], timing, rows)
    if "encoder-cache" in techniques or "encoder-cache-call" in techniques:
        extra["static_frame_share"] = static_frame_share(names)
    if episodes > 0:  # closed-loop success, paired seeds
        extra["success"] = _closed_loop(backends, names, episodes, "recycling" in techniques, rows, log)
    for tech in backends:
        if tech != "fp32":
            backends[tech].close()
    config = {"batches": sizes, "episodes": episodes, "embodiments": names, "repeats": repeats, "threads": threads}
    return {"rows": list(rows), "model": source, "config": config | _environment(), **extra}


def _check_options(techniques, batch_sizes) -> list[int]:
    """The batch sizes, sorted and deduplicated; ValueError naming an unknown technique or a bad size."""
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"techniques: unknown {unknown}; known {TECHNIQUES}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batches: expected positive ints, got {batch_sizes!r}")
    return sizes


def _check_embodiments(model, embodiments) -> list[str]:
    names = list(embodiments or model.specs)
    missing = [n for n in names if n not in model.specs]
    if missing:
        raise ValueError(f"embodiments: {missing} not in the model; it has {sorted(model.specs)}")
    return names


def _make_backends(model, techniques, names: list[str], threads: int, log) -> dict[str, PolicyBackend]:
    """{"fp32": eager fp32, and a backend per precision technique asked for}."""
    backends: dict[str, PolicyBackend] = {"fp32": TorchBackend(model, "fp32")}
    for tech in techniques:
        if tech in ("bf16", "int8"):
            backends[tech] = TorchBackend(model, tech)
        elif tech.startswith("onnx-"):
            log(f"exporting the policy to ONNX ({tech[5:]}) ...")
            backends[tech] = OnnxBackend(model, tech[5:], threads=threads, heads=names)
    return backends


def _time_size(model, pools, size: int, techniques, backends: dict, timing: Timing, rows: Rows) -> None:
    """Every technique's row at one batch size (recycling's come later: they need every size's call)."""
    items = make_batches(model, pools, size)
    fp32, n = backends["fp32"], len(items)
    refs = [predict(fp32, b, k) for b, k, _ in items]
    for tech in techniques:
        if tech in backends:
            base_ms, ms, diffs = time_backend(model, items, refs, fp32, backends[tech], timing)
            diff = float(diffs.max())
            rows.add(tech, size, "policy call", base_ms / n, ms / n, diff, mean_action_diff=float(diffs.mean()))
        elif tech == "kv-cache":
            timed = time_kv_cache(model, items, timing)
            if timed is not None:
                base_ms, ms, diff = timed
                exact = 0.0 if diff == 0 else None
                rows.add(tech, size, "token decoding", base_ms / n, ms / n, diff, success_delta=exact)
        elif tech in ("encoder-cache", "encoder-cache-call"):
            whole = tech == "encoder-cache-call"
            scope, base_ms, ms, diff = time_encoder_cache(model, items, refs, fp32, whole, timing)
            rows.add(tech, size, scope, base_ms / n, ms / n, diff, success_delta=0.0 if diff == 0 else None)
        elif tech == "lora-merge":
            base_ms, ms, diff = time_lora_merge(model, items, timing)
            rows.add(tech, size, "policy call", base_ms / n, ms / n, diff)


def _recycling(model, names: list[str], pools, sizes: list[int], fp32, timing: Timing, rows: Rows) -> dict:
    """Chunk recycling: ticks served per policy call, and a "per control tick" row per batch size (the
    policy call's baseline spread over those ticks). Returns {embodiment: rates}."""
    ratio = recycling_ratio(model, names)
    rates = {
        n: {"ticks_per_call": r, "control_hz": model.specs[n].control_hz, "policy_hz": model.specs[n].control_hz / r}
        for n, r in ratio.items()
    }
    mean_ratio = float(np.mean(list(ratio.values())))
    for size in sizes:
        call = next((r["baseline_ms"] for r in rows if r["batch"] == size and r["scope"] == "policy call"), None)
        if call is None:
            items = make_batches(model, pools, size)
            fn = over_batches(items, lambda b, k, _: fp32.predict(b, n_samples=k))
            call = timing.paired(fn, fn)[0] / len(items)
        rows.add("recycling", size, "per control tick", call, call / mean_ratio, None, ticks_per_call=mean_ratio)
    return rates


def _closed_loop(backends: dict, names: list[str], episodes: int, recycling: bool, rows: Rows, log) -> dict:
    """Closed-loop success with paired seeds: fp32 against each precision/backend, and (recycling) every-tick
    recompute against the embodiments' recompute_every. Sets the rows' success_delta; returns the rates."""
    log(f"closed-loop evaluation: {episodes} episodes x {len(names)} embodiments per variant ...")
    fp32 = backends["fp32"]
    base = success(lambda: backend_policy(fp32), names, episodes)
    out = {"fp32": base}
    base_mean = float(np.mean(list(base.values())))
    for tech, be in backends.items():
        if tech == "fp32":
            continue
        got = success(lambda be=be: backend_policy(be), names, episodes)
        out[tech] = got
        rows.set_success(tech, float(np.mean(list(got.values()))) - base_mean, base_mean)
    if recycling:
        every1 = success(lambda: backend_policy(fp32), names, episodes, recompute_every=1)
        out["recompute_every_1"] = every1
        rows.set_success("recycling", base_mean - float(np.mean(list(every1.values()))), base_mean)
    return out


def _environment() -> dict:
    """The config's last keys: flow samples per call and what the machine and torch are."""
    return {
        "flow_samples": FLOW_SAMPLES,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
