"""`fleet experiment adapt`: online adaptation under a distribution shift (registered by `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import CkptOpt, JsonOpt, fail, show
from fleet.embodiments import EMBODIMENTS
from fleet.sim import parse_shift


def experiment_adapt(
    shift: Annotated[str, typer.Option("--shift", help="The shift to adapt to: actuator_bias, novel_object, ...")],
    embodiment: Annotated[str, typer.Option("--embodiment", "-e", help="The head to adapt.")] = "franka",
    checkpoint: CkptOpt = None,
    episodes: Annotated[int, typer.Option(min=1, help="Closed-loop episodes per success measurement.")] = 50,
    points: Annotated[
        str, typer.Option(help="Corrections counts after which to adapt and measure, increasing.")
    ] = "20,50,100,150,200",
    other_episodes: Annotated[
        int, typer.Option(min=0, help="Episodes per other embodiment, before and after (0: skip).")
    ] = 20,
    rehearsal_episodes: Annotated[
        int, typer.Option(min=0, help="Unshifted expert episodes for the rehearsal set (~4 samples each).")
    ] = 120,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per round (default AdaptConfig's).")] = None,
    round_budget: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds a round may take, training stopping early past it as the learner's does (4.5 s); "
            "0 (default): every step whatever the load, so results do not depend on the machine's load.",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for corrections, rehearsal and evaluation episodes.")] = 0,
    device: Annotated[
        str, typer.Option(help="Where each round's training steps run: cpu, cuda or cuda:N (AdaptConfig.device).")
    ] = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch threads (2 only on an otherwise idle machine).")] = 1,
    vision: Annotated[
        bool,
        typer.Option(
            "--vision/--no-vision",
            help="Corrections made on frames the encoder never saw (a dimmer light, a knocked camera) fit the "
            "robot's image adapter instead of training the head (fleet.learning.vision_round).",
        ),
    ] = True,
    json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for adapt.png and adapt.json.")] = None,
) -> None:
    """Adapt one head to a distribution shift from teleoperator corrections: measure shifted success, adapt
    after 20, 50, ... 200 corrections (rehearsal included, published only if no worse), measure again; also
    the work already learned and the other embodiments. Plots success against corrections. Corrections made
    on novel frames fit the robot's image adapter (colour and offset) instead of the head.

    Examples:
        fleet experiment adapt --shift actuator_bias --out runs/adapt_bias
        fleet experiment adapt --shift lighting -e aloha --points 20,50
        fleet experiment adapt --shift novel_object --episodes 20 \\
            --points 20,50 --json
    """
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.experiments.adapt import format_table, run_adapt_experiment

    if embodiment not in EMBODIMENTS:
        fail(f"--embodiment: unknown {embodiment!r}; known: {sorted(EMBODIMENTS)}")
    try:
        if not parse_shift(shift):
            raise ValueError("--shift: name a shift, e.g. actuator_bias or novel_object")
    except ValueError as exc:
        fail(f"--shift: {exc}")
    try:
        counts = tuple(int(x) for x in points.split(",") if x.strip())
        if not counts or min(counts) < 1 or list(counts) != sorted(set(counts)):
            raise ValueError
    except ValueError:
        fail(f"--points: expected increasing positive counts like 20,50,100,150,200, got {points!r}")
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    try:
        result = run_adapt_experiment(
            shift,
            embodiment=embodiment,
            checkpoint=checkpoint,
            episodes=episodes,
            points=counts,
            other_episodes=other_episodes,
            rehearsal_episodes=rehearsal_episodes,
            adapt=({} if steps is None else {"steps": steps})
            | {"max_round_seconds": round_budget or None, "device": device},
            seed=seed,
            threads=threads,
            vision=vision,
            out=out,
            log=log,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    show(result, json_out, format_table, out and [out / "adapt.png", out / "adapt.json"])


def register(experiment_app: typer.Typer) -> None:
    """Add `adapt` to `fleet experiment`."""
    experiment_app.command("adapt")(experiment_adapt)
