"""`fleet experiment latency`: execution modes under inference delay, in sim mode with deterministic latency.

    fleet experiment latency --embodiments aloha,leap --delays 0,2,3 --replan 2,4 --episodes 200 --out runs/latency

Every robot runs the real robot-side stack of a control loop: an `ActionBuffer` in the mode under test (latest,
weighted, temporal_ensemble, rtc), the `SafetyLayer` on every command, and requests with the buffer's refill rule.
A request observed at tick t is answered at tick t + delay exactly (the policy runs at once; its reply is held
back until then), so the cells are reproducible and depend on nothing but the seeds. Robots of one cell run in
lock step and their requests of a tick go to the policy as one batch, as the fleet's server batches them.

Measured per (embodiment, mode, delay, replan): success on unseen scenes (seed block `--seed`, never used
for tuning); the mean seam jump (at each push that overlaps the plan, |action planned for the seam tick after
the push - before it|, averaged over dimensions as a share of the action range: what the robot feels at the
switch); the mean jerk (|a_t - 2 a_{t-1} + a_{t-2}| of the commands actually sent, share of range, per moving
tick). And the server cost of RTC: the flow head's time per call with prefixes over without, at batch 1 and 64.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleet.control import ALIGNS, ActionBuffer, SafetyLayer
from fleet.durable import write_text_atomic
from fleet.embodiments import get_embodiment
from fleet.policy.evaluate import EVAL_SEED_BASE
from fleet.sim import make_env

MODES = ("latest", "weighted", "temporal_ensemble", "rtc")
EXPERT = "expert"  # run_cell's model: the sim's privileged expert plans every chunk (its rtc continues the prefix)
FLOW_SAMPLES = 4  # what a robot asks a flow head for (RobotConfig.n_samples)


@dataclass
class _Robot:
    env: object
    obs: dict
    buf: ActionBuffer
    safety: SafetyLayer
    tick: int = 0
    force: float = 0.0  # the contact force the last step measured (the e-stop reads it)
    pending: tuple[int, np.ndarray, int] | None = None  # (arrival tick, chunk, obs_tick)
    sent: list[np.ndarray] = field(default_factory=list)


def run_cell(
    model,
    name: str,
    mode: str,
    delay: int,
    replan: int,
    episodes: int,
    seed: int,
    n_envs: int = 50,
    generator_seed: int = 0,
    buffer_options: dict | None = None,
    align: str = "time",
) -> dict:
    """One cell: `episodes` unseen episodes of embodiment `name` -> {"success", "seam_jump", "jerk", ...}.
    align: where a late chunk starts (BufferConfig.align: "time" or "arrival"). model: a policy, or EXPERT for
    the simulator's expert look-ahead (the labels the policy learned; in rtc mode it plans from where the
    committed prefix leads, a perfect continuation)."""
    import torch  # the policy's: only this function and rtc_cost run it

    from fleet.policy.batch import set_row_options

    spec = get_embodiment(name)
    span = np.asarray(spec.action_high, np.float64) - np.asarray(spec.action_low, np.float64)
    k = FLOW_SAMPLES if spec.head == "flow" else 1
    gen = torch.Generator().manual_seed(generator_seed)
    successes, jumps, jerks = [], [], []
    calls = 0
    next_ep, robots = 0, []
    while next_ep < episodes or robots:
        while len(robots) < n_envs and next_ep < episodes:
            env = make_env(name)
            obs, _ = env.reset(seed=EVAL_SEED_BASE + seed * 100_003 + next_ep)
            buf = ActionBuffer(spec.chunk_size, replan, mode, align=align, **(buffer_options or {}))
            robots.append(_Robot(env, obs, buf, SafetyLayer(spec)))
            next_ep += 1
        for r in robots:  # replies due now arrive first (the loop's order: receive, then request)
            _deliver(r, span, jumps)
        asking = [r for r in robots if r.pending is None and r.buf.needs_refill(r.tick)]
        if asking:
            prefixes = []
            for r in asking:
                rtc = r.buf.request_prefix(r.tick, lambda plan, r=r: r.safety.preview(plan, r.obs["proprio"]))
                prefixes.append(None if rtc is None else (rtc["prefix"], rtc["prefix_delay"]))
                r.buf.mark_requested(r.tick)
            if model == EXPERT:
                rows = [
                    {"chunk": r.env.unwrapped.expert_chunk(prefix=None if p is None else p[0][: p[1]])}
                    for r, p in zip(asking, prefixes, strict=True)
                ]
            else:
                batch = model.collate([r.obs for r in asking], [name] * len(asking))
                set_row_options(batch, model.specs, prefixes=prefixes)
                rows = model.predict(batch, n_samples=k, generator=gen)
            calls += 1
            for r, row in zip(asking, rows, strict=True):
                r.pending = (r.tick + delay, row["chunk"], r.tick)
        still = []
        for r in robots:
            _deliver(r, span, jumps)  # with no delay, the reply to this tick's request
            action = r.buf.pop(r.tick)
            age = None if r.buf.last_obs_tick is None or action is None else (r.tick - r.buf.last_obs_tick) * spec.dt
            sent, report = r.safety(action, force=r.force, age_s=age, proprio=r.obs["proprio"])
            sent = np.clip(np.asarray(sent, np.float64), spec.action_low, spec.action_high)
            if not report.held:
                r.sent.append(sent)
            r.obs, _, term, trunc, info = r.env.step(sent.astype(np.float32))
            r.force = float(info.get("force", 0.0))
            r.tick += 1
            if term or trunc:
                successes.append(bool(info["is_success"]))
                a = np.asarray(r.sent)
                if len(a) >= 3:
                    jerks.append(float(np.mean(np.abs(a[2:] - 2 * a[1:-1] + a[:-2]) / span)))
            else:
                still.append(r)
        robots = still
    return {
        "embodiment": name,
        "mode": mode,
        "align": align,
        "delay": delay,
        "replan": replan,
        "success": float(np.mean(successes)),
        "seam_jump": float(np.mean(jumps)) if jumps else 0.0,
        "jerk": float(np.mean(jerks)) if jerks else 0.0,
        "episodes": len(successes),
        "policy_calls": calls,
    }


def _deliver(r: _Robot, span: np.ndarray, jumps: list[float]) -> None:
    """Push robot r's reply if it is due, recording the seam jump it causes at the current tick."""
    if r.pending is None or r.pending[0] > r.tick:
        return
    before = r.buf.peek(r.tick)
    r.buf.push(r.pending[1], r.pending[2])
    r.pending = None
    after = r.buf.peek(r.tick)
    if before is not None and after is not None:
        jumps.append(float(np.mean(np.abs(after - before) / span)))


