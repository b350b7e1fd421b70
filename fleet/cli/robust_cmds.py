"""`fleet experiment robustness` (every body x everyday shift: success and OOD detection) and
`fleet robust-finetune` (a checkpoint continued on augmented batches); registered by `register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import CkptOpt, JsonOpt, OutOpt, fail, show
from fleet.embodiments import EMBODIMENTS
from fleet.sim import parse_shift


def experiment_robustness(
    checkpoint: CkptOpt = None,
    bodies: Annotated[
        str, typer.Option(help="Comma-separated embodiments (default: every one the checkpoint has).")
    ] = "",
    shifts: Annotated[
        str, typer.Option(help="Comma-separated shifts; 'none' is the unshifted baseline the AUROC compares against.")
    ] = "none,lighting,camera_offset,distractors",
    episodes: Annotated[
        int, typer.Option(min=0, help="Closed-loop episodes per body x shift (0: detection only).")
    ] = 200,
    ood_episodes: Annotated[
        int, typer.Option(min=0, help="First observations per body x shift scored for detection (0: skip).")
    ] = 200,
    image_stats_episodes: Annotated[
        int, typer.Option(min=2, help="Clean expert episodes (training-side seeds) the raw-image detector is fit on.")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Evaluation seed block (as `fleet eval --seed`).")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (2 only on an otherwise idle machine).")] = 1,
    json_out: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Success of one checkpoint on every body under each everyday shift (lighting, a knocked camera,
    clutter), and per-shift AUROC of the OOD signals from each episode's first observation: the backbone
    feature distance the fleet's confidence uses, and raw-image statistics (fleet.control.image_ood).

    Examples:
        fleet experiment robustness --episodes 200 --seed 3 --out runs/robustness
        fleet experiment robustness --episodes 0 --ood-episodes 100 --json
    """
    import torch

    from fleet.control.image_ood import fit_image_stats
    from fleet.experiments.robustness import format_table, run_robustness
    from fleet.policy.default import load_policy

    torch.set_num_threads(threads)
    try:
        shift_list = [s.strip() for s in shifts.split(",") if s.strip()]
        for s in shift_list:
            parse_shift(s)
        if "none" not in shift_list and ood_episodes:
            fail("--shifts: detection needs 'none' among the shifts (the unshifted side of the AUROC)")
        model, meta = load_policy(checkpoint)
        body_list = [b.strip() for b in bodies.split(",") if b.strip()] or list(model.specs)
        unknown = [b for b in body_list if b not in model.specs or b not in EMBODIMENTS]
        if unknown:
            fail(f"--bodies: {unknown} not in the checkpoint; it has {sorted(model.specs)}")
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    image_stats = {b: fit_image_stats(b, image_stats_episodes, seed=777) for b in body_list} if ood_episodes else {}
    result = run_robustness(
        model, meta, body_list, shift_list, episodes, seed, ood_episodes, image_stats=image_stats, log=log
    )
    wrote = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "robustness.json").write_text(json.dumps(result, indent=1))
        (out / "robustness.md").write_text(format_table(result) + "\n")
        wrote = [out / "robustness.json", out / "robustness.md"]
    show(result, json_out, format_table, wrote)


