"""The `fleet` command: look at the simulated worlds, train and evaluate the policy, run experiments.

Examples:
    fleet render --out runs/render            # a PNG strip per embodiment
    fleet experiment safety --n 1000 --json   # safety-layer stress test
    fleet pretrain --out runs/pretrain        # reproduce the shipped checkpoint
    fleet eval --embodiment franka --episodes 50 --shift actuator_bias --json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Multi-embodiment VLA fleet: simulate, train, evaluate, serve and adapt one policy across robot bodies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
experiment_app = typer.Typer(help="Experiments from the course notes; each takes --json and --out DIR.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for plots and tables.")]


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def render(
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNGs (one per embodiment + all.png).")] = Path(
        "runs/render"
    ),
    seed: Annotated[int, typer.Option(help="Episode seed.")] = 0,
    shift: Annotated[str | None, typer.Option(help="Distribution shift(s), e.g. 'lighting+distractors'.")] = None,
) -> None:
    """Write a strip of frames from one expert episode of each simulated robot, so you can see the worlds."""
    from fleet.sim.gallery import render_gallery

    try:
        paths = render_gallery(out, seed=seed, shift=shift)
    except ValueError as exc:
        _fail(str(exc))
    for p in paths:
        typer.echo(str(p))


@experiment_app.command("safety")
def experiment_safety(
    n: Annotated[int, typer.Option("--n", min=1, help="Random actions per embodiment.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_out: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Safety-layer stress test: push random (some NaN, some huge) actions through every embodiment's safety
    layer; report the share modified per constraint and plot the clipping distribution."""
    from fleet.experiments.safety import format_table, run_safety_experiment

    result = run_safety_experiment(n=n, seed=seed, out=out)
    if json_out:
        _emit_json(result)
        return
    typer.echo(format_table(result))
    if out is not None:
        typer.echo(f"wrote {out / 'safety_clipping.png'} and {out / 'safety_table.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
