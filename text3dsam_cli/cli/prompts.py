"""``text3dsam prompts``: list and search the vocabulary the model was trained on."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape

from text3dsam_cli.cli.app import app, err_console, handle_errors
from text3dsam_cli.errors import UsageError


@app.command("prompts")
@handle_errors
def prompts_command(
    query: str = typer.Argument(None, help="Text to look for in class names and phrasings (case-insensitive, "
                                "typo-tolerant: 'kidnye' finds the kidneys). Default: list every class.",
                                show_default=False),
    modality: str = typer.Option(None, "--modality", help="Only classes of this modality: CT, MR, PET (or PT), "
                                 "US, Microscopy."),
    phrasings: bool = typer.Option(False, "--phrasings", "-p", help="Show every phrasing of each class."),
    limit: int = typer.Option(None, "--limit", help="At most this many classes.", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {name, modality, datasets, "
                                 "phrasings} on stdout (with --presets: {name, modality, prompts, labels, "
                                 "instance})."),
    presets: bool = typer.Option(False, "--presets", help="List the presets instead: one named prompt set per "
                                 "training dataset (for 'segment --preset NAME'); QUERY filters their names."),
) -> None:
    """List or search the prompts the model knows: class name, modality, datasets and phrasings.

    The vocabulary is the CVPR 2025 text-guided 3D segmentation challenge's prompt list (CC BY-NC-SA 4.0);
    phrasings listed here are what the model was trained on. Best matches first.
    """
    from rich.console import Console
    from rich.table import Table

    from text3dsam_cli.prompts import MODALITY_ALIASES, load_vocabulary, normalize_modality, search_vocabulary

    if modality is not None and normalize_modality(modality) not in {e.modality for e in load_vocabulary()}:
        raise UsageError(f"--modality {modality!r}: use one of {', '.join(sorted(set(MODALITY_ALIASES.values())))}")
    if presets:
        _list_presets(query, modality, limit, phrasings, as_json)
        return
    found = search_vocabulary(query or "", modality=modality, limit=limit)
    if _json_or_none(found, as_json, "class", query, modality):
        return
    table = Table(show_lines=phrasings)
    table.add_column("Class")
    table.add_column("Modality")
    table.add_column("Datasets")
    table.add_column("Phrasings" if phrasings else "#", justify="left" if phrasings else "right")
    for entry in found:
        shown = "\n".join(entry.phrasings) if phrasings else str(len(entry.phrasings))
        table.add_row(entry.name, entry.modality, ", ".join(entry.datasets), shown)
    Console(soft_wrap=False).print(table)
    total = len(load_vocabulary())
    err_console.print(f"[dim]{len(found)} of {total} classes; phrasings: --phrasings; machine-readable: --json[/]")


def _json_or_none(found: list[Any], as_json: bool, noun: str, query: str | None, modality: str | None) -> bool:
    """``--json``: print ``found`` as JSON (True: done); nothing found: say so and exit 1; else False (a table)."""
    if as_json:
        typer.echo(json.dumps([item.to_dict() for item in found], indent=2, ensure_ascii=False))
        return True
    if not found:
        err_console.print(f"no {noun} matches {query!r}" + (f" in {modality}" if modality else ""))
        raise typer.Exit(1)
    return False


def _list_presets(query: str | None, modality: str | None, limit: int | None, prompts: bool, as_json: bool) -> None:
    """``text3dsam prompts --presets``: name, modality, number of classes (``--phrasings``: their prompts)."""
    from rich.console import Console
    from rich.table import Table

    from text3dsam_cli.prompts import load_presets, normalize_text

    found = [p for p in load_presets(modality) if normalize_text(query or "") in normalize_text(p.name)]
    found = found[:limit] if limit is not None else found
    if _json_or_none(found, as_json, "preset", query, modality):
        return
    table = Table(show_lines=prompts)
    table.add_column("Preset")
    table.add_column("Modality")
    table.add_column("Classes", justify="right")
    table.add_column("Prompts (label: prompt)" if prompts else "First classes")
    for preset in found:
        pairs = [f"{v}: {p}" for v, p in zip(preset.values, preset.prompts)]
        shown = "\n".join(pairs) if prompts else ", ".join(preset.prompts[:3]) + (", ..." if len(pairs) > 3 else "")
        table.add_row(preset.name, preset.modality, str(len(pairs)), escape(shown))
    Console(soft_wrap=False).print(table)
    err_console.print(f"[dim]{len(found)} of {len(load_presets())} presets; prompts: --phrasings; machine-readable: "
                      "--json; use: text3dsam segment SCAN --preset NAME[/]")
