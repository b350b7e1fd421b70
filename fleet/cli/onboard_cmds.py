"""`fleet experiment onboard` and `fleet embodiment add`: bringing a new robot body into the fleet."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import CkptOpt, JsonOpt, emit_json, fail, show
from fleet.names import NAMESPACE

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
    steps: Annotated[
        int, typer.Option(min=1, help="Optimizer steps of the shared run per demonstration count.")
    ] = 1500,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per optimizer step (both runs).")] = 32,
    lr: Annotated[float, typer.Option(min=0, help="AdamW learning rate (both runs).")] = 3e-3,
    like: Annotated[
        str | None, typer.Option(help="Pretrained body to warm-start the new head from (default: franka for so100).")
    ] = None,
    scratch: Annotated[bool, typer.Option(help="Also train the from-scratch baseline for the same wall time.")] = True,
    noise: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Noise injected into executed demonstration actions (share of range; the stored chunks are the "
            "operator's intent), as the live plan's demo_noise does.",
        ),
    ] = 0.2,
    checkpoint: CkptOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of demonstrations, initialization and evaluation scenes.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (1 is fastest on a shared 2-core machine).")] = 1,
    json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for onboard.png and onboard.json.")] = None,
) -> None:
    """Success of a new body against the number of teleoperator demonstrations: the shipped backbone, frozen,
    plus a new token row, stem and head, against the same architecture trained from scratch on the same
    demonstrations for the same wall time. Other heads are checked bit-identical after every round. The
    default run takes about 30 minutes on 2 cores (1500 steps per count, and as long again for scratch).

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
            noise=noise,
            scratch=scratch,
            out=out,
            log=log,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    show(result, json_out, format_table, out and [out / "onboard.png", out / "onboard.json"])


def embodiment_add(
    spec_file: Annotated[Path, typer.Option("--spec", help="JSON spec of the new body (see above).")],
    namespace: Annotated[str | None, typer.Option(help="The fleet's namespace (default: the running fleet).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a robot body to the running fleet, without a restart: the policy server learns it when its first
    head is published. Its robots (robot actors `robot-NAME-i`) start in demonstration mode: the operator
    drives, and every chunk goes to the replay store as a correction with no policy action. An onboarding
    learner reads them there, trains the body's token row, stem and head with the backbone frozen (from M
    demonstrations on, taking in those that arrive while it trains, then every N more) and publishes v1 once
    it clears a held-out check; then the same robots run the policy, with the operator correcting. In a
    realtime fleet the robots demonstrate at the body's control rate (so100, 10 Hz: 2 robots give about 0.4
    demonstrations a second, and v1 comes 4-5 minutes after the add); in a fleet run
    flat out (`fleet up --sim`), as fast as the simulator steps, but on 2 cores the learner then gets few
    cycles (README "Adding a robot body").

    The spec file is one JSON object: the EmbodimentSpec fields (name, action_dim, head "token"|"flow",
    proprio_dim, action_low, action_high, max_velocity, max_force, control_hz, ...) plus "sim" (the simulator
    to drive, default the name), "like" (a pretrained body to warm-start from), "robots" (how many to start,
    default 2), "demo_noise" (0.2: noise injected into executed demonstration actions, a share of each
    dimension's range, so demonstrations show how to recover), "first_round_demos" (M, default 20: round 1
    starts then and takes in the demonstrations that arrive while it trains) and "first_round_steps" (1000),
    "demos_per_round" (N, default 10) and "steps_per_round" (300), "train_threads" (1, at the lowest CPU priority),
    "check_episodes" and "check_success" (the held-out check: 10 episodes, 0.8 to pass).

    Example:
        fleet embodiment add --spec so100.json
    """
    from fleet.learning.onboard_spec import load_spec_file

    try:
        onboard = load_spec_file(spec_file)
    except (OSError, ValueError) as exc:
        fail(f"--spec: {exc}")
    try:
        result = add_embodiment_to_fleet(onboard.to_dict(), namespace=namespace or NAMESPACE)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"added {result['embodiment']}: {result['robots']} robot(s) in demonstration mode\n"
            f"the learner starts at {result['first_round_demos']} demonstrations and takes in the rest as "
            f"they come;\nlater rounds every {result['demos_per_round']} more\n"
            "(`fleet embodiment status` shows the phase and the round)"
        )


def embodiment_spec(
    name: Annotated[str, typer.Argument(help="A simulated body not yet in the fleet, e.g. so100.")] = "so100",
    like: Annotated[str | None, typer.Option(help="Pretrained body to warm-start from.")] = "franka",
) -> None:
    """Print a spec file for a simulated body the package knows (fleet.embodiments.CATALOG), to edit and pass to
    `fleet embodiment add --spec`.

    Example:
        fleet embodiment spec so100 > so100.json
        fleet embodiment add --spec so100.json
    """
    import json

    from fleet.embodiments import CATALOG
    from fleet.learning.onboard_spec import OnboardSpec

    if name not in CATALOG:
        fail(f"name: {name!r} is not a simulated body waiting to be added; those are {sorted(CATALOG)}")
    plan = OnboardSpec(spec=CATALOG[name], sim=name, like=like)
    typer.echo(json.dumps(plan.to_dict(), indent=1))


def embodiment_status(
    namespace: Annotated[str | None, typer.Option(help="The fleet's namespace (default: the running fleet).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Phase (demonstrations / policy), head version, robots and training rounds of every added body.

    Example:
        fleet embodiment status
    """
    try:
        result = onboarding_status(namespace or NAMESPACE)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    show(result, json_out, format_status)


def embodiment_scale(
    counts: Annotated[str, typer.Argument(help="NAME=COUNT of an added body, e.g. so100=2.")],
    namespace: Annotated[str | None, typer.Option(help="The fleet's namespace (default: the running fleet).")] = None,
) -> None:
    """Set how many robots of an added body run (`fleet scale NAME=N` does the same). New robots start in the
    body's phase; removed ones finish their episode and deliver their records first.

    Example:
        fleet embodiment scale so100=4
    """
    import ray

    name, _, count = counts.partition("=")
    if not name or not count.isdigit():
        fail(f"counts: expected NAME=COUNT such as so100=2, got {counts!r}")
    try:
        actor = _onboarder(name, namespace or NAMESPACE)
        out = ray.get(actor.scale.remote(int(count)))
        change = ", ".join([f"+{r}" for r in out["added"]] + [f"-{r['id']}" for r in out["removed"]])
        typer.echo(f"{name}: {out['robots']} robot(s)" + (f" ({change})" if change else ""))
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))


