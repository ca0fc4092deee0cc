"""Safe calls into SimpleITK/ITK: paths it can encode, and C-level stderr chatter kept off the terminal.

* ITK takes file names as UTF-8 ``std::string``; a Python path holding undecodable bytes (lone surrogates
  from ``os.fsdecode``) aborts the process in C++. :func:`itk_path` yields an encodable alias: the path itself
  when it is valid UTF-8, else a symlink with a safe name in a private temporary folder.
* Some ITK parts (niftilib's "** ERROR: NWAD" on a full disk, MetaIO, GDCM) print straight to the C stderr
  instead of raising. :func:`captured_stderr` redirects file descriptor 2 around such calls and hands the
  text back, so the caller can turn it into one clear line (and log it for ``--debug``).
* :func:`volume_from_image` turns a SimpleITK image into a :class:`Volume` after the checks every reader
  applies (:func:`check_layout`, finite voxels); :func:`first_error_line` makes ITK's exceptions one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from text3dsam_cli.errors import InputError
from text3dsam_cli.io.atomic import _split_suffix, encodable
from text3dsam_cli.io.npz import check_finite
from text3dsam_cli.io.volume import Volume, shape_text

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk

log = logging.getLogger(__name__)
_STDERR_LOCK = threading.Lock()


_WARNINGS_OFF = False


def simpleitk() -> Any:
    """The SimpleITK module, imported on first use: an npz run never needs it (75 ms of start-up). Every module
    here takes it from this function, so that :func:`silence_itk_warnings` holds however late it is imported."""
    import SimpleITK

    if _WARNINGS_OFF:
        SimpleITK.ProcessObject.SetGlobalWarningDisplay(False)
    return SimpleITK


def silence_itk_warnings() -> None:
    """Turn off ITK's multi-line warning printer for the whole process (the CLI reports its own lines); applied
    when SimpleITK is imported, if it is not yet."""
    global _WARNINGS_OFF
    _WARNINGS_OFF = True
    if "SimpleITK" in sys.modules:
        simpleitk()


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


def check_layout(dimension: int, size: tuple[int, ...], components: int, path: Path) -> None:
    """Refuse anything but a single-channel 3-D image with more than one slice."""
    shown = shape_text(tuple(reversed(size)))  # ITK sizes are (x, y, z); messages show array order
    if components != 1:
        raise InputError(f"has {components} values per voxel (colour or vector image, size {shown}); "
                         "a single-channel 3-D volume is needed", path)
    if dimension < 3:
        raise InputError(f"is a {dimension}-D image (size {shown}); a 3-D volume is needed", path)
    if dimension > 3:
        raise InputError(f"is a {dimension}-D image (size {shown}); only 3-D volumes are supported "
                         "(extract one 3-D volume first)", path)
    if size[2] < 2:
        raise InputError(f"has a single slice (size {shown}), i.e. it is a 2-D image; a 3-D volume is needed",
                         path)


def volume_from_image(image: sitk.Image, path: Path, source_format: str, modality: str | None,
                      meta: dict[str, Any]) -> Volume:
    """Wrap a SimpleITK image as a :class:`Volume` after the layout and finiteness checks."""
    check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError("has complex-valued voxels; a real-valued volume is needed", path)
    return volume_from_array(simpleitk().GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                             image.GetDirection(), path, source_format, modality, meta)


def volume_from_array(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                      direction: Sequence[float], path: Path, source_format: str, modality: str | None,
                      meta: dict[str, Any]) -> Volume:
    """A (z, y, x) array read without a full SimpleITK image (straight from the file, or in slabs) and its
    geometry in ITK's terms, as a :class:`Volume`, after the same checks as :func:`volume_from_image`."""
    check_layout(3, tuple(reversed(array.shape)), 1, path)
    check_finite(array, path, "the image")
    return Volume(
        array=array,
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction),
        path=path,
        source_format=source_format,
        modality=modality,
        meta=meta,
    )


def numpy_dtype(pixel_id: int) -> np.dtype:
    """The numpy dtype ``sitk.GetArrayFromImage`` gives an image of SimpleITK pixel type ``pixel_id``."""
    sitk = simpleitk()
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id)).dtype


def first_error_line(exc: BaseException) -> str:
    """The informative part of a (multi-line) SimpleITK/ITK exception message, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    index = max((i for i, ln in enumerate(lines) if "ERROR" in ln), default=len(lines) - 1)
    text = lines[index].split("ERROR:", 1)[-1].strip()
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    if (text.endswith(":") or not text) and index + 1 < len(lines):
        text = lines[-1]
    text = re.sub(r"^\[\w+\]\s*(\w+:\s*)?", "", text)
    return text.rstrip(":").strip() or type(exc).__name__
