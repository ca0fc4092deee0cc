"""The files one ``segment`` input produces, planned before anything is written, and when an input is done.

Rules (docs/segment.md, "Outputs are complete or absent" and "Collision rule"):

* **Plan first.** Every output path of the whole run (label map, ``_label<v>`` masks, ``_prob<v>`` maps or
  ``_probabilities.npz``, preview, DICOM-SEG, sidecar ``.json``) is computed before the first input is read.
* **Ownership.** A file belongs to an input when that input's sidecar (``<stem>.json``, recognised by its
  ``text3dsam_version`` key) or its in-progress marker (``.<stem>.text3dsam-partial``) lists it. The marker is
  written before the first output of an input and removed after its sidecar.
* **Collision rule.** An input is refused (one line, before its image is read) when one of its outputs is an
  input of the run, is also an output of an earlier input of the run, or exists without belonging to it
  (a BIDS sidecar, a prompt file, another input's output). Its own earlier outputs are overwritten.
* **Done.** An input is done when its sidecar parses, lists every output this run would write, all of them
  exist, and no marker says a later attempt was cut short. The sidecar is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from text3dsam_cli.io import formats
from text3dsam_cli.io.atomic import NAME_MAX, write_json

MARKER_SUFFIX = ".text3dsam-partial"


@dataclass
class OutputPlan:
    """Every file one input will produce. ``extras`` maps an output kind (``mask:<v>``, ``prob:<v>``,
    ``probabilities``, ``preview``, ``dicom_seg``) to its path; ``error`` is set when the plan is refused."""

    labels: Path
    sidecar: Path
    extras: dict[str, Path] = field(default_factory=dict)
    error: str | None = None

    @property
    def folder(self) -> Path:
        """The folder holding every output of this input."""
        return self.labels.parent

    @property
    def marker(self) -> Path:
        """The hidden in-progress marker."""
        name = f".{self.sidecar.name[:-len('.json')]}{MARKER_SUFFIX}"
        if len(os.fsencode(name)) > NAME_MAX:
            name = f".{hashlib.sha1(os.fsencode(self.sidecar.name)).hexdigest()[:20]}{MARKER_SUFFIX}"
        return self.folder / name

    @property
    def files(self) -> list[Path]:
        """Label map, extras and sidecar (the sidecar last, as they are written)."""
        return [self.labels, *self.extras.values(), self.sidecar]


def output_stem(path: Path, suffixes: Sequence[str]) -> str:
    """``out/case.nii.gz`` -> ``out/case`` (for sidecars, split masks, previews)."""
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return str(path.with_name(name[: -len(suffix)]))
    return str(path)


def plan_files(out: Path, suffixes: Sequence[str], values: Sequence[int] | None, split: bool, probabilities: bool,
               preview: bool, companions: Sequence[formats.Format] = ()) -> OutputPlan:
    """The :class:`OutputPlan` of one input whose label map goes to ``out`` (``values``: its label values).

    ``companions`` (:data:`~text3dsam_cli.io.formats.COMPANION_FORMATS`, e.g. DICOM-SEG) are planned first, as
    ``<stem><their ending>`` under the key of their name; probabilities as the label map's format lays them out.
    """
    stem = output_stem(out, suffixes)
    suffix = out.name[len(Path(stem).name):]
    extras: dict[str, Path] = {}
    for companion in companions:
        extras[companion.name] = Path(f"{stem}{companion.output_suffixes[0]}")
    for value in values or []:
        if split:
            extras[f"mask:{value}"] = Path(f"{stem}_label{value}{suffix}")
    fmt = formats.output_format(out)
    if probabilities and fmt is not None:
        extras.update(fmt.probability_files(stem, suffix, values or []))
    if preview:
        extras["preview"] = Path(f"{stem}_preview.png")
    return OutputPlan(labels=out, sidecar=Path(f"{stem}.json"), extras=extras)


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listed(data: dict[str, Any] | None, folder: Path) -> set[str] | None:
    """Keys of the files a sidecar or marker lists (they all live in its folder), None when it is not ours."""
    if data is None or not ("text3dsam_version" in data or data.get("text3dsam_partial") is True):
        return None
    outputs = data.get("outputs")
    values: Iterable[Any] = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(
        outputs, list) else []
    return {_key(folder / Path(str(v)).name) for v in values if isinstance(v, str)}


def owned_files(plan: OutputPlan) -> set[str]:
    """Keys of existing-or-not files that earlier runs wrote for this input (per its sidecar and marker)."""
    owned: set[str] = set()
    sidecar = _listed(read_json(plan.sidecar), plan.folder)
    if sidecar is not None:
        owned |= sidecar | {_key(plan.sidecar)}
    marker = _listed(read_json(plan.marker), plan.folder)
    if marker is not None:
        owned |= marker | {_key(plan.sidecar)}
    return owned


def is_done(plan: OutputPlan) -> bool:
    """Whether an earlier run completed this input with every output this plan asks for."""
    if plan.marker.exists():
        return False
    listed = _listed(read_json(plan.sidecar), plan.folder)
    if listed is None:
        return False
    for path in plan.files[:-1]:
        if _key(path) not in listed:
            return False
        try:
            if path.stat().st_size == 0:
                return False
        except OSError:
            return False
    return True


class Claims:
    """Which input of the run claims each output path, and the run's inputs (never overwritten)."""

    def __init__(self, inputs: Iterable[Path]) -> None:
        self.inputs = {_key(p) for p in inputs}
        self.owner: dict[str, str] = {}

    def problem(self, path: Path, owner: str, owned: set[str]) -> str | None:
        """Why ``owner`` may not write ``path`` (None when it may)."""
        key = _key(path)
        if len(os.fsencode(path.name)) > NAME_MAX:
            return f"output name {path.name[:40]}... is too long ({len(os.fsencode(path.name))} bytes, the " \
                   f"limit is {NAME_MAX}); rename the input or choose a shorter -o"
        if "\n" in str(path) or "\r" in str(path):
            return f"output path {str(path)!r} contains a line break, which would break the one-path-per-line " \
                   "output; rename the input"
        if key in self.inputs:
            return f"output {path} would overwrite an input"
        other = self.owner.get(key)
        if other is not None and other != owner:
            return f"output {path} is also an output of {other} (collision rule: rename one input or use " \
                   "separate -o folders)"
        if key not in owned and (path.exists() or path.is_symlink()):
            return f"{path} exists and was not written by text3dsam for this input; refusing to overwrite it " \
                   "(collision rule: choose another -o)"
        return None

    def claim(self, plan: OutputPlan, owner: str) -> str | None:
        """Claim every file of ``plan`` for ``owner``; return the first problem (nothing claimed then)."""
        owned = owned_files(plan)
        for path in plan.files:
            problem = self.problem(path, owner, owned)
            if problem is not None:
                return problem
        for path in plan.files:
            self.owner[_key(path)] = owner
        return None