def _connect(namespace: str):
    from fleet.cluster.launcher import FleetError, _require

    try:
        return _require(None, namespace)
    except FleetError as exc:
        raise RuntimeError(str(exc)) from None


def _onboarder(name: str, namespace: str):
    import ray

    from actors.onboarder import onboarder_name

    _connect(namespace)
    try:
        return ray.get_actor(onboarder_name(name), namespace=namespace)
    except ValueError:
        raise ValueError(f"no body {name!r} was added to the fleet in namespace {namespace!r}") from None


def add_embodiment_to_fleet(plan: dict, namespace: str = NAMESPACE) -> dict:
    """Start the onboarding actor of `plan` (OnboardSpec.to_dict()) in the running fleet; returns a summary."""
    added_at = time.time()  # the status's timeline counts from here
    import ray

    from actors.onboarder import start_onboarder

    controller = _connect(namespace)
    cfg = ray.get(controller.config.remote())
    if plan["name"] in (ray.get(controller.status.remote(3.0)).get("heads") or {}):
        raise ValueError(f"--spec: the fleet already serves a body named {plan['name']!r}")
    actor = start_onboarder(plan, cfg.get("checkpoint"), namespace, cfg["app_name"], fleet=cfg, added_at=added_at)
    status = ray.get(actor.status.remote())
    return {
        "embodiment": plan["name"],
        "robots": len(status["robots"]),
        "first_round_demos": status["plan"]["first_round_demos"],
        "demos_per_round": status["plan"]["demos_per_round"],
        "phase": status["phase"],
    }


def onboarding_status(namespace: str = NAMESPACE) -> dict:
    import ray

    from actors.onboarder import ONBOARD_PREFIX

    _connect(namespace)
    bodies = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(ONBOARD_PREFIX):
            actor = ray.get_actor(entry["name"], namespace=namespace)
            bodies[entry["name"][len(ONBOARD_PREFIX) :]] = ray.get(actor.status.remote())
    return {"namespace": namespace, "bodies": bodies}


def format_status(result: dict) -> str:
    if not result["bodies"]:
        return "no bodies added (fleet embodiment add --spec FILE)"
    lines = [f"{'body':<10} {'phase':<15} {'head':>5} {'demos':>6} {'robots':>7} {'policy eps':>11} {'succ':>6}"]
    for name, s in sorted(result["bodies"].items()):
        eps = sum(r["policy_episodes"] for r in s["robots"])
        ok = sum(r["policy_successes"] for r in s["robots"])
        succ = f"{ok / eps:.0%}" if eps else "-"
        lines.append(
            f"{name:<10} {s['phase']:<15} {'v' + str(s['head_version']):>5} {s['demos']:>6} {len(s['robots']):>7} "
            f"{eps:>11} {succ:>6}"
        )
        timeline = s.get("timeline") or {}
        if timeline:
            names = {"robots": "robots", "first_round": "round 1", "v1": "v1", "first_policy_episode": "policy episode"}
            marks = ", ".join(f"{names.get(k, k)} {v:.0f} s" for k, v in timeline.items())
            lines.append(f"  since the add: {marks}")
        for r in s["rounds"]:
            lines.append(
                f"  round {r['round']}: {r['demos']} demos, {r['steps']} steps, {r['train_s']:.0f} s, "
                f"held-out {r['check_success']:.0%}" + (f", published v{r['published']}" if r["published"] else "")
            )
        t = s.get("training")
        if t:
            what = (
                f"training, {t['done']} / {t['steps']} steps on {t.get('demos', '?')} demos"
                if t["stage"] == "training"
                else f"{t['steps']} steps done, held-out check"
            )
            lines.append(f"  round {t['round']}: {what}, {t['elapsed_s']:.0f} s so far")
        latched = [r["robot"] for r in s["robots"] if r.get("estop_latched")]
        if latched:
            lines.append(f"  e-stop latched: {', '.join(latched)}; once clear: fleet estop reset {latched[0]}")
    return "\n".join(lines)


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    """Add `experiment onboard` and the `embodiment` group."""
    experiment_app.command("onboard")(experiment_onboard)
    embodiment_app.command("spec")(embodiment_spec)
    embodiment_app.command("add")(embodiment_add)
    embodiment_app.command("status")(embodiment_status)
    embodiment_app.command("scale")(embodiment_scale)
    app.add_typer(embodiment_app, name="embodiment")
