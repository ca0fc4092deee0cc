"""Dataset integrity check (``text3dsam check-data``, also run at the start of ``finetune`` / ``train``).

Every case is read in full and checked, like nnU-Net's ``--verify_dataset_integrity``:

* the image and the label map can be read, and are 3-D volumes (the readers refuse 2-D images, single-slice
  files and 4-D / multi-channel files with a message saying so);
* the label map is integer-valued and lies on the image's grid: same shape, and for files with geometry
  (nnU-Net layouts) the same spacing (within :data:`SPACING_RTOL`, relative), origin (within
  :data:`ORIGIN_VOXELS` of a voxel) and direction (cosines within :data:`DIRECTION_ATOL`);
* notes, which do not make a case bad: label values that no class of the prompt map names (they are not
  trained), an empty label map, and a label map without any prompted class (both give no training sample).

A case with at least one ``bad`` problem cannot be trained on. :func:`check_source` returns every problem;
:func:`require_good_cases` is what training does with them (stop, or with ``skip_bad_cases`` drop the bad
cases and say so).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import InputError, Text3DSAMError
from text3dsam_cli.training.data import CaseSpec, DataSource, discover_cases

#: Label spacing may differ from the image's by this fraction.
SPACING_RTOL = 1e-3
#: Label origin may differ from the image's by this fraction of the largest voxel side.
ORIGIN_VOXELS = 1e-2
#: Direction cosines may differ by this much.
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class DataProblem:
    """One finding about one case. ``bad`` problems exclude the case from training; the others are notes.

    ``kind``: ``unreadable``, ``dtype``, ``shape``, ``spacing``, ``origin``, ``direction`` (bad), or
    ``unprompted_values``, ``empty``, ``no_prompted_class`` (notes).
    """

    case: str
    path: Path
    kind: str
    message: str
    bad: bool

    def line(self) -> str:
        """One line naming the case and the file: ``bad: CASE: PATH: message``."""
        text = f"{'bad' if self.bad else 'note'}: {self.case}: {self.path}: {self.message}"
        return text.replace("\r", "\\r").replace("\n", "\\n")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {**asdict(self), "path": str(self.path)}


@dataclass
class DataCheck:
    """The result of checking a :class:`DataSource`: its cases and every problem found, in case order."""

    source: DataSource
    problems: list[DataProblem]

    @property
    def bad_cases(self) -> list[str]:
        """Names of the cases with at least one bad problem, in case order."""
        bad = {p.case for p in self.problems if p.bad}
        return [c.name for c in self.source.cases if c.name in bad]

    @property
    def ok(self) -> bool:
        """No case is bad."""
        return not any(p.bad for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """``{"data", "layout", "cases", "bad_cases", "problems": [...]}``."""
        return {"data": str(self.source.root), "layout": self.source.layout, "cases": len(self.source.cases),
                "bad_cases": self.bad_cases, "problems": [p.to_dict() for p in self.problems]}


def _message(exc: BaseException) -> str:
    """An exception's text without the leading ``path: `` of :class:`Text3DSAMError`."""
    text = str(exc)
    path = getattr(exc, "path", None)
    if isinstance(exc, Text3DSAMError) and path and text.startswith(f"{path}: "):
        return text[len(path) + 2:]
    if isinstance(exc, Text3DSAMError):
        return text
    return f"cannot read ({type(exc).__name__}: {exc})"


def _xyz(values: Any) -> str:
    return " x ".join(f"{float(v):g}" for v in values)


def _geometry_problems(case: CaseSpec, image: Any, labels: Any) -> list[DataProblem]:
    out = []
    spacing_i, spacing_l = np.asarray(image.spacing, float), np.asarray(labels.spacing, float)
    if not np.allclose(spacing_l, spacing_i, rtol=SPACING_RTOL, atol=0.0):
        out.append(DataProblem(case.name, case.labels, "spacing", f"label spacing {_xyz(spacing_l)} mm differs "
                               f"from the image's {_xyz(spacing_i)} mm (x, y, z)", True))
    tolerance = ORIGIN_VOXELS * float(spacing_i.max())
    origin_i, origin_l = np.asarray(image.origin, float), np.asarray(labels.origin, float)
    if float(np.abs(origin_l - origin_i).max()) > tolerance:
        out.append(DataProblem(case.name, case.labels, "origin", f"label origin {_xyz(origin_l)} mm differs from "
                               f"the image's {_xyz(origin_i)} mm (x, y, z)", True))
    direction_i, direction_l = np.asarray(image.direction, float), np.asarray(labels.direction, float)
    if float(np.abs(direction_l - direction_i).max()) > DIRECTION_ATOL:
        out.append(DataProblem(case.name, case.labels, "direction", "label direction "
                               f"{[round(float(v), 4) for v in direction_l]} differs from the image's "
                               f"{[round(float(v), 4) for v in direction_i]}", True))
    return out


