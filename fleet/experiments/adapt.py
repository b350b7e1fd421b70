"""Online adaptation under a distribution shift (the course notes' exercise).

    fleet experiment adapt --shift actuator_bias --embodiment franka --out runs/adapt
    fleet experiment adapt --shift novel_object --episodes 20 --points 20,50 --json     # a small budget

For one embodiment and one shift:
  1. measure closed-loop success on the shifted work (`success_before`), on the work already learned
     (`retained_before`: the same embodiment without the shift, i.e. for `novel_object` the original
     objects, for `actuator_bias` the old hardware) and on every other embodiment;
  2. run the current policy in the shifted simulator while the scripted teleoperator (fleet.sim.teleop,
     the expert under the shift) watches every chunk and corrects the ones that stray, until the next
     point of the schedule (20, 50, 100, 150, 200 corrections by default); adapt the head on the new
     corrections (one fleet.learning.head_adapter round, rehearsal included, published only if the validation
     accepts it, exactly as the learner does) and measure the shifted success again. Each collection
     phase runs at least 20 teleoperated episodes, the fleet's work on the newest head: as the learner
     does with the robots' reports, their outcomes and interventions judge a newly published head
     against the one before (fleet.learning.rollout.judge_rollout), which rolls it back when it does worse;
  3. measure the retained work and the other embodiments again, and compare the other heads bit for bit.
Every success measurement runs the same unseen evaluation episodes (paired), so the curve's steps are
the head's doing, not the scenes'.

With image statistics in the checkpoint (`extra.image_stats`), what the corrections show picks each round
(fleet.learning.vision_round): corrections made on frames the encoder never saw (a dimmer light, a knocked
camera) fit the robot's image adapter, checked on those corrections, and the head is left alone; the
shifted success is then measured through the adapter, the unshifted work without it (other robots' frames
are untouched). Novel frames no adapter explains (clutter) go to a head round as before.

`--json` prints {"embodiment", "shift", "success_before", "success_after_20", "success_after_50",
"retained_before", "retained_after", "other_heads_identical", "adapt_seconds_mean", "curve",
"image_adapter"} (the robot's adapter at the end, or null); `--out`
writes adapt.png (success against corrections) and adapt.json (that object plus every round's metrics
and the other embodiments' success).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fleet.data.correction import Correction
from fleet.embodiments import get_embodiment
from fleet.learning.head_adapter import HeadAdapter, RoundResult
from fleet.learning.learner import LearnerConfig
from fleet.learning.rollout import judge_rollout
from fleet.learning.round_config import AdaptConfig
from fleet.learning.round_data import rehearsal_set
from fleet.policy.default import load_policy
from fleet.policy.evaluate import evaluate
from fleet.policy.image_adapter import ImageAdapter, adapted_policy
from fleet.policy.train import chunk_policy
from fleet.sim import make_env, parse_shift
from fleet.sim.teleop import TeleopConfig, Teleoperator

COLLECT_SEED_BASE = 3_000_000
# correction episodes use seeds apart from pretraining, rehearsal (7_000_000) and evaluation seeds
DEFAULT_POINTS = (20, 50, 100, 150, 200)


def collect_corrections(
    model,
    name: str,
    shift: str | None,
    n: int,
    seed: int = 0,
    n_envs: int = 8,
    tolerance: float = 0.15,
    min_episodes: int = 0,
    image_adapter: ImageAdapter | None = None,
) -> tuple[list[Correction], dict]:
    """Run the model's current head on `name` under `shift`; a scripted teleoperator reviews every new chunk
    and overrides the ones that stray (TeleopConfig tolerance), which then run instead, as on the fleet's
    robots. Returns the first `n` corrections and {"episodes", "successes", "chunks", "outcomes"}, where
    outcomes lists (success, interventions) per finished episode. With `min_episodes`, episodes go on
    (the human still correcting, nothing more recorded) until that many finished. `image_adapter`: the robot's,
    applied to the frames the policy reads (the corrections keep the frames as the camera sent them).
    """
    if n < 1:
        raise ValueError(f"collect_corrections: n must be >= 1, got {n}")
    spec = get_embodiment(name)
    policy = adapted_policy(chunk_policy(model), image_adapter)
    teleop = Teleoperator(TeleopConfig(tolerance=tolerance))
    version = int(model.head_versions[name])  # of the head that runs (read here; TrainedHead writes it)
    out: list[Correction] = []
    stats: dict = {"episodes": 0, "successes": 0, "chunks": 0, "outcomes": []}
    next_ep = 0
    envs: list[dict] = []
    while len(out) < n or stats["episodes"] < min_episodes:
        while len(envs) < n_envs:
            env = make_env(name, shift=shift)
            obs, _ = env.reset(seed=COLLECT_SEED_BASE + seed * 100_003 + next_ep)
            envs.append({"env": env, "obs": obs, "chunk": None, "k": 0, "episode": next_ep, "tick": 0, "help": 0})
            next_ep += 1
        need = [e for e in envs if e["chunk"] is None or e["k"] >= spec.recompute_every]
        if need:
            chunks = policy([e["obs"] for e in need], [name] * len(need))
            stats["chunks"] += len(need)
            for e, proposal in zip(need, chunks, strict=True):
                proposal = np.asarray(proposal, np.float32)
                decision = teleop.review(e["env"], proposal)
                e["help"] += int(decision.override)
                if decision.override and len(out) < n:
                    out.append(
                        Correction.new(
                            robot_id=f"experiment-{name}",
                            embodiment=name,
                            episode=e["episode"],
                            tick=e["tick"],
                            image=e["obs"]["image"],
                            proprio=np.asarray(e["obs"]["proprio"], np.float32),
                            instruction=e["obs"]["instruction"],
                            policy_chunk=proposal,
                            corrected_chunk=decision.chunk,
                            head_version=version,
                            reason=decision.reason,
                            shift=shift or "",
                        )
                    )
                e["chunk"], e["k"] = decision.chunk, 0
        still = []
        for e in envs:
            a = np.clip(e["chunk"][e["k"]], spec.action_low, spec.action_high).astype(np.float32)
            e["k"] += 1
            e["obs"], _, term, trunc, info = e["env"].step(a)
            e["tick"] += 1
            if term or trunc:
                stats["episodes"] += 1
                stats["successes"] += int(info["is_success"])
                stats["outcomes"].append((bool(info["is_success"]), e["help"]))
            else:
                still.append(e)
        envs = still
    return out, stats


def run_adapt_experiment(
    shift: str,
    embodiment: str = "franka",
    checkpoint: str | Path | None = None,
    episodes: int = 50,
    points: tuple[int, ...] = DEFAULT_POINTS,
    other_episodes: int = 20,
    rehearsal_episodes: int = 120,
    adapt: dict | None = None,
    seed: int = 0,
    threads: int = 1,
    vision: bool = True,
    out: Path | None = None,
    log=print,
) -> dict:
    """Run the experiment (see the module docstring); returns the `--json` object. `adapt` overrides
    AdaptConfig keys (e.g. {"steps": 100}); `points` are the corrections counts after which to adapt
    and measure (increasing); `other_episodes` 0 skips measuring the other embodiments' success. `vision`:
    corrections made on novel frames go to a vision round (the robot's image adapter) instead of the head."""
    points = _check_args(shift, points, episodes, other_episodes)
    torch.set_num_threads(threads)
    model, _ = load_policy(checkpoint)  # FileNotFoundError names the missing shipped checkpoint
    if embodiment not in model.specs:
        raise ValueError(f"embodiment: the checkpoint has no head for {embodiment!r}; it has {sorted(model.specs)}")
    others = [n for n in model.specs if n != embodiment]
    untouched = _Untouched(model, others)
    success = _PairedSuccess(model, embodiment, episodes, seed + 1)

    t_start = time.perf_counter()
    success_before = success(shift)
    retained_before = success(None)
    log(f"{embodiment} before adaptation: shifted ({shift}) {success_before:.0%}, unshifted {retained_before:.0%}")
    others_before = {n: success(None, n, other_episodes) for n in others} if other_episodes else {}
    rehearsal = rehearsal_set(embodiment, rehearsal_episodes, seed=seed) if rehearsal_episodes else None
    adapter = HeadAdapter(model, embodiment, rehearsal, AdaptConfig.from_dict({"seed": seed} | dict(adapt or {})))
    log(f"rehearsal: {0 if rehearsal is None else len(rehearsal)} samples, encoded in {adapter.prepare_seconds:.1f} s")
    eyes = _VisionState.load(checkpoint, embodiment, log) if vision else None
    curve, rounds = _adapt_along(points, model, adapter, shift, seed, success, log, eyes)
    curve = [[0, success_before], *curve]
    retained_after = success(None)
    others_after = {n: success(None, n, other_episodes) for n in others} if other_episodes else {}
    identical = untouched()
    at = {int(c): s for c, s in curve}
    result = {
        "embodiment": embodiment,
        "shift": shift,
        "success_before": success_before,
        "success_after_20": at.get(20),
        "success_after_50": at.get(50),
        "retained_before": retained_before,
        "retained_after": retained_after,
        "other_heads_identical": bool(identical),
        "adapt_seconds_mean": float(np.mean([r["seconds"] for r in rounds])),
        "curve": curve,
        "image_adapter": None if eyes is None or eyes.adapter is None else eyes.adapter.to_dict(),
    }
    if out is not None:
        details = {
            "episodes": episodes,
            "points": list(points),
            "others_before": others_before,
            "others_after": others_after,
            "rounds": rounds,
            "adapt_config": adapter.config.to_dict(),
            "rehearsal_samples": 0 if rehearsal is None else len(rehearsal),
            "rollbacks": sum(bool(r["previous_rollout"] and r["previous_rollout"]["rolled_back"]) for r in rounds),
            "seconds_total": time.perf_counter() - t_start,
        }
        _write(Path(out), result, details, (retained_before, retained_after))
    log(f"other embodiments: before {others_before}, after {others_after}; heads identical: {identical}")
    return result


def _check_args(shift: str, points: tuple[int, ...], episodes: int, other_episodes: int) -> tuple[int, ...]:
    """The arguments checked before anything loads; returns `points` as ints."""
    if not parse_shift(shift):
        raise ValueError("shift: name the distribution shift to adapt to, e.g. 'actuator_bias' or 'novel_object'")
    points = tuple(int(p) for p in points)
    if not points or min(points) < 1 or list(points) != sorted(set(points)):
        raise ValueError(f"points: expected increasing positive corrections counts, got {points}")
    for name, value in (("episodes", episodes), ("other_episodes", other_episodes)):
        if value < (1 if name == "episodes" else 0):
            raise ValueError(f"{name}: expected a count >= {1 if name == 'episodes' else 0}, got {value}")
    return points


class _PairedSuccess:
    """Closed-loop success of the model, on the same scenes and the same flow-sampling noise every time: two
    measurements of an unchanged head agree exactly, so a step in the curve (or a difference in another
    embodiment) is the head's doing."""

    def __init__(self, model, embodiment: str, episodes: int, eval_seed: int) -> None:
        self.model, self.embodiment, self.episodes, self.eval_seed = model, embodiment, episodes, eval_seed

    def __call__(
        self,
        shift: str | None,
        name: str | None = None,
        n: int | None = None,
        image_adapter: ImageAdapter | None = None,
    ) -> float:
        name = self.embodiment if name is None else name
        n = self.episodes if n is None else n
        torch.manual_seed(self.eval_seed)
        policy = adapted_policy(chunk_policy(self.model), image_adapter)
        return evaluate(policy, name, n, shift=shift, seed=self.eval_seed).success_rate


class _Untouched:
    """A snapshot of the other heads and the backbone; called, says whether they are still bit for bit it."""

    def __init__(self, model, others: list[str]) -> None:
        self.model = model
        self.heads = {n: model.head_state_dict(n) for n in others}
        self.backbone = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}

    def __call__(self) -> bool:
        model = self.model
        heads = all(
            all(torch.equal(model.head_state_dict(n)[k], v) for k, v in state.items())
            for n, state in self.heads.items()
        )
        return heads and all(torch.equal(model.backbone.state_dict()[k], v) for k, v in self.backbone.items())


