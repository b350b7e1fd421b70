"""`fleet experiment latency`: execution modes under injected inference delay (registered by `register`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import CkptOpt, JsonOpt, fail, show
from fleet.embodiments import EMBODIMENTS


def _ints(option: str, text: str, lo: int) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
        if not values or min(values) < lo:
            raise ValueError
    except ValueError:
        fail(f"{option}: expected comma-separated ints >= {lo}, like 0,1,2, got {text!r}")
    return values


def experiment_latency(
    embodiments: Annotated[str, typer.Option("--embodiments", help="Comma-separated bodies.")] = "aloha,leap",
    delays: Annotated[
        str, typer.Option("--delays", help="Inference delays in control ticks (a reply to tick t arrives at t + d).")
    ] = "0,1,2,3,4",
    replan: Annotated[str, typer.Option("--replan", help="Replanning intervals in ticks (recompute_every).")] = "1,2,4",
    modes: Annotated[
        str, typer.Option("--modes", help="Execution modes: latest, weighted, temporal_ensemble, rtc.")
    ] = "latest,weighted,temporal_ensemble,rtc",
    align: Annotated[
        str,
        typer.Option(
            "--align",
            help="Where a late chunk starts: time (action i at obs tick + i), arrival (its first action first, "
            "the robots' default). rtc runs time-aligned only.",
        ),
    ] = "time,arrival",
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="checkpoint (the policy at --checkpoint) or expert: the simulator's expert plans every chunk, "
            "the ceiling of each mode (in rtc it continues the committed prefix perfectly).",
        ),
    ] = "checkpoint",
    episodes: Annotated[int, typer.Option(min=1, help="Unseen episodes per cell.")] = 200,
    token_episodes: Annotated[
        int | None, typer.Option(min=1, help="Episodes per cell for token-head bodies (default: --episodes).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed block of the unseen scenes (tuning used others).")] = 11,
    checkpoint: CkptOpt = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (1 on a shared machine).")] = 1,
    no_cost: Annotated[bool, typer.Option("--no-cost", help="Skip timing RTC against plain sampling.")] = False,
    json_out: JsonOpt = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for latency.json, latency.txt and the two plots.")
    ] = None,
) -> None:
    """How each execution mode copes when the policy's reply arrives `delay` ticks after its observation.

    Robots run the real buffer and safety layer in sim mode; a reply is held back exactly `delay` ticks, so
    every cell is reproducible. Per (body, mode, delay, replan): success on unseen scenes, mean seam jump
    (the change of the action planned for the switch tick, share of range), mean jerk of the commands sent;
    and the flow head's cost with RTC guidance over plain sampling at batch 1 and 64.

    Modes: latest (the new chunk replaces the plan), weighted (cross-fade), temporal_ensemble (ACT's average),
    rtc (the request carries the plan and its committed delay; the policy continues it; no blending).
    Rows named mode@arrival start a late chunk with its first action (the robots' default) instead of skipping
    the ticks that passed; the two are identical at delay 0. --policy expert runs the simulator's expert instead
    of the checkpoint: what each mode could reach with perfect chunks.

    Examples:
        fleet experiment latency --embodiments leap --delays 0,2 --replan 4 \\
            --episodes 50
        fleet experiment latency --delays 0,2,3 --replan 2,4 --episodes 200 \\
            --json --out runs/latency
        fleet experiment latency --embodiments franka --delays 1,2 --replan 4 \\
            --modes latest --align arrival --episodes 50
        fleet experiment latency --policy expert --embodiments franka,aloha \\
            --delays 0,3 --replan 4 --modes latest,rtc
    """
    from fleet.control import ALIGNS
    from fleet.experiments.latency import MODES, format_table, run_latency_experiment

    names = tuple(n.strip() for n in embodiments.split(",") if n.strip())
    unknown = [n for n in names if n not in EMBODIMENTS]
    if not names or unknown:
        fail(f"--embodiments: unknown {unknown or embodiments!r}; known: {sorted(EMBODIMENTS)}")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in MODES for m in chosen):
        fail(f"--modes: expected some of {','.join(MODES)}, got {modes!r}")
    aligns = tuple(a.strip() for a in align.split(",") if a.strip())
    if not aligns or any(a not in ALIGNS for a in aligns):
        fail(f"--align: expected some of {','.join(ALIGNS)}, got {align!r}")
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    try:
        result = run_latency_experiment(
            names,
            delays=_ints("--delays", delays, 0),
            replans=_ints("--replan", replan, 1),
            modes=chosen,
            aligns=aligns,
            policy=policy,
            episodes=episodes,
            token_episodes=token_episodes,
            seed=seed,
            checkpoint=checkpoint,
            threads=threads,
            cost=not no_cost,
            out=out,
            log=log,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    files = out and [out / "latency.json", out / "latency_success.png", out / "latency_seam.png"]
    show(result, json_out, format_table, files)


def rtc_finetune_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for the new policy.safetensors/policy.json.")],
    checkpoint: CkptOpt = None,
    embodiments: Annotated[str, typer.Option("--embodiments", help="Comma-separated bodies to teach.")] = "aloha,leap",
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per body the policy runs rtc in (DAgger rows).")] = 300,
    clean_episodes: Annotated[
        int, typer.Option(min=0, help="Expert episodes per body whose states keep the no-delay behaviour.")
    ] = 300,
    steps: Annotated[
        int, typer.Option(min=1, help="Training steps per head and round (cached backbone output).")
    ] = 3000,
    rounds: Annotated[int, typer.Option(min=1, help="DAgger rounds: collect with the head so far, train again.")] = 4,
    delays: Annotated[str, typer.Option("--delays", help="Delays in ticks, one drawn per episode.")] = "0,1,2,3",
    replan: Annotated[
        str,
        typer.Option(
            "--replan",
            help="Replanning intervals in ticks, one drawn per episode (default: each body's own `recompute_every`"
            " and half of it, 2,4 for the four sims).",
        ),
    ] = "",
    lr: Annotated[
        float, typer.Option("--lr", help="The head's peak learning rate each round (AdamW, decaying to a tenth).")
    ] = 1e-3,  # rtc_round.RTC_LR (a test keeps the two equal; importing rtc_round here would slow every command)
    seed: Annotated[int, typer.Option(help="Collection seed (scenes apart from every eval block).")] = 92_000,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Teach heads to continue a committed prefix (training-time real-time chunking, arXiv 2512.05964) and
    write the result as a new checkpoint; the shipped one is unchanged.

    Per body and round: the policy (as trained so far) runs `rtc` under a delay and a replanning interval drawn per
    episode, and every request becomes a row (the observation, the committed prefix as the safety layer sends it,
    the simulator expert's chunk that starts with it); clean expert states come in the first round. The head alone
    trains on all rows so far, the committed steps given, not predicted; the backbone and every other head stay
    bit-identical. A flow head trained this way clamps the committed steps while sampling instead of guiding (no
    vector-Jacobian product). The robots' default execution (`latest`, late chunks started on arrival) gains most
    from the result; `fleet up --aggregate rtc` runs real-time chunking on it.

    Examples:
        fleet rtc-finetune --out runs/rtc
        fleet rtc-finetune --embodiments franka --episodes 100 --steps 500 \\
            --out runs/rtc-franka
        fleet rtc-finetune --embodiments leap --replan 1,2,4 --out runs/rtc-leap
        fleet experiment latency --checkpoint runs/rtc --embodiments aloha,leap \\
            --modes rtc --align time --delays 0,1,2,3 --replan 4
    """
    import torch

    from fleet.learning.rtc_round import rtc_finetune
    from fleet.policy.default import load_policy

    torch.set_num_threads(threads)
    names = tuple(n.strip() for n in embodiments.split(",") if n.strip())
    unknown = [n for n in names if n not in EMBODIMENTS]
    if not names or unknown:
        fail(f"--embodiments: expected simulated bodies ({', '.join(sorted(EMBODIMENTS))}), got {embodiments!r}")
    delay_list = _ints("--delays", delays, 0)
    replans = _ints("--replan", replan, 1) if replan.strip() else None
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr: expected a positive finite number, got {lr}")
    for n in names if replans else ():
        if max(replans) > EMBODIMENTS[n].chunk_size:
            fail(f"--replan: expected intervals of at most {n}'s chunk size, {EMBODIMENTS[n].chunk_size}, got {replan}")
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    try:
        model, meta = load_policy(checkpoint)
        result = rtc_finetune(
            model, meta, names, episodes, clean_episodes, steps, delay_list, seed, out, log, rounds, replans, lr
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if json_out:
        from fleet.cli.options import emit_json

        emit_json(result)
        return
    header = f"{'body':8s} {'rows':>6s} {'committed':>9s} {'policy ok':>9s} {'collect s':>9s} {'train s':>8s}"
    typer.echo(f"{header} {'replan':>7s}")
    for name, b in result["bodies"].items():
        typer.echo(
            f"{name:8s} {b['rows']:6d} {b['committed_rows']:9d} {b['policy_success'][-1]:9.0%} "
            f"{b['collect_s']:9.0f} {b['train_s']:8.0f} {','.join(map(str, b['replans'])):>7s}"
        )
    typer.echo(f"wrote {out}/policy.safetensors in {result['seconds'] / 60:.1f} min")


def register(experiment_app: typer.Typer, app: typer.Typer | None = None) -> None:
    """Add `latency` to `fleet experiment`, and `rtc-finetune` to `fleet`."""
    experiment_app.command("latency")(experiment_latency)
    if app is not None:
        app.command("rtc-finetune")(rtc_finetune_cmd)
