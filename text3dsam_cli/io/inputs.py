"""Turning command-line input arguments into a list of images to process, and sharding that list.

Rules (see ``docs/formats.md``):

* a file with an ending of an input format of the registry (:mod:`text3dsam_cli.io.formats`: ``.nii.gz``,
  ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, ``.npz``, ``.dcm``) or any DICOM file is one input (a
  DICOM file stands for its series);
* a folder that directly holds DICOM image files and no other image files is one input: a DICOM series;
* any other folder is a folder of inputs: its image files (hidden files and ``*_gt.npz`` ground-truth files
  skipped) plus each direct subfolder that is a DICOM series folder; deeper folders are not searched;
* ``-`` reads more arguments from standard input, one path per line (blank lines ignored);
* an ``http(s)://`` argument is a DICOMweb study or series URL (:mod:`text3dsam_cli.io.dicomweb`), one input
  named by its last UID; nothing is fetched until it is read.

Each input gets an output ``name``: ``<stem>`` plus its format's ``default_output`` (the input file name for
``.npz``, the challenge convention; ``<stem>.nii.gz`` for the others); the stem is the file name without its
image ending, or the folder name for DICOM series.
When two inputs would share a name, their parent folder names are prefixed until the names differ.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.io import dicomweb, formats
from text3dsam_cli.io.readers import image_format, strip_image_suffix

GT_SUFFIX = "_gt.npz"
#: The format whose inputs may be folders (DICOM series).
_SERIES = next(f for f in formats.INPUT_FORMATS if f.reads_folders)


@dataclass(frozen=True)
class InputItem:
    """One input to process: ``path`` (file or DICOM folder), ``kind`` and the output ``name``/``stem``.

    ``error`` marks a folder entry that cannot be used (a symlink loop, an unreadable entry): the run reports
    it as a failed input with that message and processes the rest."""

    path: Path
    kind: str
    stem: str
    error: str | None = None  # set for a folder entry that cannot be used (e.g. a symlink loop): reported, skipped

    @property
    def name(self) -> str:
        """Default output file name: the stem plus the ``default_output`` ending of the input's format
        (``case.npz`` for npz inputs, ``case.nii.gz`` otherwise)."""
        fmt = formats.by_name(self.kind)
        return f"{self.stem}{(fmt or formats.Format).default_output}"


def _file_item(path: Path) -> InputItem | None:
    fmt = formats.detect_format(path)
    if fmt is None:
        return None
    stem = strip_image_suffix(path.name)
    if fmt.reads_folders:  # one file of a series stands for its folder
        stem = path.parent.name or stem
    return InputItem(path=path, kind=fmt.name, stem=stem)


def _is_series_folder(folder: Path) -> bool:
    """A DICOM series folder: holds DICOM image files and no other image files."""
    try:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return False
    if any(image_format(p) not in (None, _SERIES.name) for p in files):
        return False
    from text3dsam_cli.io.dicom import folder_has_dicom_images  # pydicom + SimpleITK: only for folders

    return folder_has_dicom_images(folder)


def _expand_folder(folder: Path) -> list[InputItem]:
    from text3dsam_cli.io.dicom import folder_has_dicom_images, is_dicom_file  # only folders need pydicom

    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"cannot list the folder ({exc.strerror or exc})", folder) from None
    if _is_series_folder(folder):
        return [InputItem(path=folder, kind=_SERIES.name, stem=folder.name)]
    items: list[InputItem] = []
    loose_dicom = False
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            entry.stat()
        except OSError as exc:
            if entry.is_symlink() and image_format(entry) is None and exc.errno != errno.ELOOP:
                continue  # a dangling link to something that is not an image: not an input
            reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot access ({exc.strerror or exc})"
            items.append(InputItem(path=entry, kind="unusable", stem=strip_image_suffix(entry.name),
                                   error=f"{entry}: {reason}"))
            continue
        if entry.is_dir():
            if _is_series_folder(entry):
                items.append(InputItem(path=entry, kind=_SERIES.name, stem=entry.name))
            continue
        if entry.name.lower().endswith(GT_SUFFIX):
            continue
        fmt = image_format(entry)
        if fmt in (None, _SERIES.name):
            loose_dicom = loose_dicom or is_dicom_file(entry)
            continue
        item = _file_item(entry)
        if item is not None:
            items.append(item)
    if loose_dicom and folder_has_dicom_images(folder):
        items.append(InputItem(path=folder, kind=_SERIES.name, stem=folder.name))
    if not items:
        series = " and ".join(f"{f.title} series" for f in formats.INPUT_FORMATS if f.reads_folders)
        raise InputError(f"no images in this folder (looked for {', '.join(formats.file_input_suffixes())} files "
                         f"and {series})", folder)
    return items


def _expand_one(arg: str) -> list[InputItem]:
    path = Path(arg).expanduser()
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_dir():
        return _expand_folder(path)
    item = _file_item(path)
    if item is None:
        raise InputError(f"unsupported file type (expected {formats.describe_inputs()}, or a folder of inputs)",
                         path)
    return [item]


def _dicomweb_item(url: str) -> list[InputItem]:
    source = dicomweb.DicomWebSource(url)
    return [InputItem(path=source, kind=dicomweb.KIND, stem=source.name)]  # type: ignore[arg-type]


def _read_list(stream: TextIO) -> list[str]:
    """Paths from a stream, one per line; bytes that are not UTF-8 are kept (``os.fsdecode``), not fatal."""
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        try:
            data = raw.read()
        except (OSError, ValueError):
            data = None
        if isinstance(data, bytes):
            lines = [os.fsdecode(line) for line in data.split(b"\n")]
            return [line.strip() for line in lines if line.strip()]
    return [line.strip() for line in stream.read().splitlines() if line.strip()]


def _resolved(path: Path) -> Path:
    """An absolute, symlink-free path; a loop or an unreadable link yields the absolute path unresolved."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _anchor(item: InputItem) -> Path:
    """The folder whose name (and its parents' names) can tell apart inputs that share a stem."""
    path = _resolved(item.path)
    if item.kind == _SERIES.name and path.is_file():
        return path.parent.parent  # the stem is already the series folder's name
    return path.parent