def _adapt_along(
    points: tuple[int, ...],
    model,
    adapter: HeadAdapter,
    shift: str,
    seed: int,
    success: _PairedSuccess,
    log: Callable[[str], None],
    eyes: _VisionState | None = None,
) -> tuple[list[list[float]], list[dict]]:
    """Collect corrections up to each point, adapt on them, measure the shifted success: (curve, rounds).

    The learner's rollout watch, emulated: the teleoperated episodes that collect the next corrections are
    the fleet's work on the newest head; their first `watch_episodes` judge it against the head before.
    With `eyes`, what the corrections show picks the round (fleet.learning.vision_round): frames the
    encoder never saw get the robot's image adapter, the rest a head round on the frames as adapted."""
    embodiment = adapter.name
    watch = LearnerConfig()
    watched: dict | None = None  # {"state", "reference"}: the head before the newest and its episodes
    curve: list[list[float]] = []
    rounds: list[dict] = []
    total = 0
    for i, target in enumerate(points):
        seen = None if eyes is None else eyes.adapter
        corrections, stats = collect_corrections(
            model,
            embodiment,
            shift,
            target - total,
            seed=seed * 1000 + i,
            min_episodes=watch.watch_episodes,
            image_adapter=seen,
        )
        if eyes is not None:
            vr = eyes.round(model, embodiment, corrections)
            if vr.novel and vr.published:  # the camera's view, not the behaviour: the head is left alone
                total, watched = target, None
                rate = success(shift, image_adapter=eyes.adapter)
                curve.append([total, rate])
                rounds.append(_vision_record(total, len(corrections), vr, eyes, rate, stats))
                log(
                    f"{total:>4} corrections: vision round {vr.seconds:.1f} s, adapter published; shifted success "
                    f"{rate:.0%}\n       ({vr.reason})"  # two lines: an 80-column terminal
                )
                continue
            if vr.novel:  # novel frames no adapter explains (clutter, say): the head must learn them
                log(f"     vision round not published ({vr.reason}): a head round instead")
            corrections = eyes.as_seen(corrections)
        rollout, outcomes = _judge_last_rollout(adapter, watched, stats["outcomes"], watch, log)
        previous = adapter.head.state()
        result = adapter.round(corrections)
        watched = None
        if result.accepted:
            adapter.accept(result, adapter.version + 1)
            watched = {"state": previous, "reference": outcomes}
        total = target
        rate = success(shift, image_adapter=None if eyes is None else eyes.adapter)
        curve.append([total, rate])
        rounds.append(_round_record(total, len(corrections), result, adapter.version, rate, stats, rollout))
        verdict = "published" if result.accepted else f"not published ({result.reason})"
        steps = f"{result.metrics['steps_done']}/{result.metrics['steps']} steps"
        log(f"{total:>4} corrections: round {result.seconds:.2f} s ({steps}), {verdict}; shifted success {rate:.0%}")
    return curve, rounds


