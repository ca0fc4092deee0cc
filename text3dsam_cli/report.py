"""``text3dsam report``: the sidecars of a study gathered into one table, one row per input and label.

Reads what is on disk (so it works after sharded runs, whichever shard wrote which sidecar): every ``*.json``
under the given folders (recursively; hidden files such as temporary files are not read) and every JSON file
given directly. A file that is not a ``segment`` sidecar (another JSON, a BIDS sidecar, invalid JSON) is
skipped and returned, so the caller can say so once. Rows are ordered by input path, then by the label order
of the sidecar.

Columns (:func:`columns`): ``input``, ``sidecar``, ``label_map``, ``prompt``, ``label``, ``voxels``, ``volume_ml``,
``components``, ``largest_component_ml``, ``touches_border``, ``removed_ml`` (when some sidecar has it: a
clean-up ran), ``vocabulary_known``, ``vocabulary_closest``, ``vocabulary_score``, ``modality``,
``modality_source``, and ``intensity_mean`` ... ``intensity_max`` when some sidecar has intensity statistics
(``segment --statistics``). A value a sidecar does not have is empty (CSV) or null (JSON).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from text3dsam_cli.errors import InputError
from text3dsam_cli.io.atomic import write_text
from text3dsam_cli.statistics import INTENSITY_KEYS

BASE_COLUMNS = ("input", "sidecar", "label_map", "prompt", "label", "voxels", "volume_ml", "components",
                "largest_component_ml", "touches_border")
OPTIONAL_COLUMNS = ("removed_ml",)
VOCABULARY_COLUMNS = ("vocabulary_known", "vocabulary_closest", "vocabulary_score", "modality", "modality_source")
INTENSITY_COLUMNS = tuple(f"intensity_{key}" for key in INTENSITY_KEYS)


def is_sidecar(data: Any) -> bool:
    """Whether parsed JSON is a ``segment`` sidecar: an object with ``text3dsam_version``, ``input`` and a
    ``labels`` list of objects."""
    return (isinstance(data, dict) and "text3dsam_version" in data and isinstance(data.get("input"), str)
            and isinstance(data.get("labels"), list) and all(isinstance(e, dict) for e in data["labels"]))


def _candidates(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if not p.name.startswith(".") and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError("no such file or folder", path)
    unique: dict[str, Path] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def read_sidecars(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The sidecars among ``paths`` (files, or folders searched recursively) as ``(path, data)``, ordered by
    their input path, and the files that were skipped because they are not sidecars."""
    sidecars, skipped = [], []
    for path in _candidates(paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if is_sidecar(data):
            sidecars.append((path, data))
        else:
            skipped.append(path)
    sidecars.sort(key=lambda item: (item[1]["input"], str(item[0])))
    return sidecars, skipped


def _rows_of(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    modality = data.get("modality") if isinstance(data.get("modality"), dict) else {}
    outputs = data.get("outputs") if isinstance(data.get("outputs"), dict) else {}
    rows = []
    for entry in data["labels"]:
        vocabulary = entry.get("vocabulary") if isinstance(entry.get("vocabulary"), dict) else {}
        row: dict[str, Any] = {"input": data["input"], "sidecar": str(path), "label_map": outputs.get("labels")}
        row.update({key: entry.get(key) for key in BASE_COLUMNS[3:]})
        row.update({key: entry[key] for key in OPTIONAL_COLUMNS if key in entry})
        row.update({"vocabulary_known": vocabulary.get("known"), "vocabulary_closest": vocabulary.get("closest"),
                    "vocabulary_score": vocabulary.get("score"), "modality": modality.get("modality"),
                    "modality_source": modality.get("source")})
        intensity = entry.get("intensity")
        if isinstance(intensity, dict):
            row.update({f"intensity_{key}": intensity.get(key) for key in INTENSITY_KEYS})
        rows.append(row)
    return rows


def report_rows(sidecars: Sequence[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per input and label, every row with every column of :func:`columns` (None where absent)."""
    rows = [row for path, data in sidecars for row in _rows_of(path, data)]
    names = columns(rows)
    return [{name: row.get(name) for name in names} for row in rows]


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: the fixed ones, plus ``removed_ml`` and the intensity columns when a row has them."""
    present = {key for row in rows for key in row}
    return [*BASE_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in present), *VOCABULARY_COLUMNS,
            *(INTENSITY_COLUMNS if present & set(INTENSITY_COLUMNS) else ())]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text with a header line (``true``/``false`` for flags, empty cells for missing values)."""
    names = columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in names])
    return buffer.getvalue()


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    """A JSON list of the row objects."""
    return json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n"


def write_report(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], as_json: bool = False) -> Path:
    """Write the table atomically (CSV, or JSON with ``as_json``); return the path."""
    return write_text(path, to_json(rows) if as_json else to_csv(rows))
