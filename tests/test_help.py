"""Every command's ``--help`` reads right: no type placeholders, flags without a value, meaningful metavars, and
every help text printed as written (Rich markup must not eat ``[dicomseg]``).

The commands are found by walking the Click tree of the Typer app, so commands and options added later are
checked without touching this file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from text3dsam_cli.cli import app
from text3dsam_cli.cli.help import HelpGroup

runner = CliRunner()

#: A type placeholder as Typer draws it: <bool>, <str>, <int range>, <list[str]>, <path>, <xyz|zyx>, ... (a help
#: text may still say ``<stem>.json``; the metavar column of every row is checked separately).
PLACEHOLDER = re.compile(r"<(bool|str|int|float|path|file|dir|directory|text|uuid|datetime|bytes|[a-z]+ range"
                         r"|(list|tuple)\[[^>]*\]|[\w.-]+(\|[\w.-]+)+)>")
#: A metavar: capitals (``PATH``, ``D,H,W``, ``I/N``, ``PROMPT...``) or choices (``xyz|zyx``).
METAVAR = re.compile(r"^([A-Z][A-Z0-9_,./|-]*|[a-z0-9_.]+(\|[a-z0-9_.]+)+)(\.\.\.)?$")
BOX = re.compile(r"[│╭╮╰╯─]")


def _walk(command, path=()):
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        yield from _walk(sub, (*path, name))


def _commands(typer_app):
    return list(_walk(typer.main.get_command(typer_app)))


def _flat(text: str) -> str:
    return " ".join(BOX.sub(" ", text).split())


def _plain(help_text: str) -> str:
    """What a help text should print as: as written (the escaping backslashes removed)."""
    return _flat(re.sub(r"\\(\[)", r"\1", help_text))


def _help(typer_app, path, monkeypatch) -> str:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 4000)  # one line per row: rows can be read column-wise
    result = runner.invoke(typer_app, [*path, "--help"], prog_name="text3dsam", color=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _rows(output: str) -> list[list[str]]:
    """The table rows' words; option names Typer joins with commas (``--output,--out``) are split."""
    rows = []
    for line in output.splitlines():
        if line.lstrip().startswith("│"):
            words = BOX.sub(" ", line).split()
            rows.append([part for word in words
                         for part in (word.split(",") if word.startswith("-") else [word])])
    return rows


def _row_of(rows: list[list[str]], names: list[str]) -> list[str]:
    for row in rows:
        cells = row[1:] if row and row[0] == "*" else row
        if cells and cells[0] == names[0]:
            return cells
    raise AssertionError(f"no help row for {names[0]}")


def _params(command) -> list:
    return [p for p in command.get_params(command.context_class(command)) if not getattr(p, "hidden", False)]


def check_texts(output: str, command, where: str) -> None:
    """Every help text of ``command`` (its own, its parameters') is in ``output`` as written."""
    flat = _flat(output)
    if command.help:
        for paragraph in command.help.partition("\f")[0].split("\n\n"):
            assert _plain(paragraph) in flat, f"{where}: command help not printed as written: {paragraph!r}"
    for param in _params(command):
        if param.help:
            assert _plain(param.help) in flat, f"{where}: help of {param.name} not printed as written"


def check_help(typer_app, path, command, monkeypatch) -> None:
    output = _help(typer_app, path, monkeypatch)
    where = "text3dsam " + " ".join(path)
    assert not PLACEHOLDER.search(output), f"{where} --help shows a type placeholder: {PLACEHOLDER.search(output)[0]}"
    assert "\\[" not in output, f"{where} --help shows an escaping backslash"
    usage = next(line for line in output.splitlines() if "Usage:" in line)
    assert not re.search(r"\{\w+\}", usage), f"{where}: usage shows a {{name}} placeholder: {usage.strip()}"
    check_texts(output, command, where)
    rows = _rows(output)
    for param in _params(command):
        first_word = _plain(param.help).split()[0] if param.help else None
        if param.param_type_name == "argument":
            cells = _row_of(rows, [param.metavar])
            assert METAVAR.match(cells[0]), f"{where}: argument {param.name} shown as {cells[0]!r}"
            assert cells[0].removesuffix("...") in usage, f"{where}: {cells[0]} missing from the usage line"
            rest = cells[1:]
        else:
            names = [*param.opts, *param.secondary_opts]
            cells = _row_of(rows, sorted(names, key=lambda n: not n.startswith("--")))
            rest = cells[len(names):]
            assert sorted(cells[:len(names)]) == sorted(names), f"{where}: row of {names[0]} is {cells}"
            is_flag = param.is_flag and not param.count
            if is_flag:
                if first_word:
                    assert rest[0] == first_word, f"{where}: flag {names[0]} shows a value: {rest[0]!r}"
                continue
            assert METAVAR.match(rest[0]), f"{where}: {names[0]} shows {rest[0]!r}, not a metavar"
            rest = rest[1:]
            if rest and rest[0].startswith("[x"):  # a range, e.g. [x>=1]
                rest = rest[1:]
        if first_word:
            assert rest and rest[0] == first_word, f"{where}: {param.name} has {rest[:1]} before its help"


