"""Help text that wraps at the reader's terminal: each prose paragraph of a command's docstring on one line.

Typer joins the single line breaks of a docstring's first paragraph but keeps those of the others, so a
docstring wrapped at 120 columns in the source shows as ragged lines in an 80-column terminal. `reflow`
joins each run of prose lines into one line, which rich then wraps at the terminal's width; it keeps
indented lines (examples, tables), bullet items and blank lines where they are. `reflow_app` applies it
to every command and group of a Typer app, once, after they are registered.

    reflow("A long line\\ncontinued.\\n\\nExamples:\\n    fleet up")
    # 'A long line continued.\\n\\nExamples:\\n    fleet up'

`fold_long_words` stops rich from cutting a word too long for its column with "…": at 80 columns the option
table leaves the help text about 20 columns, and a path (policy.safetensors/policy.json), a default
(franka=2,aloha=1,hello=1,leap=1) or a long option name (--rehearsal-episodes) would otherwise lose its end.
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


def fold_long_words() -> bool:
    """Make typer's rich help fold a word too long for its table column onto the next line instead of ending
    it with "…" (option names and each option's help, default included). Idempotent. Returns False, and
    changes nothing, where typer's help internals are not the ones it was checked on (typer 0.29):
    help then renders as typer renders it."""
    try:
        from rich.columns import Columns
        from rich.text import Text
        from typer import rich_utils
    except ImportError:  # typer without rich: click's plain help wraps and never cuts
        return False
    if getattr(rich_utils, "_fleet_folds", False):
        return True
    parameter_help = getattr(rich_utils, "_get_parameter_help", None)
    names = ("highlighter", "negative_highlighter")
    if parameter_help is None or not all(callable(getattr(rich_utils, n, None)) for n in names):
        return False

    def fold(out):
        for part in out.renderables if isinstance(out, Columns) else [out]:
            if isinstance(part, Text):
                part.overflow = "fold"
        return out

    def folded_help(*args, **kwargs):
        return fold(parameter_help(*args, **kwargs))

    class _Folding:
        def __init__(self, highlight) -> None:
            self._highlight = highlight

        def __call__(self, text):
            return fold(self._highlight(text))

    rich_utils._get_parameter_help = folded_help
    for name in names:
        setattr(rich_utils, name, _Folding(getattr(rich_utils, name)))
    rich_utils._fleet_folds = True
    return True
