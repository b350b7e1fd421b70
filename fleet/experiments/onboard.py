"""`fleet experiment onboard`: how many demonstrations a new body needs, with the shared backbone and without.

For each demonstration count n (increasing; the first n episodes of one demonstration set, so larger sets
contain the smaller): (a) shared: the shipped checkpoint, frozen, plus the new body's token row, stem and
head (warm-started from a `like` body), trained for `steps` optimizer steps; (b) scratch: the same
architecture, every weight from random init, trained on the same demonstrations for the same wall time
(a's measured time, in the same process, so machine load hits both alike). Demonstrations run with noise
injected into the executed actions (`noise`, a share of each dimension's range; the labels are the operator's
intended chunks; DART, Laskey et al. 2017), so they cover the states a slightly wrong policy visits and show how
to recover from them: with noise 0 the 100-demonstration policy failed every episode (it never saw itself off the
operator's path), with 0.1 it reached 37-86 % depending on the scenes, with 0.2 (the default) 98-100 % on four
seed blocks (README "Adding a robot body"). These demonstrations are recorded as pretraining's are, without the
robot-side safety layer; the live robots' pass through it, with so100's workspace guard, and 100 of them at 0.2
reached 97-98 % the same way (OnboardSpec.demo_noise). Both are measured closed loop
on unseen scenes (evaluation seeds disjoint from the demonstrations'). The shared model's other heads and
backbone are checked bit-identical to the checkpoint after every round.

    result = run_onboard_experiment("so100", demos=(10, 25, 50, 100), episodes=30, steps=300)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fleet.durable import write_text_atomic
from fleet.embodiments import EMBODIMENTS, get_embodiment

DEFAULT_EMBODIMENT = "so100"
DEFAULT_LIKE = {"so100": "franka"}  # the pretrained body whose head warm-starts the new one (same scene)
DEMO_SEED = 424_242  # demonstration scenes; evaluation uses fleet.policy.evaluate's disjoint seed base


def run_onboard_experiment(
    embodiment: str = DEFAULT_EMBODIMENT,
    demos: tuple[int, ...] = (10, 25, 50, 100, 200),
    episodes: int = 30,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 3e-3,
    like: str | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    threads: int = 1,
    noise: float = 0.2,
    scratch: bool = True,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The experiment's result dict (see the module docstring); writes onboard.json and onboard.png to `out`."""
    from fleet.learning.onboard import OnboardData, train_new_body, train_scratch
    from fleet.policy.default import load_policy, resolve_checkpoint
    from fleet.policy.demos import collect
    from fleet.policy.evaluate import evaluate
    from fleet.policy.model import FleetPolicy
    from fleet.policy.tokenizer import Vocabulary
    from fleet.policy.train import chunk_policy

    counts = tuple(int(n) for n in demos)
    if not counts or min(counts) < 1 or list(counts) != sorted(set(counts)):
        raise ValueError(f"demos: expected increasing positive counts, got {demos!r}")
    spec = get_embodiment(embodiment)
    torch.set_num_threads(threads)
    ckpt = resolve_checkpoint(checkpoint)
    probe, _ = load_policy(ckpt)
    if embodiment in probe.specs:
        raise ValueError(f"--embodiment: {embodiment!r} is already a body of checkpoint {ckpt}; pick one it lacks")
    like = like if like is not None else DEFAULT_LIKE.get(embodiment)
    if like is not None and like not in probe.specs:
        raise ValueError(f"--like: {like!r} is not a body of checkpoint {ckpt}; it has {sorted(probe.specs)}")
    reference = {k: v.clone() for k, v in probe.state_dict().items()}
    del probe

    t0 = time.perf_counter()
    rows, identical = [], True
    for n in counts:
        # episode i of a collection has scene seed (DEMO_SEED + seed) * 100_003 + i whatever the total, so the
        # first n demonstrations are the same scenes in every round: larger sets contain the smaller ones
        subset = collect(embodiment, n, seed=DEMO_SEED + seed, noise=noise)
        model, _ = load_policy(ckpt)
        model.add_embodiment(spec, like=like, seed=seed)
        data = OnboardData.from_demos(model, subset)
        report = train_new_body(model, embodiment, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        now = model.state_dict()
        same = all(torch.equal(now[k], v) for k, v in reference.items())
        identical &= same
        shared = evaluate(chunk_policy(model), embodiment, episodes, seed=seed)
        row = {
            "demos": n,
            "samples": len(subset),
            "success_shared": shared.success_rate,
            "success_scratch": None,
            "train_s": report.seconds,
            "steps_shared": report.steps,
            "steps_scratch": None,
            "loss_shared": report.losses[-1] if report.losses else None,
            "other_heads_identical": same,
        }
        del model, data
        if scratch:
            torch.manual_seed(seed)
            vocab = Vocabulary.build(_instruction_words(), [embodiment])  # the same words, the body's token in-table
            fresh = FleetPolicy(_config(ckpt), {embodiment: spec}, vocab)
            base = train_scratch(fresh, subset, seconds=report.seconds, batch_size=batch_size, lr=lr, seed=seed)
            row["success_scratch"] = evaluate(chunk_policy(fresh), embodiment, episodes, seed=seed).success_rate
            row["steps_scratch"] = base.steps
            del fresh
        rows.append(row)
        scratch_rate = row["success_scratch"]
        base_text = "-" if scratch_rate is None else f"{scratch_rate:.0%} ({row['steps_scratch']} steps)"
        log(
            f"{n:4d} demos ({len(subset)} samples): shared {row['success_shared']:.0%} after {report.steps} steps"
            f" in {report.seconds:.0f} s; scratch {base_text}"
        )
    result = {
        "embodiment": embodiment,
        "like": like,
        "checkpoint": str(ckpt),
        "rows": rows,
        "other_heads_identical": identical,
        "episodes": episodes,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "demo_noise": noise,
        "seed": seed,
        "total_s": time.perf_counter() - t0,
        "in_registry": embodiment in EMBODIMENTS,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "onboard.json", json.dumps(result, indent=1))
        plot(result, out / "onboard.png")
    return result


def _instruction_words() -> list[str]:
    from fleet.policy.tokenizer import DEFAULT_WORDS
    from fleet.sim import INSTRUCTION_WORDS

    return [*DEFAULT_WORDS, *INSTRUCTION_WORDS]


def _config(ckpt: Path):
    from fleet.policy.backbone import PolicyConfig

    meta = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())
    return PolicyConfig.from_dict(meta["config"])


