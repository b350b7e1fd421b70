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


def commands():
    """(argv path, click command) for the `fleet` app and every command and group under it."""
    from typer.main import get_command

    from fleet.cli import app

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(get_command(app), []))


def test_every_command_help_has_its_prose_on_one_line():
    for path, cmd in commands():
        lines = (cmd.help or "").splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            # a prose line right after another prose line that does not end a heading would have been joined
            continued = prev.strip() and line.strip() and not line[0].isspace() and not prev[0].isspace()
            assert not continued or prev.endswith(":") or line.lstrip().startswith(("-", "*")), (path, prev, line)
        for line in lines:
            # examples keep their lines: each must fit an 80-column terminal inside rich's one-space margins
            assert not line[:1].isspace() or len(line) <= 77, (path, line)


def test_no_help_at_80_columns_cuts_a_word():
    """At 80 columns the option table leaves an option's help about 20 columns; a path, a default or a long
    option name wider than that must wrap onto the next line, not end in "…" (fold_long_words)."""
    from typer.testing import CliRunner

    from fleet.cli import app

    runner = CliRunner()
    seen = 0
    for path, _ in commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert result.exit_code == 0, (path, result.output)
        for line in result.output.splitlines():
            assert "…" not in line, (path, line)
            assert len(line) <= 80, (path, line)
        seen += 1
    assert seen > 30  # every command and group, not only the top level
