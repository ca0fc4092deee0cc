"""Challenge ``.npz`` files, read without trusting their pickles.

A challenge case holds ``imgs`` (D, H, W) uint8, ``spacing`` (x, y, z), optionally ``text_prompts`` (a
pickled 0-d object array holding a dict) and ``boxes`` (a pickled object array of dicts); ground-truth files
hold ``gts``. Numeric members are loaded with ``allow_pickle=False``. Object members are unpickled by
:class:`_RestrictedUnpickler`, which can rebuild a numpy object array and nothing else (no other class or
function is reachable), and the result must consist of plain dicts, lists, strings and numbers.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io.atomic import atomic_path, describe_os_error
from text3dsam_cli.io.limits import check_voxel_count
from text3dsam_cli.io.volume import IDENTITY_DIRECTION, Volume

REFUSAL = "refusing to unpickle {what} (only plain dicts, strings and numbers are accepted)"

# Limits for object members: they hold a few prompts or boxes, never megabytes.
_MAX_OBJECT_MEMBER_BYTES = 16 * 1024 * 1024
_MAX_OBJECT_ELEMENTS = 1_000_000
_MAX_NESTING = 20

_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, KeyError)


class _UnsafePickle(Exception):
    """Raised inside the restricted unpickler; turned into ``InputError`` by the caller."""


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` so that a pickle can name it but never call it directly."""


_NDARRAY = _NdarrayToken()
_DTYPE_CODE = re.compile(r"^(b1|\?|[iu][1248]|f[248]|c(8|16)|O[48]?|[US]\d{1,6})$")


class _DtypeStub:
    """What ``numpy.dtype(code, align, copy)`` becomes: a validated plain dtype, never numpy's own setstate."""

    def __init__(self, code: Any, *flags: Any) -> None:
        if not isinstance(code, str) or not _DTYPE_CODE.match(code) or len(flags) > 2 \
                or not all(isinstance(f, bool) for f in flags):
            raise _UnsafePickle(f"a dtype other than a plain number, string or object ({code!r})")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: Any) -> None:
        # numpy's state: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise _UnsafePickle("a structured or sub-array dtype")
        order = state[1]
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise _UnsafePickle("a dtype with an unknown byte order")


class _ArrayStub:
    """What ``_reconstruct(ndarray, ...)`` becomes; its ``__setstate__`` checks every field before use."""

    value: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _UnsafePickle("a malformed ndarray state")
        shape, dtype, fortran, data = state
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise _UnsafePickle("a malformed ndarray shape")
        if not isinstance(dtype, _DtypeStub) or not isinstance(fortran, bool):
            raise _UnsafePickle("a malformed ndarray state")
        count = 1
        for n in shape:
            count *= n
        if count > _MAX_OBJECT_ELEMENTS:
            raise _UnsafePickle("an ndarray that is too large")
        order = "F" if fortran else "C"
        if dtype.dtype.kind == "O":
            if not isinstance(data, list) or len(data) != count:
                raise _UnsafePickle("an object ndarray whose data do not match its shape")
            if not shape:
                self.value = data[0]
                return
            flat_order = np.arange(count).reshape(shape, order=order).reshape(-1)
            self.value = _nest([data[i] for i in flat_order], shape)
        else:
            if not isinstance(data, bytes) or len(data) != count * dtype.dtype.itemsize:
                raise _UnsafePickle("an ndarray whose data do not match its shape")
            self.value = np.frombuffer(data, dtype=dtype.dtype).reshape(shape, order=order).copy()


