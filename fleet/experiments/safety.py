"""Safety-layer stress test (the course notes' exercise): how often, and by how much, each constraint fires.

    fleet experiment safety --n 1000 --seed 0 --out runs/safety

Each embodiment's SafetyLayer gets n random requests in sequence, one per tick: uniform over 1.5x the action
range, ~5% with NaN/Inf, ~5% huge, and force readings above max_force at ~2% (each e-stop is reset at once,
so the following requests are measured too).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

from fleet.control.safety import SafetyLayer
from fleet.durable import write_bytes_atomic, write_text_atomic
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.validate import check_int

CONSTRAINTS = ("workspace", "velocity", "force_estop", "non_finite")
NON_FINITE_RATE = 0.05  # share of requests with a NaN or Inf in some dimensions
HUGE_RATE = 0.05  # share of requests 100x to 1e6x outside the range (a diverged policy)
FORCE_TRIP_RATE = 0.02  # share of ticks whose force reading exceeds max_force


def _requests(spec: EmbodimentSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random requests (n, D) float64 and force norms (n,) for one embodiment."""
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    center, half = (low + high) / 2, (high - low) / 2
    actions = center + rng.uniform(-1.5, 1.5, (n, spec.action_dim)) * half
    kind = rng.random(n)
    for i in np.flatnonzero(kind < NON_FINITE_RATE):
        dims = rng.random(spec.action_dim) < 0.3
        dims[rng.integers(spec.action_dim)] = True  # at least one bad dimension
        actions[i, dims] = rng.choice([np.nan, np.inf, -np.inf], size=int(dims.sum()))
    for i in np.flatnonzero((kind >= NON_FINITE_RATE) & (kind < NON_FINITE_RATE + HUGE_RATE)):
        actions[i] = center + rng.choice([-1.0, 1.0], spec.action_dim) * half * 10 ** rng.uniform(2, 6)
    forces = rng.uniform(0.0, 0.8, n) * spec.max_force
    trips = rng.random(n) < FORCE_TRIP_RATE
    forces[trips] = rng.uniform(1.05, 3.0, int(trips.sum())) * spec.max_force
    return actions, forces


def _run_one(spec: EmbodimentSpec, n: int, seed: int) -> tuple[dict, dict[str, list[float]]]:
    """Shares for one embodiment, and the clipping amounts (per constraint) behind the plot."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])  # stable whatever the registry order
    actions, forces = _requests(spec, n, rng)
    layer = SafetyLayer(spec)
    counts = dict.fromkeys(CONSTRAINTS, 0)
    modified = 0
    amounts: dict[str, list[float]] = {"workspace": [], "velocity": []}
    for action, force in zip(actions, forces, strict=True):
        _, report = layer(action, force=float(force))
        modified += int(report.modified)
        counts["force_estop"] += int(report.estop)
        counts["non_finite"] += int(report.non_finite)
        for name in ("workspace", "velocity"):
            amount = getattr(report, name)
            if amount > 0:
                counts[name] += 1
                amounts[name].append(amount)
        if layer.estopped:
            layer.reset_estop()
    shares = {name: counts[name] / n for name in CONSTRAINTS}
    return {"modified_share": modified / n, "by_constraint": shares}, amounts


def run_safety_experiment(n: int = 1000, seed: int = 0, out: Path | None = None) -> dict:
    """Push n random requests through each registered embodiment's SafetyLayer.

    Returns {"n": n, "embodiments": {name: {"modified_share": float, "by_constraint": {"workspace": share,
    "velocity": share, "force_estop": share, "non_finite": share}}}}, shares of the n requests in [0, 1].
    With `out`, also writes out/safety_clipping.png and out/safety_table.md.
    """
    check_int("n", n, lo=1, expected="a positive int")
    check_int("seed", seed, lo=0, expected="a non-negative int")
    result: dict = {"n": n, "embodiments": {}}
    amounts: dict[str, dict[str, list[float]]] = {}
    for name, spec in EMBODIMENTS.items():
        result["embodiments"][name], amounts[name] = _run_one(spec, n, seed)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _plot(result, amounts, out / "safety_clipping.png")
        write_text_atomic(out / "safety_table.md", format_table(result, markdown=True) + "\n")
    return result


def format_table(result: dict, markdown: bool = False) -> str:
    """The result as a table: one row per embodiment, percentages of requests (plain text or markdown)."""
    header = ["embodiment", "modified", *CONSTRAINTS]
    rows = []
    for name, r in result["embodiments"].items():
        shares = [r["modified_share"], *(r["by_constraint"][c] for c in CONSTRAINTS)]
        rows.append([name, *(f"{100 * s:.1f}%" for s in shares)])
    if markdown:
        lines = [f"Safety layer on {result['n']} random requests per embodiment (share of requests).", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [f"safety layer, n={result['n']} requests per embodiment", fmt.format(*header)]
    lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + [fmt.format(*row) for row in rows])


def _plot(result: dict, amounts: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Per embodiment: histograms of how much the workspace clip and the velocity limit changed each request."""
    import matplotlib  # lazily: matplotlib only when the experiment writes its plot (--out)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    names = list(result["embodiments"])
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False, sharex=True)
    bins = np.linspace(-6, 7, 40)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = result["embodiments"][name]
        for constraint, color in (("workspace", "tab:orange"), ("velocity", "tab:blue")):
            values = np.log10(np.clip(amounts[name][constraint], 1e-6, 1e7))
            share = r["by_constraint"][constraint]
            ax.hist(values, bins=bins, alpha=0.6, color=color, label=f"{constraint} ({100 * share:.0f}%)")
        bc = r["by_constraint"]
        ax.set_title(
            f"{name}: {100 * r['modified_share']:.1f}% modified\n"
            f"e-stop {100 * bc['force_estop']:.1f}%, non-finite {100 * bc['non_finite']:.1f}%",
            fontsize=10,
        )
        ax.set_xlabel("log10 change made by the constraint (max over dims, action units)", fontsize=9)
        ax.set_ylabel("requests")
        ax.legend(fontsize=8)
    fig.suptitle(f"Safety layer clipping, {result['n']} random requests per embodiment", fontsize=11)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