def format_table(result: dict) -> str:
    def pct(x) -> str:
        return "-" if x is None else f"{x:.0%}"

    lines = [
        f"onboarding {result['embodiment']} (warm start: {result['like'] or 'none'}), "
        f"{result['episodes']} unseen episodes per cell",
        f"{'demos':>6} {'samples':>8} {'shared':>8} {'scratch':>8} {'train s':>8} {'steps a/b':>12}",
    ]
    for r in result["rows"]:
        steps = f"{r['steps_shared']}/{r['steps_scratch'] if r['steps_scratch'] is not None else '-'}"
        lines.append(
            f"{r['demos']:>6} {r['samples']:>8} {pct(r['success_shared']):>8} {pct(r['success_scratch']):>8} "
            f"{r['train_s']:>8.0f} {steps:>12}"
        )
    lines.append(f"other heads and backbone bit-identical: {result['other_heads_identical']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """PNG of success against demonstrations, shared backbone and scratch (matplotlib, Agg)."""
    import matplotlib  # only when a plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["demos"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [100 * r["success_shared"] for r in result["rows"]], "o-", label="shared backbone + new parts")
    scratch = [r["success_scratch"] for r in result["rows"]]
    if any(s is not None for s in scratch):
        ax.plot(xs, [None if s is None else 100 * s for s in scratch], "s--", label="scratch, same wall time")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("demonstrations (episodes)")
    ax.set_ylabel("success on unseen scenes (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"onboarding {result['embodiment']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
