"""Atomic file writing: write to a hidden temporary file beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from text3dsam_cli.errors import OutputError

TEMP_PREFIX = ".tmp-"


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
        raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", folder) from None
    if not folder.is_dir():
        raise OutputError("cannot create the output folder: a file of that name is in the way", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", folder)
    return folder


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``target``.

    The temporary name is ``.tmp-<random>-<target name>``, so it keeps the target's suffix (SimpleITK picks
    its writer from the suffix) and stays hidden. On any exception inside the block the temporary file is
    deleted and the exception propagates; the target is left untouched. A missing target folder is created;
    a folder that cannot be created or written raises ``OutputError``.
    """
    target = Path(target)
    folder = _prepare_folder(target)
    tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{target.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError("nothing was written", target)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(f"cannot move the written file into place ({exc.strerror or exc})", target) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
