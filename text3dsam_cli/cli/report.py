"""``text3dsam report``: gather segment sidecars into one table (thin wrapper over :mod:`text3dsam_cli.report`)."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from text3dsam_cli.cli.app import app, err_console, handle_errors, one_line
from text3dsam_cli.errors import InputError

#: Skipped files named in the note before "and N more".
SKIPPED_NAMED = 5


@app.command("report")
@handle_errors
def report_command(
    paths: list[str] = typer.Argument(..., help="Sidecars (<stem>.json written by segment) or folders holding "
                                      "them (searched recursively).", show_default=False),
    output: str = typer.Option(None, "--output", "-o", help="Write the table to this file (atomically). "
                               "Default: stdout."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of row objects instead of CSV."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes on stderr."),
) -> None:
    """One table for a study: a row per input and label from the sidecars on disk.

    Columns: input, sidecar, label_map, prompt, label, voxels, volume_ml, components, largest_component_ml,
    touches_border, (removed_ml), vocabulary_known, vocabulary_closest, vocabulary_score, modality,
    modality_source, and intensity_mean ... intensity_max when the sidecars have them (segment --statistics).
    Files that are not sidecars are skipped with one note on stderr.
    """
    from text3dsam_cli.report import read_sidecars, report_rows, to_csv, to_json, write_report

    sidecars, skipped = read_sidecars(paths)
    if skipped and not quiet:
        named = ", ".join(one_line(str(p)) for p in skipped[:SKIPPED_NAMED])
        more = f" and {len(skipped) - SKIPPED_NAMED} more" if len(skipped) > SKIPPED_NAMED else ""
        err_console.print(f"note: skipped {len(skipped)} file(s) that are not text3dsam sidecars: "
                          f"{escape(named)}{more}", highlight=False, soft_wrap=True)
    if not sidecars:
        raise InputError(f"no text3dsam sidecars in {', '.join(paths)}")
    rows = report_rows(sidecars)
    if output:
        write_report(rows, output, as_json)
        if not quiet:
            err_console.print(f"{len(rows)} row(s) from {len(sidecars)} sidecar(s) -> {escape(one_line(output))}",
                              highlight=False, soft_wrap=True)
        return
    sys.stdout.write(to_json(rows) if as_json else to_csv(rows))
    sys.stdout.flush()