def _nest(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """Split a C-ordered flat list into nested lists of the given shape."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> _ArrayStub:
    """``numpy.core.multiarray._reconstruct`` limited to plain ndarrays (filled in by ``__setstate__``)."""
    if subtype is not _NDARRAY:
        raise _UnsafePickle("_reconstruct of something other than numpy.ndarray")
    return _ArrayStub()


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar`` for numeric, boolean and string scalars only."""
    if not isinstance(dtype, _DtypeStub) or dtype.dtype.kind not in "biufc?US":
        raise _UnsafePickle("a numpy scalar of a non-plain dtype")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _UnsafePickle("a malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` (protocol-2 pickles spell bytes this way) for latin-1 / utf-8 strings only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _UnsafePickle("a bad _codecs.encode call")
    return text.encode(encoding)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = _safe_reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = _safe_scalar
for _module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "ndarray")] = _NDARRAY
    _ALLOWED_GLOBALS[(_module, "dtype")] = _DtypeStub
_ALLOWED_GLOBALS[("_codecs", "encode")] = _safe_codecs_encode


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few globals numpy needs to rebuild a plain object array."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _UnsafePickle(f"it references {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _UnsafePickle("it uses persistent ids")


def _plain(value: Any) -> Any:
    """Return ``value`` as plain Python data (dict/list/str/int/float/bool/None) or raise ``_UnsafePickle``.

    Shared references are expanded, so the number of values visited is capped (pickle memo bombs).
    """
    budget = [_MAX_OBJECT_ELEMENTS]

    def walk(item: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _UnsafePickle("too many values")
        if depth > _MAX_NESTING:
            raise _UnsafePickle("nesting too deep")
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, np.generic) and item.dtype.kind in "biuf?US":
            return item.item()
        if isinstance(item, dict):
            out = {}
            for key, sub in item.items():
                key = walk(key, depth + 1)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise _UnsafePickle("a dict key that is not a string or number")
                out[key] = walk(sub, depth + 1)
            return out
        if isinstance(item, (list, tuple)):
            return [walk(sub, depth + 1) for sub in item]
        if isinstance(item, _ArrayStub):
            return walk(item.value, depth + 1)
        if isinstance(item, np.ndarray) and item.dtype.kind in "biuf?US":
            budget[0] -= item.size
            if budget[0] < 0:
                raise _UnsafePickle("too many values")
            return item.tolist()
        raise _UnsafePickle(f"an object of type {type(item).__name__}")

    return walk(value, 0)


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a folder, expected an .npz file", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError("not a valid .npz file (not a zip archive, or truncated)", path) from None
    except OSError as exc:
        raise InputError(f"cannot open ({exc.strerror or exc})", path) from None


def _member_name(zf: zipfile.ZipFile, key: str) -> str | None:
    for name in (f"{key}.npy", key):
        if name in zf.namelist():
            return name
    return None


def npz_keys(path: str | os.PathLike[str]) -> list[str]:
    """Names of the arrays stored in an ``.npz`` file (without reading them)."""
    path = Path(path)
    with _open_zip(path) as zf:
        return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]


def _read_object_member(zf: zipfile.ZipFile, member: str, path: Path, key: str) -> Any:
    """Unpickle an object-dtype ``.npy`` member with the restricted unpickler and return plain data."""
    info = zf.getinfo(member)
    if info.file_size > _MAX_OBJECT_MEMBER_BYTES:
        raise InputError(f"'{key}' is too large for an object member ({info.file_size} bytes)", path)
    try:
        with zf.open(member) as fp:
            _shape, _fortran, dtype = _read_header(fp)
            payload = fp.read()
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read '{key}' ({exc})", path) from None
    if not dtype.hasobject:  # e.g. prompts stored as a plain string array: no pickle involved
        array = _read_numeric_member(zf, member, path, key)
        try:
            return _plain(array.item() if array.ndim == 0 else array)
        except _UnsafePickle as exc:
            raise InputError(f"'{key}' holds {exc}, expected strings or numbers", path) from None
    try:
        value = _RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
        return _plain(value)
    except _UnsafePickle as exc:
        raise InputError(REFUSAL.format(what=f"'{key}': {exc}"), path) from None
    except RecursionError:
        raise InputError(REFUSAL.format(what=f"'{key}': nesting too deep"), path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as exc:
        raise InputError(REFUSAL.format(what=f"'{key}': malformed pickle ({type(exc).__name__})"), path) from None


def _read_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fp)
    if version in ((2, 0), (3, 0)):
        return npy_format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy version {version}")


