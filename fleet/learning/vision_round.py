"""A round that adapts what one robot's camera shows, instead of the head: the learner's choice for novel frames.

    result = vision_round(model, "franka", corrections, stats)   # one robot's corrections, its body's ImageStats
    if result.published: registry.set_image_adapter(robot_id, result.adapter.to_dict())

What the corrections show decides the round. When the frames they carry look like the clean rig (median image
distance at most `novelty`, the threshold at which robots call a scene novel), the operator corrected the
*behaviour*: that is the head's work (fleet.learning.head_adapter). When they do not, the camera sees a view
the frozen encoder never saw (a dimmer light, a knocked camera), and no head round can undo that: the round
fits the robot's `ImageAdapter` to its frames (fleet.policy.image_adapter: the image statistics place the
offset within a pixel and match the colours; among the offsets one pixel around, with those colours or none,
the corrections' own loss chooses the one under which the operator's chunks are most likely) and checks it
on the shifted work itself, the corrections: the behaviour-cloning loss of the operator's corrected chunks
must fall by at least `min_gain` with the new adapter (against the robot's current one), and the adapter
must explain the shift (the frames' image distance down to MAX_RESIDUAL of what it was, or below novelty).
A round that fails either is not published, so an adapter that would make the shifted work worse never
runs. When a refit lands on the robot's adapter again, the frames are explained and what the operator still
corrects is the head's work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fleet.policy.image_adapter import ImageAdapter, fit_image_adapter

NOVELTY = 3.0  # fleet.control.confidence.ConfidenceConfig.novelty_threshold: robots call a scene novel above it
MIN_FRAMES = 10  # corrections a vision round needs (fewer: the frames' median says too little)
MIN_GAIN = 0.05  # the corrections' loss must fall by this share with the adapter
WAITING, WAITING_ROBOTS = 64, 256  # novel corrections kept per robot until they are enough, and robots kept
CHOOSE_ROWS = 32  # the newest corrections whose loss chooses among the candidate adapters (up to 18 of them)
LOSS_TOLERANCE = 0.05
# a candidate (an offset one pixel from the statistics' proposal) must beat the proposal by more than this to
# replace it. On 20 corrections the loss is flat to a few per cent: under the dimmer light a 1-pixel shift scored
# 1.1 % below the right (0, 0), and for franka's knocked camera (4, -4) 1.8 % below the right (4, -3); with the
# border fill the statistics cannot tell aloha's right (4, -3) from (5, -4), where the loss is 6.8 % lower
MAX_RESIDUAL = 0.8
# ... and the frames' image distance to at most this share of what it was (or to novelty): through the right
# adapter the knocked and dimmed cameras drop to 0.03 or less of it (aloha 21.9 -> 0.6, franka 48.7 -> 2.5,
# dimmed franka 61 -> 0.4); clutter gets no closer at all
EXPLAINED = 0.35
# frames through the robot's adapter at most this share of their raw distance are explained (a refit would
# find the same adapter); a dimmed franka through a gain of 1.3 where 1.82 is right keeps 0.42: not explained
SAME_GAIN, SAME_BIAS = 0.05, 0.02  # a new fit this close to the robot's adapter is that adapter again


def _choose(losses: list[tuple[float, float, ImageAdapter]], proposed: ImageAdapter) -> tuple[float, ImageAdapter]:
    """(distance, adapter) the corrections choose among (loss, distance, adapter): the statistics' proposed
    offset unless another is clearly likelier (more than LOSS_TOLERANCE lower loss), and at the chosen offset
    the colours left alone unless the corrections ask for them (the plain offset not within the tolerance)."""
    best = min(x for x, _, _ in losses)
    near = [t for t in losses if t[0] <= best * (1.0 + LOSS_TOLERANCE)]
    plain = [t for t in near if _plain(t[2])]
    if any(a == proposed for _, _, a in near):
        same = [t for t in plain if (t[2].dx, t[2].dy) == (proposed.dx, proposed.dy)]
        _, d, a = same[0] if same else next(t for t in near if t[2] == proposed)
        return d, a
    _, d, a = min(plain or near, key=lambda t: t[0])
    return d, a


def _plain(a: ImageAdapter) -> bool:
    """An offset only: colours left as the camera sent them."""
    return a.gain == (1.0, 1.0, 1.0) and a.bias == (0.0, 0.0, 0.0)


def _same(a: ImageAdapter, b: ImageAdapter) -> bool:
    """Whether two adapters are the same within what refitting on other frames moves them."""
    ga, gb, ba, bb = (np.asarray(x) for x in (a.gain, b.gain, a.bias, b.bias))
    return (
        (a.dx, a.dy) == (b.dx, b.dy)
        and bool(np.all(np.abs(ga - gb) <= SAME_GAIN * gb))
        and bool(np.all(np.abs(ba - bb) <= SAME_BIAS))
    )


@dataclass
class VisionRound:
    embodiment: str
    frames: int
    distance: float  # median image distance of the corrections' frames as the policy saw them
    novel: bool  # distance > novelty: a view the encoder never saw, the adapter's work, not the head's
    adapter: ImageAdapter | None = None
    distance_after: float | None = None  # mean image distance of the adapted frames (fit_image_adapter)
    loss_without: float | None = None  # behaviour-cloning loss of the corrected chunks as the policy saw them
    loss_with: float | None = None  # ... on the adapted frames
    published: bool = False
    reason: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "embodiment": self.embodiment,
            "frames": self.frames,
            "distance": self.distance,
            "novel": self.novel,
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
            "distance_after": self.distance_after,
            "loss_without": self.loss_without,
            "loss_with": self.loss_with,
            "published": self.published,
            "reason": self.reason,
            "seconds": self.seconds,
        }


def frames_of(corrections) -> np.ndarray:
    """(N, H, W, 3) uint8: the camera frames the corrections were made on, as the robot sent them."""
    return np.stack([np.asarray(c.image, np.uint8) for c in corrections])


def correction_loss(model, name: str, corrections, adapter: ImageAdapter | None = None, seed: int = 0) -> float:
    """Mean behaviour-cloning loss of the corrections' corrected chunks (the head's own loss; flow heads draw
    their noise from `seed`, so two calls differ only by the frames), with `adapter` on the frames."""
    obs = []
    for c in corrections:
        image = np.asarray(c.image, np.uint8)
        obs.append(
            {
                "image": image if adapter is None else adapter.apply(image),
                "proprio": c.proprio,
                "instruction": c.instruction,
            }
        )
    was_training = model.training
    model.eval()
    total, rows = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(obs), 64):
                part = corrections[start : start + 64]
                batch = model.collate(obs[start : start + 64], [name] * len(part), [c.corrected_chunk for c in part])
                loss, _ = model.action_loss(batch, torch.Generator().manual_seed(seed + start))
                total += float(loss) * len(part)
                rows += len(part)
    finally:
        model.train(was_training)
    return total / max(rows, 1)


def vision_round(
    model,
    name: str,
    corrections,
    stats,
    current: ImageAdapter | None = None,
    novelty: float = NOVELTY,
    min_frames: int = MIN_FRAMES,
    min_gain: float = MIN_GAIN,
) -> VisionRound:
    """Decide and, for novel frames, fit and check one robot's image adapter; see the module doc. `corrections`
    are one robot's (fleet.data.correction.Correction or anything with image, proprio, instruction and
    corrected_chunk), `stats` its body's clean ImageStats, `current` the robot's adapter now served (None: none).
    The decision reads the frames as the policy sees them (through `current`); the fit starts from the frames
    as sent, and the check compares the new adapter with `current`."""
    t0 = time.perf_counter()
    corrections = list(corrections)
    if not corrections:
        raise ValueError("vision_round: no corrections")
    frames = frames_of(corrections)
    raw = float(np.median([stats.distance(f) for f in frames]))
    distance = raw if current is None else float(np.median([stats.distance(f) for f in current.apply(frames)]))
    # through the robot's adapter, frames are explained when back below novelty, or at most EXPLAINED of their
    # raw distance (what a knocked camera uncovered is a guess and keeps some; a refit would find the same)
    explained = distance <= novelty or (current is not None and distance <= EXPLAINED * raw)
    result = VisionRound(name, len(frames), distance, not explained)
    if not result.novel:
        how = "in distribution" if distance <= novelty else f"explained by the robot's adapter (raw {raw:.2f})"
        result.reason = f"frames {how} (image distance {distance:.2f}): the head's work"
    elif len(frames) < min_frames:
        result.reason = f"novel frames, but {len(frames)} corrections < {min_frames}: wait for more"
    else:
        fit = fit_image_adapter(frames, stats)
        if not fit.candidates:  # nothing brings these frames closer to the rig than they are
            result.reason = f"no adapter brings the frames closer to the rig (image distance {distance:.2f})"
            result.seconds = time.perf_counter() - t0
            return result
        # the image statistics propose (offsets and colours), the operator's corrections choose: the candidate
        # under which the corrected chunks are most likely
        pick = corrections[-CHOOSE_ROWS:]
        losses = [(correction_loss(model, name, pick, a), d, a) for d, a in fit.candidates]
        distance_after, chosen = _choose(losses, fit.adapter)
        result.adapter, result.distance_after = chosen, distance_after
        result.loss_with = correction_loss(model, name, corrections, chosen)
        result.extra["candidates"] = [{"adapter": a.to_dict(), "distance": d, "loss": x} for x, d, a in losses]
        fit = replace(fit, adapter=chosen, distance_after=distance_after)
        if current is not None and _same(fit.adapter, current):
            # the robot's adapter already is what its frames ask for: what still goes wrong is the behaviour
            result.novel = False
            result.reason = (
                f"the robot's adapter already fits these frames (image distance {distance:.2f}): the head's work"
            )
            result.seconds = time.perf_counter() - t0
            return result
        result.loss_without = correction_loss(model, name, corrections, current)
        # what a knocked camera uncovered is filled by a guess and keeps some distance: ask for closer, not clean
        enough = max(novelty, MAX_RESIDUAL * distance)
        if fit.distance_after > enough:
            result.reason = (
                f"the adapter explains too little (image distance {distance:.2f} -> {fit.distance_after:.2f}, "
                f"above {enough:.2f})"
            )
        elif result.loss_with > result.loss_without * (1.0 - min_gain):
            result.reason = (
                f"corrections' loss {result.loss_without:.3f} -> {result.loss_with:.3f} with the adapter: "
                f"not {min_gain:.0%} better"
            )
        else:
            result.published = True
            result.reason = (
                f"image distance {distance:.1f} -> {fit.distance_after:.1f}, corrections' loss "
                f"{result.loss_without:.3f} -> {result.loss_with:.3f}"
            )
    result.seconds = time.perf_counter() - t0
    return result


def image_stats_of(meta: dict | None) -> dict:
    """{body: ImageStats} from a checkpoint's metadata (`extra.image_stats`); {} when it has none."""
    from fleet.control.image_ood import ImageStats

    found = ((meta or {}).get("extra") or {}).get("image_stats") or {}
    return {body: ImageStats.from_dict(d) for body, d in found.items()}


