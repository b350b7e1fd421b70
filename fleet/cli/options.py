"""What every `fleet` subcommand shares: the option types defined once, the error exit and the JSON line.

Used as `json_out: JsonOpt = False`, `out: OutOpt = None`, `fail("--robots: ...")`, `emit_json(result)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Directory for plots and tables.")]
CkptOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Checkpoint prefix or directory (default: the shipped one).")
]
BenchCkptOpt = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Checkpoint prefix or directory (default: the shipped one, else random init)."),
]
# the inference benchmarks fall back to a randomly initialised model when no checkpoint is shipped


def fail(message: str) -> None:
    """Print `error: message` in red on stderr and exit with status 2 (a usage error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def emit_json(obj: dict) -> None:
    """One JSON object on one stdout line (what --json prints); values JSON cannot hold are written as str."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def show(result: dict, json_out: bool, format_table, wrote: list | None = None) -> None:
    """A command's result: one JSON object with --json, else its table and the files it wrote."""
    if json_out:
        emit_json(result)
        return
    typer.echo(format_table(result))
    if wrote:
        typer.echo("wrote " + " and ".join(str(w) for w in wrote))
