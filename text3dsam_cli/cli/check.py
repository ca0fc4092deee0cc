"""``text3dsam check-data``: check a training data folder case by case (:mod:`text3dsam_cli.training.check`)."""

from __future__ import annotations

import json

import typer

from text3dsam_cli.cli.app import app, err_console, handle_errors
from text3dsam_cli.cli.train import DATA_HELP, PROMPTS_HELP


@app.command("check-data")
@handle_errors
def check_data_command(
    data: str = typer.Argument(..., help=DATA_HELP, show_default=False),
    prompts: str = typer.Option(None, "--prompts", help=PROMPTS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {data, layout, cases, bad_cases, problems: [{case, "
                                 "path, kind, message, bad}]} on stdout instead of lines."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    """Check training data before training: every case readable and 3-D, the label map on the image's grid
    (shape, spacing, origin, direction), its values in the prompt map, not empty.

    Prints one line per problem on stdout (`bad: CASE: FILE: problem` or `note: CASE: FILE: problem`) and exits
    with 1 when a case is bad. `finetune` and `train` run the same check first (`--skip-bad-cases` trains on
    the rest).
    """
    from text3dsam_cli.training.check import check_data

    def progress(index: int, total: int, name: str) -> None:
        if not quiet:
            err_console.print(f"checking {index + 1}/{total}: {name}", style="dim", highlight=False, markup=False,
                              soft_wrap=True)

    result = check_data(data, prompts, on_case=progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for note in result.source.notes:
            typer.echo(f"note: {note}")
        for problem in result.problems:
            typer.echo(problem.line())
    if not quiet:
        notes = sum(not p.bad for p in result.problems)
        bad = result.bad_cases
        style = "red" if bad else "green"
        err_console.print(f"{len(result.source.cases)} case(s) checked: {len(bad)} bad, {notes} note(s)",
                          style=style, highlight=False, markup=False)
    if not result.ok:
        raise typer.Exit(1)
