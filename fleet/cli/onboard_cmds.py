"""`fleet experiment onboard` and `fleet embodiment add`: bringing a new robot body into the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import CkptOpt, JsonOpt, emit_json, fail, show

embodiment_app = typer.Typer(
    help="Robot bodies: add a new one to a running fleet (`fleet embodiment add --spec FILE`).",
    no_args_is_help=True,
)


def experiment_onboard(
    embodiment: Annotated[
        str, typer.Option("--embodiment", "-e", help="The new body (a simulated one the checkpoint lacks).")
    ] = "so100",
    demos: Annotated[
        str, typer.Option(help="Demonstration counts (episodes), increasing; each set contains the smaller.")
    ] = "10,25,50,100,200",
    episodes: Annotated[int, typer.Option(min=1, help="Unseen closed-loop episodes per success measurement.")] = 30,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of the shared run per demonstration count.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per optimizer step (both runs).")] = 32,
    lr: Annotated[float, typer.Option(min=0, help="AdamW learning rate (both runs).")] = 3e-3,
    like: Annotated[
        str | None, typer.Option(help="Pretrained body to warm-start the new head from (default: franka for so100).")
    ] = None,
    scratch: Annotated[bool, typer.Option(help="Also train the from-scratch baseline for the same wall time.")] = True,
    checkpoint: CkptOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of demonstrations, initialization and evaluation scenes.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (1 is fastest on a shared 2-core machine).")] = 1,
    json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for onboard.png and onboard.json.")] = None,
) -> None:
    """Success of a new body against the number of teleoperator demonstrations: the shipped backbone, frozen,
    plus a new token row, stem and head, against the same architecture trained from scratch on the same
    demonstrations for the same wall time. Other heads are checked bit-identical after every round.

    Examples:
        fleet experiment onboard --out runs/onboard
        fleet experiment onboard --demos 10,50 --episodes 10 --steps 50 --json
    """
    from fleet.experiments.onboard import format_table, run_onboard_experiment

    try:
        counts = tuple(int(x) for x in demos.split(",") if x.strip())
        if not counts or min(counts) < 1 or list(counts) != sorted(set(counts)):
            raise ValueError
    except ValueError:
        fail(f"--demos: expected increasing positive counts like 10,25,50,100,200, got {demos!r}")
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    try:
        result = run_onboard_experiment(
            embodiment,
            demos=counts,
            episodes=episodes,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            like=like,
            checkpoint=checkpoint,
            seed=seed,
            threads=threads,
            scratch=scratch,
            out=out,
            log=log,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    show(result, json_out, format_table, out and [out / "onboard.png", out / "onboard.json"])


def embodiment_add(
    spec_file: Annotated[Path, typer.Option("--spec", help="JSON spec of the new body (see below).")],
    namespace: Annotated[str | None, typer.Option(help="The fleet's namespace (default: the running fleet).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a robot body to the running fleet, without a restart: the policy server learns it when its first
    head is published; its robots start in demonstration mode (the operator drives; every chunk is stored as a
    demonstration), an onboarding learner trains its token row, stem and head every N demonstrations with the
    backbone frozen and publishes v1 once it clears a held-out check; then its robots run the policy.

    The spec file is one JSON object: the EmbodimentSpec fields (name, action_dim, head "token"|"flow",
    proprio_dim, action_low, action_high, max_velocity, max_force, control_hz, ...) plus "sim" (the simulator
    to drive, default the name), "like" (a pretrained body to warm-start from), "robots" (how many to start,
    default 2), "demos_per_round" (N, default 10), "check_episodes" and "check_success" (the held-out check).

    Example:
        fleet embodiment add --spec so100.json
    """
    from fleet.learning.onboard_spec import OnboardSpec, load_spec_file

    try:
        onboard = load_spec_file(spec_file)
    except (OSError, ValueError) as exc:
        fail(f"--spec: {exc}")
    assert isinstance(onboard, OnboardSpec)
    from fleet.cluster.onboard_live import add_embodiment_to_fleet

    try:
        result = add_embodiment_to_fleet(onboard, namespace=namespace)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"added {result['name']}: {result['robots']} robot(s) in demonstration mode; "
            f"the learner trains every {result['demos_per_round']} demonstrations (`fleet status` shows the phase)"
        )


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    """Add `experiment onboard` and the `embodiment` group."""
    experiment_app.command("onboard")(experiment_onboard)
    embodiment_app.command("add")(embodiment_add)
    app.add_typer(embodiment_app, name="embodiment")
