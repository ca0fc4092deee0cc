"""The validation split: which training cases are held out, decided once and kept in ``OUTPUT/splits.json``.

Without ``--val``, ``--val-fraction`` (default 0.2) of the cases are held out, or fold ``K`` of ``N`` with
``--fold K --folds N`` (as nnU-Net's 5-fold cross-validation). The split depends only on the case ids and
these settings, never on ``--seed``: the ids are sorted, shuffled by a fixed generator (seed 12345, the
constant nnU-Net uses for its folds) and cut into parts, so runs with different seeds validate on the same
cases. The file ``{"train": [ids], "val": [ids]}`` is written before training and reused when the run
resumes; a ``splits.json`` placed in OUTPUT by hand before the first run is used as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.io.atomic import write_json
from text3dsam_cli.training.data import DataSource

SPLITS_FILE = "splits.json"
#: The fixed shuffle seed of every split (nnU-Net's KFold random_state).
SPLIT_SEED = 12345
#: ``--folds`` when only ``--fold`` is given (nnU-Net's default).
DEFAULT_FOLDS = 5


@dataclass
class Split:
    """Case ids for training and validation, and where they came from (computed, reused or from a file)."""

    train: list[str]
    val: list[str]
    origin: str = "computed"

    def to_dict(self) -> dict[str, list[str]]:
        """The ``splits.json`` content."""
        return {"train": list(self.train), "val": list(self.val)}


def case_ids(source: DataSource) -> list[str]:
    """One id per case: its name (npz stem or nnU-Net case id), or its path below the data folder when two
    cases share a name."""
    names = [case.name for case in source.cases]
    if len(set(names)) == len(names):
        return names
    root = source.root if source.root.is_dir() else source.root.parent
    ids = []
    for case in source.cases:
        try:
            relative = case.image.relative_to(root).as_posix()
        except ValueError:
            relative = case.image.as_posix()
        ids.append(relative[: -len(".npz")] if relative.lower().endswith(".npz") else relative)
    return ids


def check_split_options(val_fraction: float, fold: int | None, folds: int | None, val: str | None) -> None:
    """Refuse impossible split settings with a :class:`UsageError`."""
    if not (0.0 <= val_fraction < 1.0) or not math.isfinite(val_fraction):
        raise UsageError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if folds is not None and fold is None:
        raise UsageError("--folds needs --fold K (the fold to validate on)")
    if fold is not None:
        if val:
            raise UsageError("--fold and --val exclude each other: --val names the validation cases itself")
        n = DEFAULT_FOLDS if folds is None else folds
        if n < 2:
            raise UsageError(f"--folds {n}: must be at least 2")
        if not 0 <= fold < n:
            raise UsageError(f"--fold {fold}: must be in 0..{n - 1} with --folds {n}")


def make_split(ids: Sequence[str], val_fraction: float = 0.2, fold: int | None = None,
               folds: int | None = None) -> Split:
    """The deterministic split of ``ids`` (see the module docstring).

    Fraction: ``round(fraction x n)`` validation cases, at least one when there are two or more cases and the
    fraction is above 0, at most ``n - 1``. Fold ``K`` of ``N``: the shuffled ids cut into ``N`` parts of
    ``n // N`` or ``n // N + 1`` (the first ``n mod N`` parts one longer, as sklearn's KFold), part ``K`` held
    out; ``N`` may not exceed ``n``.
    """
    ordered = sorted(ids)
    n = len(ordered)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    shuffled = [ordered[i] for i in order]
    if fold is not None:
        count = DEFAULT_FOLDS if folds is None else folds
        if count > n:
            raise UsageError(f"--folds {count}: more folds than the {n} training case(s)")
        parts = np.array_split(np.arange(n), count)
        held = {shuffled[i] for i in parts[fold]}
    else:
        size = 0
        if val_fraction > 0 and n >= 2:
            size = min(n - 1, max(1, round(val_fraction * n)))
        held = set(shuffled[:size])
    return Split([i for i in ordered if i not in held], [i for i in ordered if i in held])


def read_split(path: Path, ids: Sequence[str]) -> Split:
    """A ``splits.json`` checked against the data's case ids (unknown ids, overlaps and an empty train list
    are refused; cases in neither list are left out of training)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the split ({exc})", path) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) and
                                             all(isinstance(i, str) for i in data[k]) for k in ("train", "val")):
        raise InputError('expected {"train": [case ids], "val": [case ids]}', path)
    known = set(ids)
    unknown = [i for k in ("train", "val") for i in data[k] if i not in known]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise InputError(f"case id(s) not in the training data: {', '.join(unknown[:3])}{more}", path)
    both = sorted(set(data["train"]) & set(data["val"]))
    if both:
        raise InputError(f"case id(s) both in train and val: {', '.join(both[:3])}", path)
    if not data["train"]:
        raise InputError("the train list is empty", path)
    return Split(list(data["train"]), list(data["val"]), "file")


def subset(source: DataSource, ids: Sequence[str], keep: Sequence[str]) -> DataSource:
    """The cases of ``source`` whose id is in ``keep`` (same order as the data)."""
    wanted = set(keep)
    cases = [case for case, i in zip(source.cases, ids) if i in wanted]
    return replace(source, cases=cases, notes=list(source.notes))


def resolve_split(source: DataSource, output: Path, val_fraction: float, fold: int | None, folds: int | None,
                  reuse: bool) -> tuple[Split, list[str]]:
    """The split for this run (reused from ``OUTPUT/splits.json`` when ``reuse`` and it exists) and notes."""
    ids = case_ids(source)
    path = output / SPLITS_FILE
    notes = []
    if reuse and path.is_file():
        split = read_split(path, ids)
        split.origin = "file"
        left = len(ids) - len(split.train) - len(split.val)
        notes.append(f"validation split from {path}: {len(split.train)} training, {len(split.val)} validation "
                     f"case(s)" + (f"; {left} case(s) in neither list are not used" if left else ""))
        return split, notes
    split = make_split(ids, val_fraction, fold, folds)
    if fold is not None:
        notes.append(f"fold {fold} of {folds or DEFAULT_FOLDS}: {len(split.train)} training, {len(split.val)} "
                     "validation case(s)")
    elif split.val:
        notes.append(f"validation split: {len(split.val)} of {len(ids)} case(s) held out (--val-fraction "
                     f"{val_fraction:g}; see {path})")
    elif val_fraction > 0:
        notes.append("only one training case: no validation split (the last weights are the model)")
    return split, notes


def save_split(output: Path, split: Split) -> Path:
    """Write ``OUTPUT/splits.json`` atomically."""
    return write_json(output / SPLITS_FILE, split.to_dict())


def split_summary(split: Split | None) -> dict[str, Any] | None:
    """Counts for ``training_args.json``."""
    if split is None:
        return None
    return {"train_cases": len(split.train), "val_cases": len(split.val), "origin": split.origin}
