"""Safe calls into SimpleITK/ITK: paths it can encode, and C-level stderr chatter kept off the terminal.

* ITK takes file names as UTF-8 ``std::string``; a Python path holding undecodable bytes (lone surrogates
  from ``os.fsdecode``) aborts the process in C++. :func:`itk_path` yields an encodable alias: the path itself
  when it is valid UTF-8, else a symlink with a safe name in a private temporary folder.
* Some ITK parts (niftilib's "** ERROR: NWAD" on a full disk, MetaIO, GDCM) print straight to the C stderr
  instead of raising. :func:`captured_stderr` redirects file descriptor 2 around such calls and hands the
  text back, so the caller can turn it into one clear line (and log it for ``--debug``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import SimpleITK as sitk

from text3dsam_cli.io.atomic import _split_suffix, encodable

log = logging.getLogger(__name__)
_STDERR_LOCK = threading.Lock()


def silence_itk_warnings() -> None:
    """Turn off ITK's multi-line warning printer for the whole process (the CLI reports its own lines)."""
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect the process's stderr (fd 2) into a buffer for the block; the text lands in the yielded list."""
    out: list[str] = []
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded): nothing to capture
            yield out
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield out
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode("utf-8", "replace")
                if text.strip():
                    out.append(text)
                    log.debug("ITK wrote on stderr: %s", text.strip())


@contextlib.contextmanager
def itk_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A name under which ITK can open ``path`` (the path itself, or a symlink with an encodable name)."""
    text = os.fspath(path)
    if encodable(text):
        yield text
        return
    target = os.path.abspath(text)
    _, suffix = _split_suffix(os.path.basename(target))
    with tempfile.TemporaryDirectory(prefix="text3dsam-link-") as tmp:
        alias = os.path.join(tmp, f"link{suffix}")
        os.symlink(target, alias)
        yield alias


@contextlib.contextmanager
def itk_folder(folder: str | os.PathLike[str]) -> Iterator[tuple[str, Path]]:
    """An encodable name for a folder and the real folder (to map returned file names back)."""
    with itk_path(folder) as name:
        yield name, Path(folder)