def _ids(items):
    return [" ".join(path) or "(root)" for path, _ in items]


COMMANDS = _commands(app)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=_ids(COMMANDS))
def test_every_command_help_reads_right(path, command, monkeypatch):
    check_help(app, path, command, monkeypatch)


def test_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"segment", "prompts", "eval", "train", "finetune", "download", "info", "view"} <= names


def test_segment_help_keeps_extras_and_examples(monkeypatch):
    flat = _flat(_help(app, ["segment"], monkeypatch))
    assert "pip install 'text3dsam-cli[dicomseg]'" in flat
    assert "pip install 'text3dsam-cli[rtstruct]'" in flat
    assert 'JSON {"1": "liver", "5": "spleen"}' in flat
    assert "Usage: text3dsam segment [OPTIONS] INPUT [PROMPT]..." in flat
    assert "--spacing MM" in flat and "--preview Also write" in flat


def _toy_app() -> typer.Typer:
    """A command group as another contributor might add it: every kind of parameter Typer draws a type for."""
    toy = typer.Typer(cls=HelpGroup, rich_markup_mode="rich")
    sub = typer.Typer(help="A sub-command group.")

    @toy.command("first")
    def first(
        paths: list[Path] = typer.Argument(..., help="Files [any format]."),
        flag: bool = typer.Option(False, "--flag", help="A flag [like --preview]."),
        toggle: bool = typer.Option(True, "--toggle/--no-toggle", help="A switch."),
        count: int = typer.Option(3, "--count", help="How many."),
        ratio: float = typer.Option(0.5, "--ratio", help="A fraction."),
        where: Path = typer.Option(None, "--where", help="A path."),
        names: list[str] = typer.Option(None, "--name", help="Repeatable [name]."),
        size: str = typer.Option("1,2,3", "--size", "--shape", metavar="D,H,W", help="An explicit metavar."),
        legacy: str = typer.Option(None, "--legacy", help="Escaped by hand: pip install 'x\\[view]'."),
    ) -> None:
        """First command [with brackets].

        Second paragraph, over
        two lines.
        """

    @sub.command("second")
    def second(item: str = typer.Argument(None, help="An optional [item].")) -> None:
        """A nested command."""

    toy.add_typer(sub, name="group")
    return toy


def test_commands_added_later_get_clean_help(monkeypatch):
    toy = _toy_app()
    commands = _commands(toy)
    assert {" ".join(path) for path, _ in commands} == {"", "first", "group", "group second"}
    for path, command in commands:
        check_help(toy, path, command, monkeypatch)
    flat = _flat(_help(toy, ["first"], monkeypatch))
    assert "Usage: text3dsam first [OPTIONS] PATHS..." in flat
    for expected in ("--count N", "--ratio NUMBER", "--where PATH", "--name NAME", "--size,--shape D,H,W",
                     "--flag A flag [like --preview].", "Second paragraph, over two lines.",
                     "pip install 'x[view]'."):
        assert expected in flat, expected
    assert "[ITEM]" in _flat(_help(toy, ["group", "second"], monkeypatch))


def test_the_checks_catch_typers_placeholders_and_eaten_brackets(monkeypatch):
    """Without HelpGroup, Typer's own help fails these checks (so they can fail)."""
    toy = typer.Typer(rich_markup_mode="rich", add_completion=False)

    @toy.command("flag")
    def flag(preview: bool = typer.Option(False, "--preview", help="A flag.")) -> None:
        """A command with a flag."""

    @toy.command("extra")
    def extra(dicom_seg: str = typer.Option(None, "--dicom-seg", metavar="PATH",
                                            help="Needs the 'dicomseg' extra: pip install 'pkg[dicomseg]'.")) -> None:
        """A command with brackets in a help text."""

    commands = dict(_commands(toy))
    with pytest.raises(AssertionError, match="placeholder"):
        check_help(toy, ("flag",), commands[("flag",)], monkeypatch)
    with pytest.raises(AssertionError, match="not printed as written"):
        check_texts(_help(toy, ("extra",), monkeypatch), commands[("extra",)], "extra")


def test_root_help_is_fast():
    """`text3dsam --help` imports no heavy library (torch, SimpleITK, scipy): it stays well under 0.3 s."""
    code = ("import sys; from text3dsam_cli.cli import app; import typer; typer.main.get_command(app); "
            "heavy = [m for m in ('torch', 'SimpleITK', 'scipy', 'numpy', 'monai') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