def _unique_stems(items: list[InputItem]) -> list[InputItem]:
    """Prefix parent folder names to stems (``case1_dicom``) wherever two inputs would share an output name.

    Inputs that cannot be told apart that way (``x.nii`` and ``x.nii.gz`` in one folder) get ``_1``, ``_2``.
    """
    stems = [item.stem for item in items]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.name, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        anchors = [_anchor(items[i]) for i in members]
        chains = [[p.name for p in (a, *a.parents) if p.name] for a in anchors]
        resolved = False
        if len(set(anchors)) == len(anchors):
            for level in range(1, max(len(c) for c in chains) + 1):
                candidates = ["_".join([*reversed(c[:level]), stems[i]]) for c, i in zip(chains, members,
                                                                                         strict=True)]
                if len(set(candidates)) == len(candidates):
                    for i, candidate in zip(members, candidates, strict=True):
                        stems[i] = candidate
                    resolved = True
                    break
        if not resolved:
            for number, i in enumerate(members, start=1):
                stems[i] = f"{stems[i]}_{number}"
    return [InputItem(path=item.path, kind=item.kind, stem=stem, error=item.error)
            for item, stem in zip(items, stems, strict=True)]


def expand_inputs(args: Sequence[str | os.PathLike[str]], stdin: TextIO | None = None) -> list[InputItem]:
    """Expand files, folders and ``-`` (paths from ``stdin``, default ``sys.stdin``) into inputs.

    Order follows the arguments (folders sorted by name); the same path given twice is kept once.
    Missing paths, unsupported files and folders without images raise :class:`InputError`.
    """
    pending: list[str] = []
    for arg in args:
        text = os.fspath(arg)
        if text == "-":
            pending.extend(_read_list(stdin if stdin is not None else sys.stdin))
        else:
            pending.append(text)
    if not pending:
        raise InputError("no inputs given")
    items: list[InputItem] = []
    seen: set[Path] = set()
    for text in pending:
        for item in _dicomweb_item(text) if dicomweb.is_url(text) else _expand_one(text):
            key = _resolved(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return _unique_stems(items)


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``1 <= i <= n``; anything else raises :class:`UsageError`."""
    match = _SHARD.match(spec or "")
    if match:
        index, count = int(match.group(1)), int(match.group(2))
        if 1 <= index <= count:
            return index, count
    raise UsageError(f"invalid shard {spec!r}: expected i/n with 1 <= i <= n, e.g. 1/4")


_DECIMAL = re.compile(r"^[0-9]+$")
_IRREGULAR_ARRAY = "use a regular --array=A-B[:S], or give --shard i/n"


def _env_number(env: Mapping[str, str], name: str) -> int:
    """``$name`` as a whole number: plain decimal digits only (no sign, no spaces, no ``1_0``)."""
    value = env.get(name)
    if value is None or not _DECIMAL.match(value):
        raise UsageError(f"--shard auto: ${name} is {value!r}, not a whole number (decimal digits only)")
    return int(value)


def _step_level(env: Mapping[str, str]) -> tuple[int, int, str]:
    """This worker's ``(rank, size, source)`` within its job step: torchrun's ``RANK``/``WORLD_SIZE`` when set
    (it already spans the nodes of the step), else srun's ``SLURM_PROCID``/``SLURM_NTASKS``, else ``(0, 1)``."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size, source = _env_number(env, "RANK"), _env_number(env, "WORLD_SIZE"), "torchrun RANK/WORLD_SIZE"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, size = _env_number(env, "SLURM_PROCID"), _env_number(env, "SLURM_NTASKS")
        source = "srun SLURM_PROCID/SLURM_NTASKS"
    else:
        return 0, 1, ""
    if not rank < size:
        raise UsageError(f"--shard auto: {source} is rank {rank} of {size}, which is out of range")
    return rank, size, source


def _array_level(env: Mapping[str, str]) -> tuple[int, int, str]:
    """This task's ``(index, count, source)`` in a SLURM job array (``(0, 1, "")`` outside one).

    The index is ``(SLURM_ARRAY_TASK_ID - MIN) / STEP``; the array must be a regular range (``--array=A-B[:S]``):
    when ``SLURM_ARRAY_TASK_COUNT`` disagrees with MIN/MAX/STEP (a list such as ``--array=0,2,4``), the task IDs
    cannot be mapped to shards, and every task refuses rather than skip or repeat inputs.
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1, ""
    task = _env_number(env, "SLURM_ARRAY_TASK_ID")
    first = _env_number(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_number(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    last = _env_number(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else None
    count = _env_number(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env else None
    if step < 1 or (last is not None and last < first):
        raise UsageError(f"--shard auto: the SLURM array (MIN {first}, MAX {last}, STEP {step}) is not a range; "
                         f"{_IRREGULAR_ARRAY}")
    if last is not None:
        regular = (last - first) // step + 1
        if count is not None and count != regular:
            raise UsageError(f"--shard auto: the SLURM array's task IDs are not a regular range (COUNT {count}, "
                             f"but MIN {first}, MAX {last}, STEP {step} make {regular}), so they cannot be "
                             f"mapped to shards; {_IRREGULAR_ARRAY}")
        count = regular
    if count is None:
        raise UsageError("--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                         "SLURM_ARRAY_TASK_MAX")
    if task < first or (task - first) % step or (task - first) // step >= count:
        raise UsageError(f"--shard auto: array task {task} is not on the range {first}, {first + step}, ... "
                         f"({count} tasks); {_IRREGULAR_ARRAY}")
    return (task - first) // step, count, "SLURM job array"


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``--shard auto``: this worker's ``(i, n)`` from the launcher's environment, composing two levels.

    * the job-step level: torchrun / ``torch.distributed.run`` ``RANK`` of ``WORLD_SIZE`` when set (it already
      spans the nodes of the step), else the step's ``srun`` tasks, ``SLURM_PROCID`` of ``SLURM_NTASKS``;
    * the array level: a SLURM job array, ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
      SLURM_ARRAY_TASK_STEP`` of ``SLURM_ARRAY_TASK_COUNT`` (a regular range such as ``--array=0-15`` or
      ``1-31:2``; anything else is refused).

    ``i = array_index * step_size + step_rank + 1`` of ``n = array_count * step_size``, so every worker of every
    array task gets its own shard. Every number must be plain decimal digits.
    """
    env = os.environ if environ is None else environ
    rank, size, step_source = _step_level(env)
    index, count, array_source = _array_level(env)
    if not step_source and not array_source:
        raise UsageError("--shard auto needs a launcher: torchrun (RANK, WORLD_SIZE) or a SLURM job array "
                         "(SLURM_ARRAY_TASK_ID, ...) or srun tasks (SLURM_PROCID, SLURM_NTASKS); neither is set, "
                         "so give --shard i/n")
    shard, total = index * size + rank + 1, count * size
    if not 1 <= shard <= total:  # unreachable after the checks above; kept as the last guard
        raise UsageError(f"--shard auto: gives shard {shard} of {total}, which is out of range")
    return shard, total


def select_shard(items: Iterable[InputItem], spec: str | None,
                 environ: Mapping[str, str] | None = None) -> list[InputItem]:
    """The items of shard ``i/n``: sorted by path string, those whose index ``k`` has ``k % n == i - 1``.

    ``spec`` None returns all items, sorted the same way; ``"auto"`` takes ``i/n`` from the launcher's
    environment (:func:`shard_from_environment`). Every item lands in exactly one of the n shards.
    """
    ordered = sorted(items, key=lambda item: str(item.path))
    if spec is None:
        return ordered
    if spec.strip().lower() == "auto":
        index, count = shard_from_environment(environ)
    else:
        index, count = parse_shard(spec)
    return [item for k, item in enumerate(ordered) if k % count == index - 1]