def write_marker(plan: OutputPlan, files: Iterable[Path]) -> None:
    """Record, before the first output is written, which files this input is about to write."""
    data = {"text3dsam_partial": True, "outputs": sorted({str(p) for p in files} | {str(plan.sidecar)})}
    write_json(plan.marker, data, indent=1)


def discard_attempt(plan: OutputPlan, created: Iterable[str], existed_before: set[str]) -> None:
    """After a failed or interrupted attempt: delete what it wrote (the files it recorded, and any planned file
    that did not exist before it, e.g. one renamed into place just before an interrupt), then remove the
    marker unless a file it still covers is left (one that only the marker says is this input's)."""
    doomed = {str(p) for p in created} | {str(p) for p in plan.files if _key(p) not in existed_before}
    for path in doomed:
        with contextlib.suppress(OSError):
            os.unlink(path)
    listed = _listed(read_json(plan.sidecar), plan.folder) or set()
    if all(_key(p) in listed for p in plan.files[:-1] if p.exists()):
        remove_marker(plan)


def existing(plan: OutputPlan) -> set[str]:
    """Keys of the planned files that exist now."""
    return {_key(p) for p in plan.files if p.exists()}


def remove_marker(plan: OutputPlan) -> None:
    """Remove the in-progress marker (after the sidecar is written)."""
    with contextlib.suppress(FileNotFoundError):
        plan.marker.unlink()
