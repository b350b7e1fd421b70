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
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FLOW_SAMPLES = 4  # flow-head robots ask for this many samples (RobotConfig's default)
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


# ----- model and data ---------------------------------------------------------------------------------------
def load_model(checkpoint=None, random_init: bool = False, log: Callable[[str], None] = print):
    """(model, description). Without a checkpoint: the shipped one, else (with a message) a randomly
    initialised model of the shipped size: speed does not depend on training, accuracy figures then do."""
    from fleet.policy.default import DEFAULT_CHECKPOINT, load_policy
    from fleet.policy.train import build_model

    if not random_init:
        try:
            model, _ = load_policy(checkpoint)
            return model, {"source": str(checkpoint or DEFAULT_CHECKPOINT), "random_init": False}
        except FileNotFoundError as exc:
            if checkpoint is not None:
                raise
            log(
                f"note: {exc}; benchmarking a randomly initialised model of the shipped size instead "
                "(timings hold, action differences and success rates are not those of the trained policy)"
            )
    from fleet.embodiments import EMBODIMENTS

    model = build_model(tuple(EMBODIMENTS)[:4], seed=0).eval()
    return model, {"source": "random-init (default_policy_config)", "random_init": True}


def _observations(names: list[str], per_name: int, seed: int = 0) -> dict[str, list[dict]]:
    """per_name real frames per embodiment from expert episodes (a new episode every 6 steps)."""
    from fleet.sim import make_env

    pools = {}
    for name in names:
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        pool = []
        for k in range(per_name):
            pool.append(obs)
            obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
            if term or trunc or k % 6 == 5:
                obs, _ = env.reset(seed=seed + k + 1)
        env.close()
        pools[name] = pool
    return pools


