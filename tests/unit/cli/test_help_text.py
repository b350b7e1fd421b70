"""--help wraps at the reader's terminal: prose paragraphs are one line each; examples keep their lines."""

from __future__ import annotations

from fleet.cli.help_text import reflow


def test_prose_lines_join_and_examples_bullets_and_blank_lines_stay():
    doc = """First line
    of the summary.

    A paragraph wrapped
    at 120 columns in the source, which goes on:
    a sentence, not a heading.
    - a bullet
    - another bullet
      that continues

    Examples:
        fleet up
        fleet up --realtime
    """
    assert reflow(doc).splitlines() == [
        "First line of the summary.",
        "",
        "A paragraph wrapped at 120 columns in the source, which goes on: a sentence, not a heading.",
        "- a bullet",
        "- another bullet",
        "  that continues",
        "",
        "Examples:",
        "    fleet up",
        "    fleet up --realtime",
    ]
    assert reflow(None) is None and reflow("") == ""


def test_every_command_help_has_its_prose_on_one_line():
    from typer.main import get_command

    from fleet.cli import app

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    for path, cmd in walk(get_command(app), "fleet"):
        lines = (cmd.help or "").splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            # a prose line right after another prose line that does not end a heading would have been joined
            continued = prev.strip() and line.strip() and not line[0].isspace() and not prev[0].isspace()
            assert not continued or prev.endswith(":") or line.lstrip().startswith(("-", "*")), (path, prev, line)
        for line in lines:
            # examples keep their lines: each must fit an 80-column terminal inside rich's one-space margins
            assert not line[:1].isspace() or len(line) <= 77, (path, line)