def _judge_last_rollout(
    adapter: HeadAdapter, watched: dict | None, outcomes: list, watch: LearnerConfig, log: Callable[[str], None]
) -> tuple[dict | None, list]:
    """(the verdict on the newest head from this phase's episodes or None, the episodes of the head now
    current). A rollback puts the head before it back, under the next number, as the learner would."""
    if watched is None or len(watched["reference"]) < watch.min_reference:
        return None, outcomes
    ref = watched["reference"][-watch.reference_episodes :]
    back, info, why = judge_rollout(ref, outcomes[: watch.watch_episodes], watch, adapter.name)
    rollout = {"version": adapter.version, "rolled_back": back, "why": why} | info
    if not back:
        return rollout, outcomes
    adapter.head.install(watched["state"], adapter.version + 1)
    log(f"     rollout of the last head rolled back: {why}")
    return rollout, watched["reference"]  # the restored head's own episodes


class _VisionState:
    """The experiment robot's eyes: its body's clean image statistics, its image adapter, its recent corrections."""

    RECENT = 200  # corrections a vision round reads at most (the newest)

    def __init__(self, stats) -> None:
        self.stats = stats
        self.adapter: ImageAdapter | None = None
        self.recent: list[Correction] = []

    @classmethod
    def load(cls, checkpoint, embodiment: str, log: Callable[[str], None]) -> _VisionState | None:
        from fleet.cluster.launcher import checkpoint_meta
        from fleet.learning.vision_round import image_stats_of

        _, meta = checkpoint_meta(None if checkpoint is None else str(checkpoint))
        found = image_stats_of(meta).get(embodiment)
        if found is None:
            log(f"no image statistics for {embodiment} in the checkpoint (fleet robust-image-stats): head rounds only")
            return None
        return cls(found)

    def round(self, model, embodiment: str, corrections: list[Correction]):
        from fleet.learning.vision_round import vision_round

        self.recent = (self.recent + list(corrections))[-self.RECENT :]
        vr = vision_round(model, embodiment, self.recent, self.stats, current=self.adapter)
        if vr.published:
            self.adapter = vr.adapter
        return vr

    def as_seen(self, corrections: list[Correction]) -> list[Correction]:
        """The corrections with the frames the policy read (through the adapter), for a head round."""
        if self.adapter is None:
            return corrections
        return [dataclasses.replace(c, image=self.adapter.apply(c.image)) for c in corrections]