def _read_numeric_member(zf: zipfile.ZipFile, member: str, path: Path, key: str) -> np.ndarray:
    """A numeric ``.npy`` member, checked against the zip's recorded size before anything is allocated."""
    info = zf.getinfo(member)
    try:
        with zf.open(member) as fp:
            shape, fortran, dtype = _read_header(fp)
            if dtype.hasobject:
                raise InputError(f"'{key}' is an object array, expected numbers", path)
            count = check_voxel_count(shape, path, f"'{key}'")
            needed = count * dtype.itemsize
            header_size = fp.tell()
            if info.file_size - header_size != needed:
                raise InputError(f"cannot read '{key}' (truncated or corrupt: {info.file_size - header_size} "
                                 f"data bytes for shape {shape} {dtype})", path)
            array = np.empty(count, dtype=dtype)
            view = memoryview(array.view(np.uint8))
            got = 0
            while got < needed:
                n = fp.readinto(view[got:])
                if not n:
                    raise EOFError(f"expected {needed} data bytes, got {got}")
                got += n
    except InputError:
        raise
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read '{key}' (truncated or corrupt: {exc})", path) from None
    if fortran and len(shape) > 1:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def read_npz_array(path: str | os.PathLike[str], key: str) -> np.ndarray:
    """One numeric array (e.g. ``gts`` or ``segs``) from an ``.npz`` file, never unpickling anything."""
    path = Path(path)
    with _open_zip(path) as zf:
        member = _member_name(zf, key)
        if member is None:
            raise InputError(f"no '{key}' array in the file (it has: {', '.join(_names(zf)) or 'nothing'})", path)
        return _read_numeric_member(zf, member, path, key)


def _names(zf: zipfile.ZipFile) -> list[str]:
    return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]


def read_npz_object(path: str | os.PathLike[str], key: str) -> Any:
    """An object member (``text_prompts``, ``boxes``) as plain Python data, or None when absent."""
    path = Path(path)
    with _open_zip(path) as zf:
        member = _member_name(zf, key)
        if member is None:
            return None
        return _read_object_member(zf, member, path, key)


