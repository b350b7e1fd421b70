"""`fleet render`: a strip of frames from one expert episode per embodiment, as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def expert_frames(name: str, seed: int = 0, shift=None, n_frames: int = 5) -> tuple[list[np.ndarray], str, bool]:
    """Frames (64, 64, 3) spread over one expert episode, its instruction, and whether it succeeded."""
    from fleet.sim import make_env

    env = make_env(name, seed=seed, shift=shift)
    obs, info = env.reset(seed=seed)
    frames, done = [obs["image"]], False
    while not done:
        obs, _, term, trunc, info = env.step(env.unwrapped.expert_action())
        frames.append(obs["image"])
        done = term or trunc
    idx = np.linspace(0, len(frames) - 1, n_frames).round().astype(int)
    return [frames[i] for i in idx], obs["instruction"], bool(info["is_success"])


def render_gallery(out_dir: Path, names: list[str] | None = None, seed: int = 0, shift=None) -> list[Path]:
    """Write `<out_dir>/<embodiment>.png` per embodiment (plus `all.png`) and return the paths."""
    import matplotlib  # matplotlib only when pictures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fleet.sim import env_names  # fleet.sim imports this module's package: at call time, no circle

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = names or env_names()
    paths, strips = [], []
    for name in names:
        frames, instruction, ok = expert_frames(name, seed=seed, shift=shift)
        fig, axes = plt.subplots(1, len(frames), figsize=(2.2 * len(frames), 2.6))
        for k, (ax, f) in enumerate(zip(axes, frames, strict=True)):
            ax.imshow(f, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"frame {k + 1}/{len(frames)}", fontsize=8)
        fig.suptitle(f'{name}: "{instruction}" ({"success" if ok else "failed"})', fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
        strips.append((name, instruction, frames))
    fig, axes = plt.subplots(len(strips), len(strips[0][2]), figsize=(11, 2.3 * len(strips)), squeeze=False)
    for row, (name, instruction, frames) in enumerate(strips):
        for k, f in enumerate(frames):
            ax = axes[row][k]
            ax.imshow(f, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(name, fontsize=10)
        axes[row][len(frames) // 2].set_title(instruction, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "all.png", dpi=80)
    plt.close(fig)
    paths.append(out_dir / "all.png")
    return paths
