"""What a run shows while it goes: ``train_log.jsonl`` and ``train_log.csv``, ``progress.png``, TensorBoard.

The JSON lines are the record; the CSV holds the same rows for spreadsheets (``type,step,epoch,loss,lr,
seconds,elapsed,mean_dice,dice_<class>...``: train rows fill the first six, validation rows ``mean_dice``
and the per-class means). When a run resumes, both keep only what was logged up to its checkpoint.
``progress.png`` (loss, learning rate and validation Dice against step, as nnU-Net's progress.png) is
drawn with matplotlib's Agg backend (no display needed) at every validation, checkpoint and at the end.
Everything here runs on the main process only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.atomic import atomic_path, write_text

LOG_FILE = "train_log.jsonl"
CSV_FILE = "train_log.csv"
PLOT_FILE = "progress.png"
TENSORBOARD_DIR = "tensorboard"
CSV_COLUMNS = ("type", "step", "epoch", "loss", "lr", "seconds", "elapsed", "mean_dice")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


class RunLog:
    """``train_log.jsonl`` plus ``train_log.csv``, appended and flushed as records arrive.

    ``keep_until`` None starts both files afresh; a step keeps the records up to it (a resumed run) and
    rewrites the CSV from them. ``classes`` are the validation class keys (CSV columns ``dice_<key>``).
    ``records`` holds every record of the run so far (what the plot draws).
    """

    def __init__(self, folder: Path, keep_until: int | None, enabled: bool, classes: Sequence[str] = ()) -> None:
        self.path = folder / LOG_FILE
        self.csv_path = folder / CSV_FILE
        self.enabled = enabled
        self.columns = [*CSV_COLUMNS, *(f"dice_{k}" for k in classes)]
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        kept: list[str] = []
        if keep_until is not None and self.path.is_file():  # drop what a killed run logged after its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("type") != "done" and record.get("step", 0) <= keep_until:
                        kept.append(line + "\n")
                        self.records.append(record)
        self.path.write_text("".join(kept), encoding="utf-8")  # may be empty: not via write_text
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for record in self.records:
            writer.writerow(self._row(record))
        write_text(self.csv_path, buffer.getvalue())

    def _row(self, record: dict[str, Any]) -> list[str]:
        per_class = record.get("class_mean") or {}
        values = {**record, **{f"dice_{k}": v for k, v in per_class.items()}}
        return [_cell(values.get(c)) for c in self.columns]

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to both files."""
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if record.get("type") in ("train", "val"):
            with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(self._row(record))

    def validations(self) -> list[dict[str, Any]]:
        """The validation records so far."""
        return [r for r in self.records if r.get("type") == "val"]


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or values.size < width:
        return values
    kernel = np.ones(width) / width
    padded = np.concatenate([np.full(width - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_progress(records: Sequence[dict[str, Any]], path: Path, best_step: int | None = None) -> Path | None:
    """Draw loss, learning rate and validation Dice against step into ``path`` (PNG, written atomically).

    Returns None when there is nothing to draw yet.
    """
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    if not train:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train], dtype=float)
    lr = np.array([r["lr"] for r in train], dtype=float)
    rows = 3 if val else 2
    fig = Figure(figsize=(9, 2.6 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True)
    ax = axes[0]
    width = max(1, len(loss) // 50)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35 if width > 1 else 1.0, linewidth=0.8, label="loss")
    if width > 1:
        ax.plot(steps, _smooth(loss, width), color="tab:blue", linewidth=1.6, label=f"mean of {width} steps")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(steps, lr, color="tab:orange")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    if val:
        ax = axes[2]
        vsteps = [r["step"] for r in val]
        ax.plot(vsteps, [r.get("mean_dice", math.nan) for r in val], "o-", color="tab:green", label="mean Dice")
        keys: list[str] = []
        for r in val:
            keys.extend(k for k in (r.get("class_mean") or {}) if k not in keys)
        for key in keys[:12]:
            ax.plot(vsteps, [(r.get("class_mean") or {}).get(key, math.nan) for r in val], "--", linewidth=0.9,
                    alpha=0.7, label=f"class {key}")
        if best_step is not None:
            ax.axvline(best_step, color="grey", linestyle=":", label=f"best (step {best_step})")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="lower right", fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def check_tensorboard() -> None:
    """Refuse ``--tensorboard`` when the ``tensorboard`` package is missing (usage error)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'text3dsam-cli[tensorboard]'")


class TensorBoard:
    """TensorBoard event files in ``OUTPUT/tensorboard/`` (``purge_step``: a resumed run drops later events)."""

    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / TENSORBOARD_DIR), purge_step=purge_step or None)

    def write(self, record: dict[str, Any]) -> None:
        """Scalars of one log record."""
        step = int(record.get("step", 0))
        if record.get("type") == "train":
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("train/lr", record["lr"], step)
        elif record.get("type") == "val":
            self.writer.add_scalar("val/mean_dice", record.get("mean_dice", math.nan), step)
            for key, value in (record.get("class_mean") or {}).items():
                self.writer.add_scalar(f"val/dice_{key}", value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def remove_run_files(folder: Path) -> None:
    """Delete the log, CSV and plot of a previous run (``--overwrite``)."""
    for name in (LOG_FILE, CSV_FILE, PLOT_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
