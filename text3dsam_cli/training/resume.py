"""Resume guards: a rerun into an OUTPUT that holds a run continues it only when nothing that changes the run
differs.

``training_args.json`` records what a run actually used: every :class:`TrainingArguments` field (paths
resolved), the world size, the starting model, fingerprints of the data and of the prompts, the total and
warm-up steps. A rerun compares its own record with it, field by field, **generically**: every argument field
is compared except those listed in :data:`MAY_DIFFER` (how and where the run goes on, how often it
checkpoints, validates and logs), so a field added to ``TrainingArguments`` is guarded without touching this
module. A larger total (``--max-steps``, ``--epochs``) extends the run; a smaller one is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from text3dsam_cli.training.data import DataSource

ARGS_FILE = "training_args.json"

#: The one list of TrainingArguments fields that may differ when a run resumes (with why); every other field
#: changes the run (data, prompts, learning rate and schedule, batch, augmentation, freezing, LoRA settings,
#: precision, seed, split, ...) and is refused unless --overwrite.
MAY_DIFFER: dict[str, str] = {
    "output": "the folder itself",
    "device": "where the run goes on (another GPU or machine)",
    "resume": "whether to resume",
    "overwrite": "whether to start over",
    "max_steps": "the length: a larger total extends the run, a smaller one is refused (see total_steps)",
    "epochs": "the length, as max_steps",
    "early_stop": "the stopping rule, applied again with the new value",
    "save_every": "checkpoint cadence",
    "keep_checkpoints": "checkpoints kept on disk",
    "val_every": "validation cadence",
    "cache": "memory use only",
    "tensorboard": "logging only",
}
#: Recorded facts besides the arguments that must agree, and how a difference is named.
RUN_FACTS = {"processes": "world size (processes)", "starting_model": "starting model",
             "data_fingerprint": "data (the case files)", "prompts_fingerprint": "prompts (classes or phrasings)"}
#: Option names that are not ``--field-name``.
OPTION_NAMES = {"learning_rate": "--lr", "data": "DATA"}


def option_name(field: str) -> str:
    """The CLI spelling of a TrainingArguments field."""
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def data_fingerprint(source: DataSource) -> dict[str, Any]:
    """Case count and a hash of every case's name and file sizes (a case added, removed or replaced)."""
    items = []
    for case in source.cases:
        sizes = []
        for path in (case.image, case.labels):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(-1)
        items.append([case.name, *sizes])
    digest = hashlib.sha256(json.dumps([source.layout, items]).encode()).hexdigest()[:16]
    return {"cases": len(items), "sha256": digest}


def prompts_fingerprint(source: DataSource) -> str:
    """A hash of every case's classes: keys, label values and phrasings."""
    items = [[case.name, [[c.key, list(c.values), list(c.prompts)] for c in case.classes], case.instance]
             for case in source.cases]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def read_record(output: Path) -> dict[str, Any] | None:
    """The ``training_args.json`` of a previous run in ``output`` (None when absent or unreadable)."""
    try:
        data = json.loads((output / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each difference that changes the run, as ``"--lr 0.0001 -> 0.0005"``.

    Fields missing from the previous record (written by an older version) are not compared.
    """
    out = []
    before, now = previous.get("args") or {}, current.get("args") or {}
    for key in now:
        if key in MAY_DIFFER or key not in before:
            continue
        if before[key] != now[key]:
            out.append(f"{option_name(key)} {_show(before[key])} -> {_show(now[key])}")
    for key, label in RUN_FACTS.items():
        if key in previous and previous[key] != current.get(key):
            out.append(f"{label} {_show(previous[key])} -> {_show(current.get(key))}")
    old_total, new_total = previous.get("total_steps"), current.get("total_steps")
    if isinstance(old_total, int) and isinstance(new_total, int) and new_total < old_total:
        out.append(f"total steps {old_total} -> {new_total} (only a larger --max-steps or --epochs continues a "
                   "run)")
    return out


def refusal(output: Path, diffs: list[str]) -> str:
    """The one-line message refusing to resume."""
    return (f"{output}: holds a run with other settings ({'; '.join(diffs)}); rerun with the same settings "
            "(a larger --max-steps continues it) or add --overwrite to start over")