def _batches(model, pools: dict[str, list[dict]], size: int) -> list[tuple]:
    """[(PolicyBatch, n_samples, robot ids)]: one per embodiment at size 1, else one mixed batch."""
    names = list(pools)

    def make(rows: list[tuple[str, int]]):
        obs = [pools[n][j % len(pools[n])] for n, j in rows]
        embs = [n for n, _ in rows]
        k = FLOW_SAMPLES if any(model.specs[n].head == "flow" for n in embs) else 1
        return model.collate(obs, embs), k, [f"robot-{n}-{j}" for n, j in rows]

    if size == 1:
        return [make([(n, 0)]) for n in names]
    return [make([(names[i % len(names)], i // len(names)) for i in range(size)])]


# ----- timing -----------------------------------------------------------------------------------------------
def _paired(base: Callable[[], object], tech: Callable[[], object], repeats: int, min_s: float) -> tuple[float, float]:
    """Median ms per call of `base` and `tech`, timed in alternating rounds (order flipped every round)."""
    base(), tech()  # warm-up
    per_round = {}
    for fn in (base, tech):
        t0 = time.perf_counter()
        fn()
        per_round[fn] = max(1, min(50, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    samples: dict = {base: [], tech: []}
    for r in range(repeats):
        for fn in (base, tech) if r % 2 == 0 else (tech, base):
            n = per_round[fn]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[fn].append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(samples[base]), statistics.median(samples[tech])


def _over_batches(items: list, fn: Callable) -> Callable[[], None]:
    def run() -> None:
        for item in items:
            fn(*item)

    return run


# ----- quality ----------------------------------------------------------------------------------------------
def action_diffs(model, rows: list[dict], ref: list[dict]) -> np.ndarray:
    """|chunk - reference chunk| of every row, step and dimension, as a share of the dimension's action range."""
    out = []
    for a, b in zip(rows, ref, strict=True):
        spec = model.specs[b["embodiment"]]
        span = np.asarray(spec.action_high, np.float64) - np.asarray(spec.action_low, np.float64)
        out.append((np.abs(np.asarray(a["chunk"], np.float64) - b["chunk"]) / span).ravel())
    return np.concatenate(out)


def action_diff(model, rows: list[dict], ref: list[dict]) -> float:
    """Largest |chunk - reference chunk| as a share of each dimension's action range."""
    return float(action_diffs(model, rows, ref).max())


def _predict(backend, batch, k: int, seed: int = 0, **kwargs) -> list[dict]:
    return backend.predict(batch, n_samples=k, generator=torch.Generator().manual_seed(seed), **kwargs)


def backend_policy(backend, seed: int = 0):
    """A ChunkPolicy (observations, names) -> chunks over a backend; flow rows draw FLOW_SAMPLES from one
    seeded generator, so two backends see the same noise while their rollouts agree."""
    gen = torch.Generator().manual_seed(seed)
    model = backend.model

    def act(observations: list[dict], names: list[str]) -> list[np.ndarray]:
        k = FLOW_SAMPLES if any(model.specs[n].head == "flow" for n in names) else 1
        return [r["chunk"] for r in backend.predict(model.collate(observations, names), n_samples=k, generator=gen)]

    return act


def success(policy_for: Callable[[], Callable], names: list[str], episodes: int, recompute_every=None) -> dict:
    """{embodiment: success rate} over `episodes` unseen episodes each (a fresh policy per embodiment)."""
    from fleet.policy.evaluate import evaluate

    return {n: evaluate(policy_for(), n, episodes, recompute_every=recompute_every).success_rate for n in names}


def recycling_ratio(model, names: list[str], ticks: int = 64, seed: int = 0) -> dict[str, float]:
    """Per embodiment: control ticks served per policy call (effective control rate / policy call rate),
    counted by the control layer's ActionBuffer over a closed loop of the fp32 policy."""
    from fleet.control import ActionBuffer
    from fleet.embodiments import get_embodiment
    from fleet.policy.inference.backend import TorchBackend
    from fleet.sim import make_env

    act = backend_policy(TorchBackend(model), seed)
    out = {}
    for name in names:
        spec = get_embodiment(name)
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        buf = ActionBuffer(chunk_size=spec.chunk_size, recompute_every=spec.recompute_every)
        for tick in range(ticks):
            if buf.needs_refill(tick):
                buf.push(act([obs], [name])[0], tick)
            action = buf.pop(tick)
            obs, _, term, trunc, _ = env.step(np.clip(action, spec.action_low, spec.action_high))
            if term or trunc:
                obs, _ = env.reset(seed=seed + tick + 1)
        env.close()
        stats = buf.stats()
        out[name] = stats["actions_popped"] / max(1, stats["chunks_pushed"])
    return out


def static_frame_share(names: list[str], episodes: int = 2, seed: int = 0) -> dict[str, float]:
    """Per embodiment: share of policy calls (every recompute_every ticks of an expert episode) whose frame
    equals the previous call's: the encoder cache's hit rate for a moving robot."""
    from fleet.embodiments import get_embodiment
    from fleet.sim import make_env

    out = {}
    for name in names:
        every = get_embodiment(name).recompute_every
        same = calls = 0
        env = make_env(name)
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            prev, t, done = None, 0, False
            while not done:
                if t % every == 0:
                    same += prev is not None and np.array_equal(prev, obs["image"])
                    calls += prev is not None
                    prev = obs["image"]
                obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
                t, done = t + 1, term or trunc
        env.close()
        out[name] = same / calls if calls else 0.0
    return out


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
    from fleet.policy.inference.backend import TorchBackend
    from fleet.policy.inference.encoder_cache import EncoderCache
    from fleet.policy.inference.onnx_backend import OnnxBackend

    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"techniques: unknown {unknown}; known {TECHNIQUES}")
    sizes = sorted({int(b) for b in batches})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batches: expected positive ints, got {batches!r}")
    torch.set_num_threads(int(threads))
    model, source = load_model(checkpoint, random_init, log)
    names = list(embodiments or model.specs)
    missing = [n for n in names if n not in model.specs]
    if missing:
        raise ValueError(f"embodiments: {missing} not in the model; it has {sorted(model.specs)}")
    pools = _observations(names, max(1, -(-max(sizes) // len(names))))
    fp32 = TorchBackend(model, "fp32")
    backends = {"fp32": fp32}
    for tech in techniques:
        if tech in ("bf16", "int8"):
            backends[tech] = TorchBackend(model, tech)
        elif tech.startswith("onnx-"):
            log(f"exporting the policy to ONNX ({tech[5:]}) ...")
            backends[tech] = OnnxBackend(model, tech[5:], threads=threads, heads=names)
    rows: list[dict] = []

    def add(tech: str, size: int, scope: str, base_ms: float, ms: float, diff: float | None, **extra) -> None:
        rows.append(
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
        log(f"{LABELS[tech]:34s} batch {size:3d}: {base_ms:8.2f} -> {ms:8.2f} ms ({base_ms / ms:5.2f}x)")

    for size in sizes:
        items = _batches(model, pools, size)
        refs = [_predict(fp32, b, k) for b, k, _ in items]
        base_call = _over_batches(items, lambda b, k, _: fp32.predict(b, n_samples=k))
        for tech in techniques:
            if tech in backends:
                be = backends[tech]
                diffs = np.concatenate(
                    [action_diffs(model, _predict(be, b, k), ref) for (b, k, _), ref in zip(items, refs, strict=True)]
                )
                base_ms, ms = _paired(
                    base_call,
                    _over_batches(items, lambda b, k, _, be=be: be.predict(b, n_samples=k)),
                    repeats,
                    min_round_s,
                )
                n = len(items)
                add(
                    tech,
                    size,
                    "policy call",
                    base_ms / n,
                    ms / n,
                    float(diffs.max()),
                    mean_action_diff=float(diffs.mean()),
                )
            elif tech == "kv-cache":
                decodes = []
                for b, _, _ in items:
                    with torch.inference_mode():
                        memory, pad_mask, _ = model.encode(b)
                    for name, idx in b.groups().items():
                        if model.specs[name].head == "token":
                            decodes.append((model.head(name), memory[idx].detach(), pad_mask[idx]))
                if not decodes:
                    continue
                with torch.inference_mode():
                    diff = 0.0
                    for head, mem, pm in decodes:
                        a = head.decode(mem, pm, use_cache=True).actions
                        u = head.decode(mem, pm, use_cache=False).actions
                        diff = max(diff, float((a - u).abs().max()) / 2.0)  # normalized range is 2 wide
                    base_ms, ms = _paired(
                        _over_batches(decodes, lambda h, m, p: h.decode(m, p, use_cache=False)),
                        _over_batches(decodes, lambda h, m, p: h.decode(m, p, use_cache=True)),
                        repeats,
                        min_round_s,
                    )
                n = len(items)
                add(tech, size, "token decoding", base_ms / n, ms / n, diff, success_delta=0.0 if diff == 0 else None)
            elif tech in ("encoder-cache", "encoder-cache-call"):
                cache = EncoderCache()
                for b, _, robots in items:  # prime: the scene is static from here on
                    cache.tokens(robots, b.image.numpy(), b.instr_ids.numpy(), fp32.image_tokens)

                def cached_tokens(b, robots, cache=cache):
                    return cache.tokens(robots, b.image.numpy(), b.instr_ids.numpy(), fp32.image_tokens)

                diff = max(
                    action_diff(model, _predict(fp32, b, k, image_tokens=cached_tokens(b, r)), ref)
                    for (b, k, r), ref in zip(items, refs, strict=True)
                )
                if tech == "encoder-cache":
                    base_ms, ms = _paired(
                        _over_batches(items, lambda b, k, r: fp32.image_tokens(b.image.numpy(), b.instr_ids.numpy())),
                        _over_batches(items, lambda b, k, r: cached_tokens(b, r)),
                        repeats,
                        min_round_s,
                    )
                    scope = "image tokens"
                else:
                    base_ms, ms = _paired(
                        base_call,
                        _over_batches(
                            items, lambda b, k, r: fp32.predict(b, n_samples=k, image_tokens=cached_tokens(b, r))
                        ),
                        repeats,
                        min_round_s,
                    )
                    scope = "policy call"
                n = len(items)
                add(tech, size, scope, base_ms / n, ms / n, diff, success_delta=0.0 if diff == 0 else None)
            elif tech == "lora-merge":
                base_ms, ms, diff = _lora_rows(model, items, repeats, min_round_s)
                add(tech, size, "policy call", base_ms, ms, diff)

    extra: dict = {}
    if "recycling" in techniques:
        ratio = recycling_ratio(model, names)
        extra["recycling"] = {
            n: {
                "ticks_per_call": r,
                "control_hz": model.specs[n].control_hz,
                "policy_hz": model.specs[n].control_hz / r,
            }
            for n, r in ratio.items()
        }
        mean_ratio = float(np.mean(list(ratio.values())))
        for size in sizes:
            call = next((r["baseline_ms"] for r in rows if r["batch"] == size and r["scope"] == "policy call"), None)
            if call is None:
                items = _batches(model, pools, size)
                fn = _over_batches(items, lambda b, k, _: fp32.predict(b, n_samples=k))
                call = _paired(fn, fn, repeats, min_round_s)[0] / len(items)
            add("recycling", size, "per control tick", call, call / mean_ratio, None, ticks_per_call=mean_ratio)
    if "encoder-cache" in techniques or "encoder-cache-call" in techniques:
        extra["static_frame_share"] = static_frame_share(names)

    # closed-loop success, paired seeds: fp32 against each precision/backend, and recycling against every tick
    if episodes > 0:
        log(f"closed-loop evaluation: {episodes} episodes x {len(names)} embodiments per variant ...")
        base = success(lambda: backend_policy(fp32), names, episodes)
        extra["success"] = {"fp32": base}
        base_mean = float(np.mean(list(base.values())))
        for tech, be in backends.items():
            if tech == "fp32":
                continue
            got = success(lambda be=be: backend_policy(be), names, episodes)
            extra["success"][tech] = got
            _set_success(rows, tech, float(np.mean(list(got.values()))) - base_mean, base_mean)
        if "recycling" in techniques:
            every1 = success(lambda: backend_policy(fp32), names, episodes, recompute_every=1)
            extra["success"]["recompute_every_1"] = every1
            _set_success(rows, "recycling", base_mean - float(np.mean(list(every1.values()))), base_mean)
    for tech in backends:
        if tech != "fp32":
            backends[tech].close()
    return {
        "rows": rows,
        "model": source,
        "config": {
            "batches": sizes,
            "episodes": episodes,
            "embodiments": names,
            "repeats": repeats,
            "threads": threads,
            "flow_samples": FLOW_SAMPLES,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        **extra,
    }


def _set_success(rows: list[dict], tech: str, delta: float, base: float) -> None:
    for row in rows:
        if row["key"] == tech:
            row["success_delta"], row["baseline_success"] = delta, base


def _lora_rows(model, items, repeats: int, min_round_s: float) -> tuple[float, float, float]:
    """A copy of the model with rank-8 adapters (random, as if trained) on every head: unmerged vs merged."""
    import copy

    from fleet.policy.inference.backend import TorchBackend
    from fleet.policy.inference.lora import add_lora, merge_lora

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
    diff = max(action_diff(model, _predict(m, b, k), _predict(a, b, k)) for b, k, _ in items)
    base_ms, ms = _paired(
        _over_batches(items, lambda b, k, _: a.predict(b, n_samples=k)),
        _over_batches(items, lambda b, k, _: m.predict(b, n_samples=k)),
        repeats,
        min_round_s,
    )
    return base_ms / len(items), ms / len(items), diff


# ----- output -----------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    cols = [
        ("technique", "technique", "{}"),
        ("batch", "batch", "{:d}"),
        ("timed", "scope", "{}"),
        ("baseline ms", "baseline_ms", "{:.2f}"),
        ("ms", "ms", "{:.2f}"),
        ("speedup", "speedup", "{:.2f}x"),
        ("max dA % range", "max_action_diff", "{:.2%}"),
        ("mean dA", "mean_action_diff", "{:.3%}"),
        ("d success", "success_delta", "{:+.2f}"),
        ("notes claim", "notes_claim", "{}"),
    ]
    table = [[title for title, _, _ in cols]]
    for r in result["rows"]:
        table.append(["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in cols])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 2, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    src = result["model"]["source"]
    lines.append(f"model: {src}; threads {result['config']['threads']}, {result['config']['cpus']} CPUs")
    if "recycling" in result:
        rc = ", ".join(
            f"{n} {v['control_hz']:.0f} Hz control / {v['policy_hz']:.1f} Hz policy"
            for n, v in result["recycling"].items()
        )
        lines.append(f"chunk recycling: {rc}")
    if "static_frame_share" in result:
        sf = ", ".join(f"{n} {v:.0%}" for n, v in result["static_frame_share"].items())
        lines.append(f"encoder-cache hit rate of a moving robot (frame unchanged since its last call): {sf}")
    return "\n".join(lines)


def write_plot(result: dict, out_dir: str | os.PathLike, name: str = "infer_accuracy_vs_speed.png") -> Path:
    """Accuracy vs speed for fp32 / bf16 / int8 (torch) and ONNX Runtime fp32 / int8, at each batch size:
    max action difference and closed-loop success against the speedup over eager fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("bf16", "int8", "onnx-fp32", "onnx-int8")]
    rows = [r for r in result["rows"] if r["key"] in keys]
    sizes = sorted({r["batch"] for r in rows})
    succ = result.get("success", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = dict(zip(sizes, "os^Dvp*" * 4, strict=False))
    colors = {"fp32": "k", "bf16": "tab:orange", "int8": "tab:blue", "onnx-fp32": "tab:green", "onnx-int8": "tab:red"}
    for size in sizes:
        ax1.scatter([1.0], [0.0], c="k", marker=markers[size], label=f"fp32 eager, batch {size}")
        for r in (r for r in rows if r["batch"] == size):
            ax1.scatter(
                r["speedup"],
                100 * r["max_action_diff"],
                c=colors[r["key"]],
                marker=markers[size],
                label=f"{r['key']}, batch {size}",
            )
    ax1.set(xlabel="speedup over eager fp32", ylabel="max action difference (% of range)", title="accuracy vs speed")
    ax1.axvline(1.0, color="0.8", lw=0.8)
    ax1.legend(fontsize=7)
    if succ:
        base = float(np.mean(list(succ["fp32"].values())))
        ax2.scatter([1.0], [100 * base], c="k", label="fp32 eager")
        for key in keys:
            if key in succ:
                sp = [r["speedup"] for r in rows if r["key"] == key and r["batch"] == sizes[0]]
                ax2.scatter(sp, [100 * float(np.mean(list(succ[key].values())))] * len(sp), c=colors[key], label=key)
        ax2.set(
            xlabel=f"speedup at batch {sizes[0]}",
            ylabel="closed-loop success (%)",
            title=f"success over {result['config']['episodes']} episodes x {len(succ['fp32'])} embodiments",
        )
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no closed-loop evaluation (--episodes 0)", ha="center", va="center")
        ax2.set_axis_off()
    if result["model"].get("random_init"):
        fig.suptitle("random-init model: timings hold, accuracy figures are not the trained policy's", fontsize=9)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