def _vision_record(total: int, new: int, vr, eyes: _VisionState, rate: float, stats: dict) -> dict:
    return {
        "corrections": total,
        "new": new,
        "kind": "vision",
        "accepted": vr.published,
        "reason": vr.reason,
        "seconds": vr.seconds,
        "image_adapter": None if eyes.adapter is None else eyes.adapter.to_dict(),
        "success": rate,
        "collect_episodes": stats["episodes"],
        "collect_success": stats["successes"] / max(1, stats["episodes"]),
        "previous_rollout": None,
        "metrics": vr.to_dict(),
    }


def _round_record(
    total: int, new: int, result: RoundResult, version: int, rate: float, stats: dict, rollout: dict | None
) -> dict:
    return {
        "corrections": total,
        "new": new,
        "kind": "head",
        "accepted": result.accepted,
        "reason": result.reason,
        "seconds": result.seconds,
        "head_version": version,
        "success": rate,
        "collect_episodes": stats["episodes"],
        "collect_success": stats["successes"] / max(1, stats["episodes"]),
        "previous_rollout": rollout,
        "metrics": result.metrics,
    }


def _write(out: Path, result: dict, details: dict, retained: tuple[float, float]) -> None:
    """adapt.json (the result, every round's metrics, the other embodiments' success) and adapt.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapt.json").write_text(json.dumps(result | details, indent=1, default=float))
    plot_curve(result, out / "adapt.png", retained=retained)


def format_table(result: dict) -> str:
    def pct(x) -> str:
        return "-" if x is None else f"{x:.0%}"

    lines = [
        f"online adaptation: {result['embodiment']} under {result['shift']}",
        f"  shifted success      before {pct(result['success_before'])}   after 20 corrections "
        f"{pct(result['success_after_20'])}   after 50 {pct(result['success_after_50'])}",
        f"  already learned      before {pct(result['retained_before'])}   after {pct(result['retained_after'])}",
        f"  other heads bit-identical: {result['other_heads_identical']}",
        f"  adaptation round: {result['adapt_seconds_mean']:.2f} s on average",
        "  corrections  success",
    ]
    lines += [f"  {int(c):>11}  {pct(s):>7}" for c, s in result["curve"]]
    return "\n".join(lines)


def plot_curve(result: dict, path: Path, retained: tuple[float, float] | None = None) -> None:
    """PNG of shifted success against corrections (matplotlib, Agg), with the retained work's before/after."""
    import matplotlib  # only when a plot is written: the JSON path never loads it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is tried

    xs = [c for c, _ in result["curve"]]
    ys = [s for _, s in result["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(xs, ys, "o-", label=f"{result['shift']} (shifted work)")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.0%}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if retained is not None:
        what = "unshifted (already learned)"
        ax.axhline(retained[0], color="gray", ls=":", lw=1, label=f"{what}, before: {retained[0]:.0%}")
        ax.axhline(retained[1], color="green", ls="--", lw=1, label=f"{what}, after: {retained[1]:.0%}")
    ax.set_xlabel("corrections")
    ax.set_ylabel("closed-loop success")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"Online adaptation of the {result['embodiment']} head", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