def check_case(case: CaseSpec) -> list[DataProblem]:
    """Every problem of one case (reads its image and label map in full)."""
    from text3dsam_cli.io.npz import read_npz_array
    from text3dsam_cli.io.readers import read_volume

    try:
        image = read_volume(case.image)
    except (Text3DSAMError, OSError, ValueError, RuntimeError) as exc:
        return [DataProblem(case.name, case.image, "unreadable", _message(exc), True)]
    label_volume = None
    try:
        if case.layout == "npz":
            labels = read_npz_array(case.labels, "gts")
        else:
            label_volume = read_volume(case.labels)
            labels = label_volume.array
    except (Text3DSAMError, OSError, ValueError, RuntimeError) as exc:
        return [DataProblem(case.name, case.labels, "unreadable", _message(exc), True)]
    problems: list[DataProblem] = []
    if labels.dtype.kind not in "biu" and not (labels.dtype.kind == "f" and np.all(np.isfinite(labels))
                                               and np.all(labels == np.round(labels))):
        problems.append(DataProblem(case.name, case.labels, "dtype", f"label map has dtype {labels.dtype} with "
                                    "non-integer values; expected integer labels", True))
    if tuple(labels.shape) != tuple(image.shape):
        problems.append(DataProblem(case.name, case.labels, "shape", f"label shape {tuple(labels.shape)} differs "
                                    f"from the image's {tuple(image.shape)} (z, y, x)", True))
    if label_volume is not None and image.source_format != "npz":
        problems.extend(_geometry_problems(case, image, label_volume))
    if problems:
        return problems
    present = {int(v) for v in np.unique(labels)} - {0}
    if not present:
        return [DataProblem(case.name, case.labels, "empty", "label map is empty (all 0): the case gives no "
                            "training samples", False)]
    if any(not spec.values for spec in case.classes):  # instance datasets: every non-zero value is the target
        return problems
    named = {v for spec in case.classes for v in spec.values}
    unnamed = sorted(present - named)
    if unnamed:
        listed = ", ".join(map(str, unnamed[:20])) + (", ..." if len(unnamed) > 20 else "")
        problems.append(DataProblem(case.name, case.labels, "unprompted_values", f"label value(s) {listed} not "
                                    "in the prompt map: not trained", False))
    if not present & named:
        problems.append(DataProblem(case.name, case.labels, "no_prompted_class", "none of the prompted classes "
                                    "is in the label map: the case gives no training samples", False))
    return problems


def check_source(source: DataSource, on_case: Callable[[int, int, str], None] | None = None) -> DataCheck:
    """Check every case of ``source`` (``on_case(i, n, name)`` reports progress)."""
    problems: list[DataProblem] = []
    for index, case in enumerate(source.cases):
        if on_case is not None:
            on_case(index, len(source.cases), case.name)
        problems.extend(check_case(case))
    return DataCheck(source, problems)


def check_data(data: str | os.PathLike[str], prompts: str | os.PathLike[str] | None = None,
               on_case: Callable[[int, int, str], None] | None = None) -> DataCheck:
    """Find the cases of a training data folder (as training does) and check each one."""
    return check_source(discover_cases(data, prompts), on_case)


def without_cases(source: DataSource, names: list[str]) -> DataSource:
    """``source`` without the named cases."""
    drop = set(names)
    return replace(source, cases=[c for c in source.cases if c.name not in drop], notes=list(source.notes))


def require_good_cases(source: DataSource, skip_bad_cases: bool = False,
                       report: Callable[[str], None] | None = None, what: str = "training") -> DataSource:
    """Check ``source`` before training: report each bad problem and each note that training would not repeat.

    Bad cases stop training (an :class:`InputError`, exit status 1) unless ``skip_bad_cases``: then they are
    dropped with a note, and only a source left without any case is an error.
    """
    result = check_source(source)
    say = report or (lambda line: None)
    for problem in result.problems:
        if problem.bad or problem.kind == "unprompted_values":  # the others are noted when the cases load
            say(problem.line())
    bad = result.bad_cases
    if not bad:
        return source
    if not skip_bad_cases:
        first = next(p for p in result.problems if p.bad)
        raise InputError(f"{len(bad)} of {len(source.cases)} {what} case(s) failed the data check, e.g. "
                         f"{first.case} ({first.message}); `text3dsam check-data` lists every problem; fix them "
                         "or pass --skip-bad-cases", source.root)
    if len(bad) == len(source.cases):
        raise InputError(f"every {what} case failed the data check", source.root)
    say(f"note: --skip-bad-cases: {what} without {len(bad)} bad case(s): {', '.join(bad)}")
    return without_cases(source, bad)