def read_text_prompts(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``text_prompts`` dict of a challenge npz (``{"1": "...", "instance_label": 0}``), or None."""
    path = Path(path)
    value = read_npz_object(path, "text_prompts")
    if value is None:
        return None
    return _text_prompts_dict(value, path)


def _text_prompts_dict(value: Any, path: Path) -> dict[str, Any]:
    """``text_prompts`` with string keys; refused when it is no dict or two keys read the same (1 and '1')."""
    if not isinstance(value, dict):
        raise InputError(f"'text_prompts' is a {type(value).__name__}, expected a dict", path)
    prompts = {str(k): v for k, v in value.items()}
    if len(prompts) != len(value):
        raise InputError("text_prompts: two keys read the same (e.g. 1 and '1'): a label value given twice", path)
    return prompts


class NonFiniteValues(InputError):
    """An array holding NaN or infinity (``kind``: "NaN" or "infinite"), where numbers are needed."""

    def __init__(self, message: str, path: Path, kind: str) -> None:
        super().__init__(message, path)
        self.kind = kind


def check_finite(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse float arrays containing NaN or infinity (checked in slabs to keep memory low)."""
    if array.dtype.kind not in "fc":
        return
    flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, (1 << 24) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        block = flat[start:start + step]
        if not np.isfinite(block).all():
            kind = "NaN" if np.isnan(block).any() else "infinite"
            raise NonFiniteValues(f"{what} contains {kind} values; cannot segment it", path, kind)


def read_challenge_npz(path: str | os.PathLike[str]) -> Volume:
    """A challenge case (``imgs``, ``spacing``, ``text_prompts``...) as a :class:`Volume`.

    ``array`` is ``imgs`` unchanged (dtype included); ``spacing`` is the stored (x, y, z); ``origin`` and
    ``direction`` come from ``origin``/``direction`` members when present (MedSAM2 layout), else defaults.
    ``meta`` holds ``npz_keys`` and, when present, ``text_prompts`` (dict) and ``boxes`` (list).
    """
    path = Path(path)
    with _open_zip(path) as zf:
        keys = _names(zf)
        member = _member_name(zf, "imgs")
        if member is None:
            hint = " (this looks like a ground-truth file)" if "gts" in keys else ""
            raise InputError(f"no 'imgs' array in the npz{hint}; it has: {', '.join(keys) or 'nothing'}", path)
        imgs = _read_numeric_member(zf, member, path, "imgs")
        if imgs.ndim != 3:
            raise InputError(f"'imgs' has shape {imgs.shape}, expected a 3-D (D, H, W) array", path)
        if min(imgs.shape) == 0:
            raise InputError(f"'imgs' has shape {imgs.shape}, which is empty", path)
        if imgs.dtype.kind not in "biuf":
            raise InputError(f"'imgs' has dtype {imgs.dtype}, expected numbers", path)
        check_finite(imgs, path, "'imgs'")
        spacing = _vector(zf, path, "spacing", 3, (1.0, 1.0, 1.0))
        origin = _vector(zf, path, "origin", 3, (0.0, 0.0, 0.0))
        direction = _vector(zf, path, "direction", 9, IDENTITY_DIRECTION)
        meta: dict[str, Any] = {"npz_keys": keys}
        prompts_member = _member_name(zf, "text_prompts")
        if prompts_member is not None:
            prompts = _read_object_member(zf, prompts_member, path, "text_prompts")
            meta["text_prompts"] = _text_prompts_dict(prompts, path)
        boxes_member = _member_name(zf, "boxes")
        if boxes_member is not None:
            meta["boxes"] = _read_object_member(zf, boxes_member, path, "boxes")
    return Volume(imgs, spacing, origin, direction, path, "npz", None, meta)


def _vector(zf: zipfile.ZipFile, path: Path, key: str, size: int, default: tuple[float, ...]) -> Any:
    member = _member_name(zf, key)
    if member is None:
        return tuple(default)
    value = _read_numeric_member(zf, member, path, key)
    if value.size != size or value.dtype.kind not in "biuf" or not np.all(np.isfinite(value)):
        raise InputError(f"'{key}' should hold {size} finite numbers, got {value.tolist()!r}", path)
    values = tuple(float(v) for v in value.reshape(-1))
    if key == "spacing" and any(v <= 0 for v in values):
        raise InputError(f"'spacing' must be positive, got {list(values)}", path)
    return values


def write_challenge_npz(path: str | os.PathLike[str], segs: np.ndarray | None = None,
                        **arrays: np.ndarray) -> Path:
    """Write a compressed npz (``segs`` plus any other numeric arrays) atomically; return the path."""
    path = Path(path)
    members = {} if segs is None else {"segs": np.asarray(segs)}
    members.update({k: np.asarray(v) for k, v in arrays.items()})
    for key, value in members.items():
        if value.dtype.hasobject:
            raise OutputError(f"refusing to write object array '{key}' (it would need pickle)", path)
    with atomic_path(path) as tmp:
        try:
            # np.savez_compressed's layout (one deflated ``<key>.npy`` per array) at zlib level 1: label maps
            # are mostly runs, so this writes 3x faster for 1.5x the bytes (CT example: 0.07 s vs 0.22 s).
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for key, value in members.items():
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
        except OSError as exc:
            raise OutputError(f"cannot write ({describe_os_error(exc)})", path) from None
    return path
