"""`fleet bench infer` and `fleet experiment quantize`: the inference-optimization measurements (fleet/bench/infer.py).

Registered by fleet/cli/__init__.py (`register`); torch and the simulators load only when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.options import BenchCkptOpt, JsonOpt, OutOpt, emit_json, fail

RandomOpt = Annotated[
    bool,
    typer.Option("--random-init", help="Benchmark a randomly initialised model of the shipped size (timings only)."),
]


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
        if not values or min(values) < 1:
            raise ValueError
    except ValueError:
        fail(f"{option}: expected comma-separated positive ints like 1,64, got {text!r}")
    return values


def _names(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _emit(result: dict, json_out: bool, out: Path | None, table: str, stem: str) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.txt").write_text(table + "\n")
    if json_out:
        emit_json(result)
    else:
        typer.echo(table)


def _run(techniques: tuple[str, ...], checkpoint, batch: str, episodes, embodiments, repeats, threads, random_init):
    """run_infer_bench with the CLI's parsing and error handling."""
    # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
    from fleet.bench.infer import run_infer_bench

    try:
        return run_infer_bench(
            checkpoint=checkpoint,
            batches=_ints(batch, "--batch"),
            episodes=episodes,
            embodiments=_names(embodiments),
            repeats=repeats,
            threads=threads,
            techniques=techniques,
            random_init=random_init,
            log=lambda m: typer.echo(m, err=True),
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def register(bench_app: typer.Typer, experiment_app: typer.Typer) -> None:
    @bench_app.command("infer")
    def bench_infer(
        batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes (1 and a fleet's).")] = "1,64",
        episodes: Annotated[
            int, typer.Option(min=0, help="Closed-loop episodes per embodiment and variant for success (0: skip).")
        ] = 10,
        repeats: Annotated[int, typer.Option(min=1, help="Alternating timing rounds per measurement (median).")] = 5,
        threads: Annotated[int, typer.Option(min=1, help="Torch / ONNX Runtime intra-op threads.")] = 1,
        embodiments: Annotated[str | None, typer.Option(help="Comma-separated embodiments (default: all).")] = None,
        techniques: Annotated[str | None, typer.Option(help="Comma-separated subset of the techniques.")] = None,
        checkpoint: BenchCkptOpt = None,
        random_init: RandomOpt = False,
        json_out: JsonOpt = False,
        out: OutOpt = None,
    ) -> None:
        """The course notes' inference-optimization table measured here: int8 / bf16 precision, ONNX Runtime,
        KV cache, vision-encoder cache, chunk recycling and LoRA merge, each at batch 1 and a fleet-sized batch,
        with its speedup, max action difference (share of range) and closed-loop success change; writes the
        accuracy-vs-speed plot to --out."""
        # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
        from fleet.bench.infer import TECHNIQUES, format_table, write_plot

        chosen = tuple(_names(techniques) or TECHNIQUES)
        unknown = [t for t in chosen if t not in TECHNIQUES]
        if unknown:
            fail(f"--techniques: unknown {unknown}; known: {','.join(TECHNIQUES)}")
        result = _run(chosen, checkpoint, batch, episodes, embodiments, repeats, threads, random_init)
        table = format_table(result)
        if out is not None:
            result["plot"] = str(write_plot(result, out))
        _emit(result, json_out, out, table, "bench_infer")

    @experiment_app.command("quantize")
    def experiment_quantize(
        batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1,64",
        episodes: Annotated[int, typer.Option(min=0, help="Closed-loop episodes per embodiment and precision.")] = 20,
        repeats: Annotated[int, typer.Option(min=1, help="Alternating timing rounds per measurement (median).")] = 5,
        threads: Annotated[int, typer.Option(min=1, help="Torch / ONNX Runtime intra-op threads.")] = 1,
        embodiments: Annotated[str | None, typer.Option(help="Comma-separated embodiments (default: all).")] = None,
        checkpoint: BenchCkptOpt = None,
        random_init: RandomOpt = False,
        json_out: JsonOpt = False,
        out: OutOpt = None,
    ) -> None:
        """The notes' exercise: latency of fp32, bf16 and int8 (and ONNX Runtime fp32 / int8) against their
        accuracy (max action difference, closed-loop success per embodiment); plots accuracy vs speed."""
        # torch or pyarrow: loaded by the command that needs it, so `fleet --help` stays light
        from fleet.bench.infer import PRECISION_TECHNIQUES, format_table, write_plot

        result = _run(PRECISION_TECHNIQUES, checkpoint, batch, episodes, embodiments, repeats, threads, random_init)
        table = format_table(result)
        if "success" in result:
            table += "\nsuccess per embodiment: " + "; ".join(
                f"{tech}: " + ", ".join(f"{n} {v:.0%}" for n, v in per.items())
                for tech, per in result["success"].items()
            )
        if out is not None:
            result["plot"] = str(write_plot(result, out, "quantize_accuracy_vs_speed.png"))
        _emit(result, json_out, out, table, "quantize")
