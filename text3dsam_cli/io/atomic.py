"""Atomic file writing: write to a hidden temporary file beside the target, check it, then rename it into place.

Guarantees (see docs/formats.md, "Atomic writes"):

* nothing is ever written under the final name except by ``os.replace`` of a complete, ``fsync``-ed file;
* a write that fails, is interrupted (Ctrl-C, SIGTERM) or is found incomplete by the caller's check leaves
  no temporary file behind and the previous target (if any) untouched;
* ``ENOSPC``/``EDQUOT`` become ``OutputError("no space left on device")`` and ``EFBIG`` "file too large";
* temporary names are ``.tmp-<8 hex>-<name>`` with the suffix lower-cased (SimpleITK picks its writer from a
  case-sensitive suffix), the name part hashed when the result would exceed the file system's 255-byte name
  limit, and non-UTF-8 bytes replaced, so that C++ libraries always get an encodable path.
  :func:`clean_stale_temps` removes temporary files of given targets left by a killed run.

:func:`write_text` and :func:`write_json` are the one way the package writes a text or JSON file (sidecars,
markers, ``config.json``, tokenizer files, training state, evaluation reports).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from text3dsam_cli.errors import OutputError

TEMP_PREFIX = ".tmp-"
NAME_MAX = 255
#: Endings with more than one dot (or not lower case) kept on temporary names, longest first; any other ending
#: of up to 8 characters is kept as it is. Every ending of the format registry (``io/formats.py``) must come out
#: whole (tests/test_io_formats.py); not imported from the registry, which sits above every writer.
KNOWN_SUFFIXES = (".rtstruct.dcm", ".seg.dcm", ".nii.gz", ".nii", ".nrrd", ".mha", ".npz", ".json", ".png", ".csv",
                  ".dcm")
_TEMP_RE = re.compile(r"^\.tmp-[0-9a-f]{8}-(.+)$")


def _split_suffix(name: str) -> tuple[str, str]:
    lower = name.lower()
    for suffix in KNOWN_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    dot = name.rfind(".")
    if dot > 0 and len(name) - dot <= 8:
        return name[:dot], name[dot:].lower()
    return name, ""


def encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 text (no lone surrogates from undecodable file-name bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def temp_key(target_name: str) -> str:
    """The part of a temporary name that identifies its target (see the module docstring)."""
    stem, suffix = _split_suffix(target_name)
    if not encodable(stem):
        stem = stem.encode("utf-8", "surrogateescape").decode("ascii", "replace").replace("\ufffd", "_")
    key = stem + suffix
    if len(os.fsencode(key)) + len(TEMP_PREFIX) + 9 > NAME_MAX:
        digest = hashlib.sha1(os.fsencode(target_name)).hexdigest()[:20]
        key = f"{digest}{suffix}"
    return key


def temp_name(target_name: str) -> str:
    """A fresh temporary name for ``target_name``."""
    return f"{TEMP_PREFIX}{secrets.token_hex(4)}-{temp_key(target_name)}"


def clean_stale_temps(targets: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete temporary files that a killed run left for any of ``targets``; return what was removed."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        target = Path(target)
        by_folder.setdefault(target.parent, set()).add(temp_key(target.name))
    removed = []
    for folder, keys in by_folder.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = _TEMP_RE.match(name)
            if match and match.group(1) in keys:
                with contextlib.suppress(OSError):
                    (folder / name).unlink()
                    removed.append(folder / name)
    return removed


def describe_os_error(exc: OSError) -> str:
    """A short reason for an OS error, with the full-disk cases spelled out."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if exc.errno == errno.EFBIG:
        return "file too large (file system or file size limit)"
    if exc.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return exc.strerror or str(exc)


def _prepare_folder(target: Path) -> Path:
    """Create the target's folder if needed and check that it is writable; return it."""
    folder = target.parent
    if target.is_dir():
        raise OutputError("is a folder, expected a file path", target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError("cannot create the output folder: a file of that name is in the way", folder) from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({describe_os_error(exc)})", folder) from None
    if not folder.is_dir():
        raise OutputError("cannot create the output folder: a file of that name is in the way", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", folder)
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(folder)


def _free_bytes(folder: Path) -> int | None:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


#: Below this many free bytes after a failed write, the failure is reported as a full disk.
_FULL_DISK_MARGIN = 1 << 20


def disk_full(folder: Path) -> bool:
    """Whether the file system holding ``folder`` is (nearly) full: the likely cause of a failed write."""
    free = _free_bytes(folder)
    return free is not None and free < _FULL_DISK_MARGIN


#: Test hook, never set in normal use: a write of the file whose path this variable names first creates the file
#: named by PAUSED_ENV and then waits (up to PAUSE_SECONDS), so that a test can deliver a signal at exactly that
#: step of a run (tests/test_robustness.py) instead of racing the writer.
PAUSE_ENV = "TEXT3DSAM_TEST_PAUSE_BEFORE"
PAUSED_ENV = "TEXT3DSAM_TEST_PAUSED"
PAUSE_SECONDS = 600.0


def _pause_for_tests(target: Path) -> None:
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted or os.path.abspath(target) != os.path.abspath(wanted):
        return
    flag = os.environ.get(PAUSED_ENV)
    if flag:
        Path(flag).touch()
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str],
                verify: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success check it and rename it onto ``target``.

    ``verify(tmp)`` (optional) inspects the written temporary file and returns None when it is complete or a
    reason when it is not (for writers such as ITK's that report write errors only on stderr). On any
    exception inside the block, or a failed check, the temporary file is deleted and the target is left
    untouched. A missing target folder is created; a folder that cannot be created or written raises
    ``OutputError``.
    """
    target = Path(target)
    _pause_for_tests(target)
    folder = _prepare_folder(target)
    tmp = folder / temp_name(target.name)
    try:
        try:
            yield tmp
            if not tmp.exists():
                raise OutputError("nothing was written", target)
            _fsync(tmp)
            problem = verify(tmp) if verify is not None else None
            if problem is None and tmp.stat().st_size == 0:
                problem = "the written file is empty"
            if problem is not None:
                raise OutputError(f"write failed: {'no space left on device' if disk_full(folder) else problem}",
                                  target)
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot write ({describe_os_error(exc)})", target) from None
        _fsync_folder(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike[str], text: str, errors: str = "strict") -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (:func:`atomic_path`); return the path.

    ``errors="surrogateescape"`` writes names holding undecodable file-name bytes back as those bytes.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)
    return path


def write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as JSON (``indent`` spaces, a final newline) to ``path`` atomically; return the path."""
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n")