def rtc_cost(model, name: str = "aloha", batches: Sequence[int] = (1, 64), repeats: int = 7) -> dict:
    """{str(batch): {"plain_ms", "rtc_ms", "ratio"}}: the flow head's time per call (K = FLOW_SAMPLES) with a
    prefix on every row over without, medians of interleaved repeats (the load of a shared machine hits both)."""
    import torch

    from fleet.policy.rtc import GroupPrefix

    spec, head = get_embodiment(name), model.head(name)
    env = make_env(name)
    obs, _ = env.reset(seed=EVAL_SEED_BASE)
    out = {}
    for b in batches:
        batch = model.collate([obs] * b, [name] * b)
        with torch.inference_mode():
            memory, pad_mask, _ = model.encode(batch)
        n = spec.chunk_size - 2
        prefix = GroupPrefix(torch.zeros(b, spec.chunk_size, spec.action_dim), torch.full((b,), n), torch.full((b,), 2))
        times: dict[str, list[float]] = {"plain": [], "rtc": []}
        for i in range(repeats + 1):
            for kind in ("plain", "rtc"):
                opts = {"prefix": prefix} if kind == "rtc" else {}
                gen = torch.Generator().manual_seed(i)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    head.predict(memory, pad_mask, FLOW_SAMPLES, 0.0, gen, **opts)
                if i:  # the first round warms up
                    times[kind].append((time.perf_counter() - t0) * 1e3)
        plain, rtc = float(np.median(times["plain"])), float(np.median(times["rtc"]))
        out[str(b)] = {"plain_ms": plain, "rtc_ms": rtc, "ratio": rtc / plain}
    return out


