"""``text3dsam eval``: score predictions against ground truth with the challenge's metrics."""

from __future__ import annotations

import math
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from text3dsam_cli.cli.app import app, err_console, handle_errors, is_debug, print_error
from text3dsam_cli.io import formats

if TYPE_CHECKING:  # rich.table is imported where a table is drawn (start-up time)
    from rich.table import Table

# The evaluation module (scipy, SimpleITK) is imported inside the functions: `text3dsam --help` and the other
# commands should not pay for it.
METRICS = ("DSC", "NSD", "F1", "DSC_TP")
_LABEL_IMAGES = "/".join(formats.label_image_suffixes())


class SpacingOrder(str, Enum):
    """How the stored (x, y, z) spacing meets the (z, y, x) arrays."""

    xyz = "xyz"
    zyx = "zyx"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def _table(results: dict[str, Any]) -> Table:
    from rich.table import Table

    from text3dsam_cli.evaluation import modality_of

    table = Table(title="Evaluation", title_justify="left")
    table.add_column("case", overflow="fold")
    table.add_column("group")
    for metric in METRICS:
        table.add_column(metric, justify="right")
    for name, metrics in results["cases"].items():
        table.add_row(name, modality_of(name), *(_cell(metrics.get(m)) for m in METRICS))
    table.add_section()
    for group, summary in results["summary"].items():
        label = f"mean ({summary['cases']} case{'s' if summary['cases'] != 1 else ''})"
        style = "bold" if group == "overall" else None
        table.add_row(label, group, *(_cell(summary.get(m)) for m in METRICS), style=style)
    return table


@app.command("eval")
@handle_errors
def eval_command(
    pred: Path = typer.Option(..., "--pred", help="Folder of predictions (CASE.npz with 'segs', or label images "
                              f"CASE{_LABEL_IMAGES})."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground truth (CASE_gt.npz / CASE.npz with 'gts', or label "
                            f"images CASE{_LABEL_IMAGES})."),
    images: Path | None = typer.Option(None, "--images", help="Folder of the challenge image npz files "
                                       "(spacing, text_prompts); default: taken from the ground-truth folder."),
    labels: Path | None = typer.Option(None, "--labels", help='Labels JSON {"1": "liver", ...}: the classes '
                                       "to score when the files carry no prompts (default: all labels in the "
                                       "ground truth)."),
    json_out: str | None = typer.Option(None, "--json", help="Write all results as JSON to this file "
                                        "('-' for stdout)."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write one row per case to this CSV file."),
    spacing_order: SpacingOrder = typer.Option(SpacingOrder.xyz, "--spacing-order", help="xyz: pass the stored "
                                               "(x, y, z) spacing unchanged against the (z, y, x) arrays, as "
                                               "the official script does; zyx: reverse it (physically right)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print no table or progress."),
) -> None:
    """Score predictions with the challenge's metrics: DSC and NSD (semantic), F1 and DSC_TP (instance)."""

    def progress(name: str, index: int, total: int) -> None:
        if not quiet:
            err_console.print(f"[dim][{index + 1}/{total}] {name}[/]", highlight=False)

    from text3dsam_cli.evaluation import evaluate_folder, results_to_json, write_csv, write_json

    if not is_debug():
        from text3dsam_cli.io.itk import silence_itk_warnings

        silence_itk_warnings()
    results = evaluate_folder(pred, gt, images_dir=images, spacing_order=spacing_order.value,
                              labels_json=labels, on_case=progress)
    if not quiet:
        err_console.print(_table(results))
    if csv_out is not None:
        write_csv(results, csv_out)
    if json_out == "-":
        sys.stdout.write(results_to_json(results))
        sys.stdout.flush()
    elif json_out is not None:
        write_json(results, json_out)
    failed = results["failed"]
    for reason in failed.values():
        print_error(reason)
    if failed:
        err_console.print(f"{len(results['cases'])} case(s) scored, {len(failed)} failed (listed under "
                          "\"failed\" in --json)", highlight=False)
        raise typer.Exit(1)
