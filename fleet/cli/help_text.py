"""Help text that wraps at the reader's terminal: each prose paragraph of a command's docstring on one line.

Typer joins the single line breaks of a docstring's first paragraph but keeps those of the others, so a
docstring wrapped at 120 columns in the source shows as ragged lines in an 80-column terminal. `reflow`
joins each run of prose lines into one line, which rich then wraps at the terminal's width; it keeps
indented lines (examples, tables), bullet items and blank lines where they are. `reflow_app` applies it
to every command and group of a Typer app, once, after they are registered.

    reflow("A long line\\ncontinued.\\n\\nExamples:\\n    fleet up")
    # 'A long line continued.\\n\\nExamples:\\n    fleet up'
"""

from __future__ import annotations

import inspect
import re

import typer

_BULLET = re.compile(r"^([-*+]|\d+[.)]) ")
HEADING = 40  # a line this short that ends with ":" is a heading ("Examples:"), not a sentence going on


def reflow(text: str | None) -> str | None:
    """`text` with each run of unindented prose lines joined into one line (see the module docstring)."""
    if not text:
        return text
    out: list[str] = []
    joinable = False  # whether the last line out is prose that the next prose line continues
    for line in inspect.cleandoc(text).splitlines():
        stripped = line.strip()
        prose = bool(stripped) and not line[0].isspace() and not line.startswith("\b")
        heading = out[-1].endswith(":") and len(out[-1]) <= HEADING if out else False  # "Examples:"
        if prose and joinable and not _BULLET.match(stripped) and not heading:
            out[-1] = f"{out[-1]} {stripped}"
            continue
        out.append(line)
        joinable = prose
    return "\n".join(out)


def reflow_app(app: typer.Typer) -> None:
    """Reflow the help of every command and group of `app`, its sub-apps included."""
    app.info.help = reflow(app.info.help if isinstance(app.info.help, str) else None) or app.info.help
    for cmd in app.registered_commands:
        cmd.help = reflow(cmd.help or (inspect.getdoc(cmd.callback) if cmd.callback else None))
    for group in app.registered_groups:
        if isinstance(group.help, str):
            group.help = reflow(group.help)
        if group.typer_instance is not None:
            reflow_app(group.typer_instance)
