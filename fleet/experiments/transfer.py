"""Multi-embodiment transfer (the course notes' exercise): does training one backbone on two robots help?

    fleet experiment transfer --steps 1500 --episodes 50 --out runs/transfer

Trains three policies from scratch with the same recipe and the same number of optimizer steps:
hello (3-DOF base) and franka (7-DOF arm) together, with embodiment tokens selecting their heads;
hello alone; franka alone. Each is evaluated closed loop on unseen episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PAIR = ("hello", "franka")


def run_transfer_experiment(
    steps: int = 1500,
    episodes: int = 50,
    demo_episodes: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    out: Path | None = None,
    log=print,
    threads: int = 2,
) -> dict:
    """Returns {"steps", "joint": {"hello": s, "franka": s}, "alone": {"hello": s, "franka": s}, ...}."""
    # torch: only when the experiment runs, so `fleet --help` does not load it
    from fleet.policy.evaluate import evaluate
    from fleet.policy.train import PretrainConfig, chunk_policy, pretrain

    def train_and_eval(embodiments: tuple[str, ...]) -> dict[str, float]:
        cfg = PretrainConfig(
            embodiments=embodiments,
            steps=steps,
            batch_size=batch_size,
            demo_episodes=demo_episodes,
            dagger_rounds=1,
            dagger_episodes=max(1, demo_episodes // 4),
            seed=seed,
            threads=threads,
        )
        model, _, _ = pretrain(cfg, progress=False, log=log)
        rates = {}
        for name in embodiments:
            rates[name] = evaluate(chunk_policy(model), name, episodes, seed=seed + 1).success_rate
            log(f"{'+'.join(embodiments)} -> {name}: success {rates[name]:.0%}")
        return rates

    joint = train_and_eval(PAIR)
    alone = {}
    for name in PAIR:
        alone.update(train_and_eval((name,)))
    result = {
        "steps": steps,
        "episodes": episodes,
        "demo_episodes": demo_episodes,
        "batch_size": batch_size,
        "joint": joint,
        "alone": alone,
        "delta": {n: joint[n] - alone[n] for n in PAIR},
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "transfer.json").write_text(json.dumps(result, indent=1))
        _plot(result, out / "transfer.png")
    return result


def format_table(result: dict) -> str:
    lines = [
        f"multi-embodiment transfer, {result['steps']} steps each, {result['episodes']} eval episodes",
        "embodiment  joint (hello+franka)  alone   delta",
    ]
    for n in PAIR:
        lines.append(f"{n:<10}  {result['joint'][n]:>19.0%}  {result['alone'][n]:>5.0%}  {result['delta'][n]:>+6.0%}")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib  # matplotlib only when a plot is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(PAIR))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    joint = [result["joint"][n] for n in PAIR]
    alone = [result["alone"][n] for n in PAIR]
    ax.bar(x - 0.18, joint, 0.36, label="joint backbone (hello + franka)")
    ax.bar(x + 0.18, alone, 0.36, label="trained alone")
    for xi, (j, a) in enumerate(zip(joint, alone, strict=True)):
        ax.text(xi - 0.18, j + 0.01, f"{j:.0%}", ha="center", fontsize=8)
        ax.text(xi + 0.18, a + 0.01, f"{a:.0%}", ha="center", fontsize=8)
    ax.set_xticks(x, PAIR)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("closed-loop success")
    ax.set_title(f"Transfer at equal steps ({result['steps']})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