def run_latency_experiment(
    embodiments: Sequence[str] = ("aloha", "leap"),
    delays: Sequence[int] = (0, 1, 2, 3, 4),
    replans: Sequence[int] = (1, 2, 4),
    modes: Sequence[str] = MODES,
    aligns: Sequence[str] = ("time",),
    episodes: int = 200,
    token_episodes: int | None = None,
    seed: int = 11,
    checkpoint: str | Path | None = None,
    threads: int = 1,
    cost: bool = True,
    out: Path | None = None,
    log: Callable[[str], None] | None = None,
    policy: str = "checkpoint",
) -> dict:
    """The grid: every (embodiment, mode, align, delay, replan) cell, and the RTC cost ratio. token_episodes:
    episodes per cell for token-head bodies (default `episodes`). aligns: where late chunks start (ALIGNS); rtc
    runs time-aligned only (its prefix is the plan for the ticks a late reply skips). policy: "checkpoint" (the
    policy at `checkpoint`) or "expert" (the simulator's expert plans every chunk: a ceiling for each mode)."""
    import torch

    from fleet.policy.default import load_policy

    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; expected some of {MODES}")
    for a in aligns:
        if a not in ALIGNS:
            raise ValueError(f"--align: unknown alignment {a!r}; expected some of {ALIGNS}")
    if policy not in ("checkpoint", EXPERT):
        raise ValueError(f"--policy: expected checkpoint or expert, got {policy!r}")
    torch.set_num_threads(threads)
    model = EXPERT if policy == EXPERT else load_policy(checkpoint)[0]
    rows = []
    started = time.perf_counter()
    for name in embodiments:
        spec = get_embodiment(name)
        n = episodes if spec.head == "flow" or token_episodes is None else token_episodes
        for replan in replans:
            if not 1 <= replan <= spec.chunk_size:
                raise ValueError(f"--replan: {replan} is outside [1, chunk_size={spec.chunk_size}] for {name}")
            for delay in delays:
                if not 0 <= delay < spec.chunk_size:
                    raise ValueError(f"--delays: {delay} is outside [0, chunk_size) for {name}")
                for align, mode in [(a, m) for a in aligns for m in modes if not (a == "arrival" and m == "rtc")]:
                    t0 = time.perf_counter()
                    row = run_cell(model, name, mode, delay, replan, n, seed, align=align)
                    rows.append(row)
                    if log is not None:
                        log(
                            f"{name:6s} {_label(row):25s} delay {delay} replan {replan}: {row['success']:.3f} "
                            f"jump {row['seam_jump']:.4f} jerk {row['jerk']:.4f} ({time.perf_counter() - t0:.0f} s)"
                        )
    result = {
        "rows": rows,
        "rtc_cost_ratio": {},
        "rtc_cost_ms": {},
        "seed": seed,
        "policy": policy,
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cost and model != EXPERT:
        flow = [n for n in embodiments if get_embodiment(n).head == "flow"] or ["aloha"]
        costs = rtc_cost(model, flow[0])
        result["rtc_cost_ratio"] = {b: c["ratio"] for b, c in costs.items()}
        result["rtc_cost_ms"] = costs | {"embodiment": flow[0]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "latency.json", json.dumps(result, indent=1))
        write_text_atomic(out / "latency.txt", format_table(result) + "\n")
        write_plots(result, out)
    return result


def _label(row: dict) -> str:
    """The mode as tables and plots name it: `latest`, or `latest@arrival` when the chunk starts on arrival."""
    align = row.get("align", "time")
    return row["mode"] if align == "time" else f"{row['mode']}@{align}"


def format_table(result: dict) -> str:
    """Rows of the grid (fits 80 columns), then the cost of RTC."""
    lines = [
        f"{'body':6s} {'replan':>6s} {'delay':>5s} {'mode':25s} {'success':>7s} {'seam':>6s} {'jerk':>6s} {'eps':>5s}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['embodiment']:6s} {r['replan']:6d} {r['delay']:5d} {_label(r):25s} {100 * r['success']:6.1f}% "
            f"{r['seam_jump']:6.3f} {r['jerk']:6.3f} {r['episodes']:5d}"
        )
    cost = result.get("rtc_cost_ms") or {}
    for b, c in cost.items():
        if isinstance(c, dict):
            lines.append(
                f"rtc cost ({cost['embodiment']} flow head, batch {b}): {c['rtc_ms']:.1f} ms vs plain "
                f"{c['plain_ms']:.1f} ms = {c['ratio']:.2f}x"
            )
    lines.append("seam (the jump at a chunk switch) and jerk: mean share of the action range")
    lines.append("mode@arrival: a late chunk starts with its first action (BufferConfig.align)")
    return "\n".join(lines)


def write_plots(result: dict, out: Path) -> list[Path]:
    """latency_success.png (success vs delay per mode, one panel per body and replan interval) and
    latency_seam.png (mean seam jump per mode)."""
    import matplotlib  # only when plots are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["embodiment"], r["replan"]) for r in rows})
    modes = sorted({_label(r) for r in rows}, key=lambda m: (MODES.index(m.split("@")[0]), m))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False, sharey=True)
    for ax, (name, replan) in zip(axes[0], panels, strict=True):
        for m in modes:
            cell = sorted(
                (r["delay"], r["success"])
                for r in rows
                if (r["embodiment"], r["replan"], _label(r)) == (name, replan, m)
            )
            # one colour per mode; dashed when late chunks start on arrival
            base, arrival = m.split("@")[0], "@" in m
            style = {"color": f"C{MODES.index(base)}", "linestyle": "--" if arrival else "-"}
            ax.plot([c[0] for c in cell], [100 * c[1] for c in cell], marker="o", label=m, **style)
        ax.set_title(f"{name}, replan every {replan}", fontsize=9)
        ax.set_xlabel("inference delay (ticks)")
    axes[0][0].set_ylabel("success (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    success_png = out / "latency_success.png"
    fig.savefig(success_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    names = sorted({r["embodiment"] for r in rows})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.0))
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        vals = [
            np.mean([r["seam_jump"] for r in rows if r["embodiment"] == n and _label(r) == m] or [0]) for n in names
        ]
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(names)) + width * (len(modes) - 1) / 2, names)
    ax.set_ylabel("mean seam jump (share of range)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    seam_png = out / "latency_seam.png"
    fig.savefig(seam_png, dpi=110)
    plt.close(fig)
    return [success_png, seam_png]
