"""The `fleet` command: look at the simulated worlds, train and evaluate the policy, run experiments.

Examples:
    fleet render --out runs/render            # a PNG strip per embodiment
    fleet experiment safety --n 1000 --json   # safety-layer stress test
    fleet pretrain --out runs/pretrain        # reproduce the shipped checkpoint
    fleet eval --embodiment franka --episodes 50 --shift actuator_bias --json
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli import adapt_cmds, control_cmds, fleet_cmds, infer_cmds, latency_cmds, onboard_cmds, robust_cmds
from fleet.cli.help_text import fold_long_words, reflow_app
from fleet.cli.options import CkptOpt, JsonOpt, OutOpt, emit_json, fail, show
from fleet.embodiments import EMBODIMENTS
from fleet.policy.openmp import set_omp_wait_policy
from fleet.sim import parse_shift
from fleet.sim.gallery import render_gallery

app = typer.Typer(
    help="Multi-embodiment VLA fleet: simulate, train, evaluate, serve and adapt one policy across robot bodies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
experiment_app = typer.Typer(
    help="Experiments from the course notes; each takes --json and --out DIR.", no_args_is_help=True
)
app.add_typer(experiment_app, name="experiment")
bench_app = typer.Typer(
    help="Benchmarks that print measured figures; each takes --json and --out DIR.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@app.command()
def render(
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNGs (one per embodiment + all.png).")] = Path(
        "runs/render"
    ),
    seed: Annotated[int, typer.Option(help="Episode seed.")] = 0,
    shift: Annotated[str | None, typer.Option(help="Distribution shift(s), e.g. 'lighting+distractors'.")] = None,
) -> None:
    """Write a strip of frames from one expert episode of each simulated robot, so you can see the worlds."""

    try:
        paths = render_gallery(out, seed=seed, shift=shift)
    except ValueError as exc:
        fail(str(exc))
    for p in paths:
        typer.echo(str(p))


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", help="Directory for policy.safetensors/policy.json.")] = Path(
        "runs/pretrain"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (DAgger rounds included).")] = 6000,
    batch_size: Annotated[int, typer.Option(min=4, help="Rows per step, split evenly over embodiments.")] = 64,
    demo_episodes: Annotated[int, typer.Option(min=1, help="Expert episodes per embodiment before DAgger.")] = 1500,
    dagger_rounds: Annotated[int, typer.Option(min=0, help="Rounds of policy rollouts relabelled by the expert.")] = 4,
    dagger_episodes: Annotated[int, typer.Option(min=0, help="Policy-driven episodes per embodiment per round.")] = 250,
    dagger_samples: Annotated[
        int, typer.Option(min=0, help="Flow samples per DAgger rollout call; 0 = as the fleet runs them (4).")
    ] = 0,
    mix: Annotated[
        str,
        typer.Option(
            help="Relative rows per embodiment in a batch, e.g. 'franka=1,aloha=1.75,hello=0.25,leap=1.25'; "
            "'even' splits evenly (the shipped recipe)."
        ),
    ] = "even",
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and batches.")] = 0,
    eval_episodes: Annotated[int, typer.Option(min=0, help="Closed-loop episodes per embodiment afterwards.")] = 50,
    threads: Annotated[
        int, typer.Option(min=1, help="Torch threads: 2 on a quiet 2-core machine; 1 when other work shares it.")
    ] = 2,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Data-parallel training processes, each on threads/workers torch threads (default: one per "
            "thread, up to 2, when every embodiment's rows split evenly; else 1).",
        ),
    ] = None,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Random lighting, camera offsets and clutter on every training batch (fleet.policy.augment; "
            "ranges stop short of the `lighting`, `camera_offset` and `distractors` evaluation shifts).",
        ),
    ] = False,
    augment_p: Annotated[
        str,
        typer.Option(
            "--augment-p",
            help="With --augment: the share of rows that get each shift, e.g. 'lighting=0, offset=0.35, clutter=0.2' "
            "(unnamed shifts keep their defaults: lighting 0.4, offset 0.4, clutter 0.25).",
        ),
    ] = "",
    image_norm: Annotated[
        str,
        typer.Option(
            help="How a frame becomes the encoder's input: 'per_image' (each frame's own per-channel mean and "
            "spread, so a dimmer or colour-cast camera looks the same) or 'fixed' (one affine map for all).",
        ),
    ] = "fixed",
    json_out: JsonOpt = False,
) -> None:
    """Train the multi-embodiment policy from scratch on teleoperator demonstrations of all four sims
    (behaviour cloning with noise-injected demos and DAgger), then evaluate it closed loop.

    `fleet pretrain --out fleet/checkpoints` reruns the shipped checkpoint's recipe (27:08 on 2 quiet cores
    in two data-parallel processes with `--eval-episodes 0`; the README lists other recipes, timed, and what
    each reaches).
    """
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.policy.augment import AugmentConfig, parse_augment_shares
    from fleet.policy.evaluate import evaluate
    from fleet.policy.train import PretrainConfig, chunk_policy, default_workers
    from fleet.policy.train import pretrain as run_pretrain

    try:
        cfg = PretrainConfig(
            steps=steps,
            batch_size=batch_size,
            mix=_parse_mix(mix),
            demo_episodes=demo_episodes,
            dagger_rounds=dagger_rounds,
            dagger_episodes=dagger_episodes,
            dagger_samples=dagger_samples or None,
            seed=seed,
            threads=threads,
            augment=AugmentConfig(**parse_augment_shares(augment_p)) if augment else None,
        )
        if augment_p and not augment:
            raise ValueError("--augment-p: needs --augment (the shares apply to augmented training)")
        cfg = replace(
            cfg,
            workers=default_workers(cfg) if workers is None else workers,
            policy=replace(cfg.policy, image_norm=image_norm),
        )
    except ValueError as exc:
        fail(str(exc))
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    model, report, _ = run_pretrain(cfg, out=out, progress=not json_out, log=log)
    results = {}
    for name in cfg.embodiments:
        if eval_episodes:
            results[name] = evaluate(chunk_policy(model), name, eval_episodes).to_dict()
            log(f"eval {name}: success {results[name]['success_rate']:.0%} over {eval_episodes} episodes")
    summary = {"out": str(out), "seconds": report.seconds, "samples": report.samples, "eval": results}
    if json_out:
        emit_json(summary)
    else:
        typer.echo(f"wrote {out}/policy.safetensors in {report.seconds / 60:.1f} min")


def _parse_mix(text: str) -> dict[str, float] | None:
    """'franka=1,leap=1.5' -> {"franka": 1.0, "leap": 1.5}; 'even' -> None."""
    if text.strip().lower() == "even":
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--mix: expected NAME=WEIGHT pairs like 'leap=1.5', got {part!r}")
    return out


@app.command("eval")
def eval_cmd(
    embodiment: Annotated[str, typer.Option("--embodiment", "-e", help="franka | aloha | hello | leap.")],
    episodes: Annotated[int, typer.Option(min=1, help="Closed-loop episodes (unseen seeds).")] = 50,
    shift: Annotated[str | None, typer.Option(help="Distribution shift(s), e.g. 'actuator_bias'.")] = None,
    checkpoint: CkptOpt = None,
    seed: Annotated[int, typer.Option(help="Evaluation seed block (the scenes, and the flow heads' noise).")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Closed-loop success of the policy on one embodiment, with chunk recycling and the safety layer."""
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.policy.default import load_policy
    from fleet.policy.evaluate import evaluate
    from fleet.policy.train import chunk_policy

    if embodiment not in EMBODIMENTS:
        fail(f"--embodiment: unknown {embodiment!r}; known: {sorted(EMBODIMENTS)}")
    try:
        parse_shift(shift)
        model, _ = load_policy(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if embodiment not in model.specs:
        fail(f"the checkpoint has no head for {embodiment!r} (it has {sorted(model.specs)})")
    import torch

    # the flow heads' noise is seeded by --seed too, so the same command gives the same figure
    noise = torch.Generator().manual_seed(seed)
    result = evaluate(chunk_policy(model, generator=noise), embodiment, episodes, shift=shift, seed=seed).to_dict()
    if json_out:
        emit_json(result)
        return
    typer.echo(
        f"{embodiment} shift={shift or 'none'}: success {result['success_rate']:.1%} over {episodes} episodes, "
        f"mean {result['mean_steps']:.1f} steps"
    )
    if result["estop_trips"]:
        typer.echo(f"force e-stop tripped in {result['estop_trips']} episode(s); each counts as a failure")


@experiment_app.command("safety")
def experiment_safety(
    n: Annotated[int, typer.Option("--n", min=1, help="Random actions per embodiment.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_out: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Safety-layer stress test: push random (some NaN, some huge) actions through every embodiment's safety
    layer; report the share modified per constraint and plot the clipping distribution."""
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.experiments.safety import format_table, run_safety_experiment

    result = run_safety_experiment(n=n, seed=seed, out=out)
    show(result, json_out, format_table, out and [out / "safety_clipping.png", out / "safety_table.md"])


@experiment_app.command("transfer")
def experiment_transfer(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for each of the three trainings.")] = 1500,
    episodes: Annotated[int, typer.Option(min=1, help="Closed-loop evaluation episodes per embodiment.")] = 50,
    demo_episodes: Annotated[int, typer.Option(min=1, help="Expert episodes per embodiment.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads for the trainings.")] = 2,
    json_out: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Train one backbone on hello (3-DOF) + franka (7-DOF) with embodiment tokens, and each alone, at equal
    steps; report closed-loop success for each and plot it. Does cross-robot training help?"""
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.experiments.transfer import format_table, run_transfer_experiment

    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    result = run_transfer_experiment(
        steps=steps, episodes=episodes, demo_episodes=demo_episodes, seed=seed, out=out, log=log, threads=threads
    )
    show(result, json_out, format_table, out and [out / "transfer.png"])


@app.command("export-corrections")
def export_corrections_cmd(
    out: Annotated[Path, typer.Argument(help="Dataset directory to create (LeRobot-style layout).")],
    log_dir: Annotated[Path, typer.Option("--log-dir", help="The replay actor's corrections log directory.")] = Path(
        "runs/fleet/corrections"
    ),
    embodiment: Annotated[
        str | None, typer.Option(help="Export one body only (fixed feature shapes, LeRobot-loadable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty OUT.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the fleet's corrections as a LeRobot-style dataset for offline training:
    OUT/data/chunk-000/file-000.parquet, OUT/meta/info.json, OUT/meta/tasks.parquet, OUT/meta/episodes/...

    One LeRobot v3.0 dataset per embodiment: OUT itself for one body, OUT/<embodiment>/ each for several (listed in
    OUT/export.json); LeRobot's LeRobotDataset(repo_id, root=...) loads each offline.

    Example: fleet export-corrections runs/dataset --log-dir runs/fleet/corrections --embodiment franka
    """
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.data.export import export_corrections

    if not log_dir.is_dir():
        fail(f"--log-dir: {log_dir} is not a directory (the corrections log the replay actor writes)")
    try:
        summary = export_corrections(log_dir, out, embodiment=embodiment, overwrite=overwrite)
    except (ValueError, FileExistsError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(summary)
        return
    typer.echo(json.dumps(summary, indent=1, default=str))


@bench_app.command("serve")
def bench_serve(
    robots: Annotated[str, typer.Option(help="Comma-separated concurrent robot counts.")] = "1,4,16,64",
    seconds: Annotated[float, typer.Option(min=0.1, help="Seconds measured per robot count.")] = 5.0,
    checkpoint: CkptOpt = None,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1000.0,
            help="How long a server batch waits for more requests after its first (ServeConfig.batch_wait_timeout_s).",
        ),
    ] = 0.0,
    gather_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=100.0,
            help="How long a batch waits for the robots just answered to ask again (ServeConfig.gather_s); 0 = off.",
        ),
    ] = 4.0,
    route: Annotated[
        str,
        typer.Option(
            help="How the simulated robots reach the replica: 'direct' (its TCP socket, the fleet's default), "
            "'handle' (Serve handle calls) or 'direct,handle' (both, side by side at every count); 'openpi,peer': "
            "our openpi endpoint against openpi's own server design (inline infer, no batching), same clients.",
        ),
    ] = "direct",
    repeats: Annotated[int, typer.Option(min=1, help="openpi,peer: alternating windows per route and count.")] = 3,
    restarts: Annotated[
        int,
        typer.Option(
            min=1,
            help="openpi,peer: start both servers afresh this many times and pool the windows (a process's "
            "speed varies by a few percent from one start to the next).",
        ),
    ] = 1,
    device: Annotated[
        str,
        typer.Option(help="Where the replica and the raw forward compute: cpu, cuda or cuda:N (ServeConfig.device)."),
    ] = "cpu",
    client_python: Annotated[
        str | None,
        typer.Option(
            "--client-python",
            envvar="FLEET_OPENPI_PYTHON",
            help="openpi,peer: a python with openpi-client; its WebsocketClientPolicy is then the client.",
        ),
    ] = None,
    json_out: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Serving throughput and latency at several fleet sizes, next to the raw in-process batched forward at
    the same batch sizes (ratio = served / raw), measured side by side in one run."""
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.bench.serve import ROUTES, format_table, run_serve_bench, write_plot
    from fleet.serving.device import DEVICE_HELP, PATTERN

    if not PATTERN.match(device):
        fail(f"--device: expected {DEVICE_HELP}, got {device!r}")
    routes = tuple(r.strip() for r in route.split(",") if r.strip())
    if set(routes) <= {"openpi", "peer"} and routes:
        return _bench_openpi(robots, seconds, checkpoint, repeats, restarts, client_python, json_out)
    if not routes or any(r not in ROUTES for r in routes):
        fail(f"--route: expected 'direct', 'handle', 'direct,handle' or 'openpi,peer', got {route!r}")

    try:
        counts = tuple(int(x) for x in robots.split(",") if x.strip())
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        fail(f"--robots: expected comma-separated positive ints like 1,4,16,64, got {robots!r}")
    # Ray prints "(raylet) ..." lines to stdout while Serve shuts down: with --json stdout is the JSON alone
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    with quiet:
        result = run_serve_bench(
            robot_counts=counts,
            seconds_per_point=seconds,
            checkpoint=checkpoint,
            batch_wait_timeout_s=batch_wait_ms / 1e3,
            server={"gather_s": gather_ms / 1e3, "device": device},
            routes=routes,
        )
    if out is not None:
        write_plot(result, out)
    show(result, json_out, format_table)


def _bench_openpi(
    robots: str, seconds: float, checkpoint, repeats: int, restarts: int, client_python, json_out: bool
) -> None:
    from fleet.bench.openpi_bench import format_openpi_table, run_openpi_bench

    try:
        counts = tuple(int(x) for x in robots.split(",") if x.strip())
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        fail(f"--robots: expected comma-separated positive ints like 1,4,16, got {robots!r}")
    if client_python is not None and not Path(client_python).exists():
        fail(f"--client-python: {client_python} does not exist")
    quiet = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    with quiet:
        result = run_openpi_bench(
            counts, seconds, repeats, checkpoint=checkpoint, client_python=client_python, restarts=restarts
        )
    show(result, json_out, format_openpi_table)


# up / scale / status / down; bench infer and experiment quantize; experiment adapt (after the commands above,
# so --help lists them in the same order as ever)
fleet_cmds.register(app)
infer_cmds.register(bench_app, experiment_app)
adapt_cmds.register(experiment_app)
latency_cmds.register(experiment_app, app)
control_cmds.register(bench_app)
onboard_cmds.register(app, experiment_app)
robust_cmds.register(experiment_app, app)
reflow_app(app)  # prose paragraphs of every --help wrap at the terminal's width (fleet/cli/help_text.py)
fold_long_words()  # a long path or option name in a narrow help column wraps instead of ending in "…"


def main() -> None:
    """The `fleet` console script: set how OpenMP waits (before any command imports torch), then run."""

    set_omp_wait_policy(sys.argv)
    app()
