"""`fleet bench infer`'s output: the table it prints and the accuracy-vs-speed plot it writes (--out)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def format_table(result: dict) -> str:
    """The rows as an aligned text table, with the model, recycling rates and encoder-cache hit rates below."""
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
    import matplotlib  # lazily: matplotlib only when a plot is written (--out)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

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