class RobotAdapters:
    """The learner's side of the robots' image adapters: each round's corrections split into the camera's work
    (one robot's novel frames: its adapter, published to the registry) and the behaviour's (the head round,
    on the frames as each robot's adapter shows them to the policy).

        eyes = RobotAdapters(model, image_stats_of(meta), registry)
        eyes.load()                                          # the adapters the registry already serves
        head_corrections, published = eyes.split("franka", corrections)
    """

    def __init__(self, model, image_stats: dict, registry, log=lambda m: None) -> None:
        self.model, self.image_stats, self.registry, self.log = model, dict(image_stats), registry, log
        self.adapters: dict[str, ImageAdapter] = {}
        self.waiting: dict[tuple[str, str], list] = {}  # (body, robot) -> novel corrections too few to fit yet

    def load(self) -> None:
        got = self.registry.image_adapters()
        if got:
            self.adapters = {r: ImageAdapter.from_dict(d) for r, d in got["adapters"].items()}

    def split(self, name: str, corrections: list) -> tuple[list, list[dict]]:
        """(the corrections left for the head round, adapted frames in place of the raw ones; one record per
        adapter published). Corrections on novel frames with too few of them to fit an adapter wait (up to
        WAITING per robot) and join that robot's next round: a head trained on a view it cannot see properly
        is what made a shifted robot worse before."""
        stats = self.image_stats.get(name)
        if stats is None:
            return list(corrections), []
        by_robot: dict[str, list] = {}
        for c in corrections:
            by_robot.setdefault(str(c.robot_id), []).append(c)
        keep, published = [], []
        for robot, new in by_robot.items():
            items = self.waiting.pop((name, robot), []) + new
            current = self.adapters.get(robot)
            vr = vision_round(self.model, name, items, stats, current=current)
            if vr.novel and vr.published:
                record = vr.to_dict()
                info = {k: record[k] for k in ("frames", "distance", "distance_after", "loss_without", "loss_with")}
                version = self.registry.set_image_adapter(robot, vr.adapter.to_dict(), {"embodiment": name} | info)
                self.adapters[robot] = vr.adapter
                published.append({"robot_id": robot, "table_version": int(version), **info})
                self.log(f"learner: image adapter for {robot} ({vr.reason})")
                continue
            if vr.novel and vr.frames < MIN_FRAMES:
                self.waiting[(name, robot)] = items[-WAITING:]
                while len(self.waiting) > WAITING_ROBOTS:  # bounded: the longest-waiting robot goes first
                    self.waiting.pop(next(iter(self.waiting)))
                self.log(f"learner: {len(items)} corrections of {robot} wait for its next {name} round: {vr.reason}")
                continue
            keep += items if current is None else [replace(c, image=current.apply(c.image)) for c in items]
        return keep, published

    def status(self) -> dict[str, dict]:
        return {r: a.to_dict() for r, a in self.adapters.items()}


__all__ = [
    "NOVELTY",
    "RobotAdapters",
    "VisionRound",
    "correction_loss",
    "frames_of",
    "image_stats_of",
    "vision_round",
]