def robust_finetune_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for the fine-tuned policy.safetensors/policy.json.")],
    checkpoint: CkptOpt = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps on augmented batches.")] = 1000,
    demo_episodes: Annotated[int, typer.Option(min=1, help="Fresh expert episodes per body (half noisy).")] = 400,
    dagger_episodes: Annotated[
        int, typer.Option(min=0, help="Episodes per body driven by the checkpoint, relabelled by the expert.")
    ] = 150,
    lr: Annotated[float, typer.Option(min=1e-6, max=0.1, help="Peak learning rate (warm-up, cosine decay).")] = 3e-4,
    seed: Annotated[int, typer.Option(help="Collection and batch seed (7: scenes pretraining never saw).")] = 7,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
    augment_p: Annotated[
        str,
        typer.Option(
            "--augment-p",
            help="Share of rows that get each shift, e.g. 'lighting=0, offset=0.35, clutter=0.2' (unnamed: "
            "lighting 0.4, offset 0.4, clutter 0.25). A per_image checkpoint needs no lighting rows.",
        ),
    ] = "",
    json_out: JsonOpt = False,
) -> None:
    """Make a trained checkpoint robust to everyday shifts without retraining it: continue it on fresh
    demonstrations with every batch under random lighting, camera offsets and clutter (fleet.policy.augment;
    ranges stop short of the `lighting`, `camera_offset` and `distractors` evaluation shifts). The full
    recipe with the same augmentation from scratch is `fleet pretrain --augment`.

    Examples:
        fleet robust-finetune --out runs/robust
        fleet experiment robustness --checkpoint runs/robust --seed 3
    """
    from fleet.policy.augment import AugmentConfig, parse_augment_shares
    from fleet.policy.default import load_policy
    from fleet.policy.robust import RobustConfig, robust_finetune

    try:
        cfg = RobustConfig(
            augment=AugmentConfig(**parse_augment_shares(augment_p)),
            steps=steps,
            demo_episodes=demo_episodes,
            dagger_episodes=dagger_episodes,
            lr=lr,
            warmup=min(50, steps // 10),
            seed=seed,
            threads=threads,
        )
        model, meta = load_policy(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    _, report = robust_finetune(model, meta, cfg, out=out, log=log)
    summary = {"out": str(out), "seconds": report["seconds"], "samples": report["samples"]}
    if json_out:
        from fleet.cli.options import emit_json

        emit_json(summary)
    else:
        typer.echo(f"wrote {out}/policy.safetensors in {report['seconds'] / 60:.1f} min")


def image_stats_cmd(
    checkpoint: CkptOpt = None,
    bodies: Annotated[str, typer.Option(help="Comma-separated embodiments (default: every one it has).")] = "",
    episodes: Annotated[
        int, typer.Option(min=2, help="Clean expert episodes per body the statistics are fit on.")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Collection seed (777: training-side scenes, not an eval block).")] = 777,
) -> None:
    """Fit the camera-image novelty statistics (fleet/control/image_ood.py) on clean expert frames and store
    them in the checkpoint's metadata. `fleet up`'s robots then flag a dimmed light, a knocked camera or
    clutter from the first frame and slow down (degradation: conservative), as they do for novel features.

    Examples:
        fleet robust-image-stats                      # the shipped checkpoint
        fleet robust-image-stats --checkpoint runs/robust --episodes 100
    """
    from fleet.cluster.launcher import FleetError, checkpoint_meta
    from fleet.control.image_ood import fit_image_stats, write_image_stats

    try:
        _, meta = checkpoint_meta(None if checkpoint is None else str(checkpoint))
    except FleetError as exc:
        fail(str(exc))
    served = list(meta.get("embodiments") or {})
    body_list = [b.strip() for b in bodies.split(",") if b.strip()] or [b for b in served if b in EMBODIMENTS]
    unknown = [b for b in body_list if b not in served or b not in EMBODIMENTS]
    if unknown:
        fail(f"--bodies: {unknown} not simulated bodies of the checkpoint; it has {sorted(served)}")
    stats = {}
    for body in body_list:
        typer.echo(f"{body}: fitting on {episodes} clean expert episodes (seed {seed})")
        stats[body] = fit_image_stats(body, episodes, seed=seed)
    typer.echo(f"wrote extra.image_stats for {', '.join(body_list)} to {write_image_stats(checkpoint, stats)}")


def register(experiment_app: typer.Typer, app: typer.Typer | None = None) -> None:
    """Add `robustness` to `fleet experiment`, `robust-finetune` and `robust-image-stats` to `fleet`."""
    experiment_app.command("robustness")(experiment_robustness)
    if app is not None:
        app.command("robust-finetune")(robust_finetune_cmd)
        app.command("robust-image-stats")(image_stats_cmd)
