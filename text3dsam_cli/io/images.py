"""Single-file images (NIfTI, NRRD, MetaImage) through SimpleITK: reading with the checks ITK lacks, and
writing with the written file verified before it gets its name.

What the format registry (:mod:`text3dsam_cli.io.formats`) calls for its SimpleITK formats. Reading keeps the
array exactly as ``sitk.GetArrayFromImage`` gives it ((z, y, x), native dtype) with the geometry in ITK's LPS
terms; truncated files, zero spacings and NaN voxels (which ITK silently zero-fills, replaces by 1 mm or maps
to 0) are refused with an :class:`InputError` naming the file.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import os
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io import nifti_header
from text3dsam_cli.io.atomic import atomic_path, disk_full, encodable
from text3dsam_cli.io.itk import (
    captured_stderr,
    check_layout,
    first_error_line,
    itk_path,
    numpy_dtype,
    simpleitk,
    volume_from_array,
    volume_from_image,
)
from text3dsam_cli.io.limits import check_voxel_count
from text3dsam_cli.io.npz import check_finite
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.parallel import thread_budget

if TYPE_CHECKING:
    import SimpleITK as sitk

#: The refusal of a sheared direction matrix for NIfTI.
SHEARED_NIFTI = ("the image's direction matrix is not orthogonal (sheared geometry), which NIfTI cannot store "
                 "(it would be coerced to a rotation); write .nrrd or .mha (--format nrrd), which keep it exactly")


def read_image_file(path: Path, fmt: str, name: str) -> Volume:
    """A single-file image of format ``fmt`` ("nifti", "nrrd", "metaimage"; ``name`` for messages) through
    SimpleITK, with the completeness checks ITK lacks. A NIfTI-1 file's qform/sform are checked and kept
    (:mod:`text3dsam_cli.io.nifti_header`)."""
    if fmt != "nifti":
        return _read_image_file(path, fmt, name)
    geometry = nifti_header.read_geometry(path)
    if geometry is not None:
        nifti_header.check_geometry(path, geometry)
    volume = _read_image_file(path, fmt, name)
    if geometry is not None:
        volume.meta["nifti_header"] = nifti_header.report_geometry(path, geometry, volume.spacing, volume.origin,
                                                                   volume.direction)
    return volume


def _read_image_file(path: Path, fmt: str, name: str) -> Volume:
    sitk = simpleitk()
    if fmt == "nifti" and path.name.lower().endswith(".gz"):
        volume = _read_nifti_gz_once(path)
        if volume is not None:
            return volume
    if fmt == "nifti":
        _check_nifti_header(path)
        _check_nifti_complete(path)
    elif fmt == "metaimage":
        _check_metaimage_complete(path)
    with _itk_readable_name(path, fmt) as itk_name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(itk_name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            if "Unable to determine ImageIO reader" in str(exc):
                raise InputError(f"not a {name} image (SimpleITK does not recognise its content)",
                                 path) from None
            raise InputError(f"cannot read the {name} header ({first_error_line(exc)})", path) from None
        check_layout(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), path)
        count = check_voxel_count(reader.GetSize(), path)
        if fmt == "nrrd":
            item = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
            _check_nrrd_complete(path, count * item * reader.GetNumberOfComponents())
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"cannot read the {name} image (truncated or corrupt: {first_error_line(exc)})",
                             path) from None
    if fmt == "nifti" and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        _check_nifti_finite(path)
    return volume_from_image(image, path, fmt, None, {})


def _isal(module: str) -> Any:
    """An ISA-L module (``isal_zlib``: zlib's interface, ``igzip``: gzip's), or None when ``isal`` (a required
    dependency, optional at run time) is not installed; the callers then use Python's zlib/gzip or ITK."""
    try:
        return importlib.import_module(f"isal.{module}")
    except ImportError:
        return None


#: NIfTI-1 datatype codes read straight into an array (without ITK), with the numpy type ITK gives them:
#: every plain scalar type; RGB, complex and 128-bit types go through ITK.
NIFTI_PLAIN_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                     1280: "u8"}


def _nifti1_plain_layout(path: Path) -> tuple[tuple[int, int, int], np.dtype, int] | None:
    """(x, y, z) size, voxel dtype and data offset of a single-file NIfTI-1 whose voxels are 3-D plain scalars
    (:data:`NIFTI_PLAIN_TYPES`) without intensity scaling; None for anything else (the general path reads those:
    ITK turns scaled voxels into float). The 348-byte header is read with ``struct``: nibabel's import alone took
    0.2-0.35 s, and it ran while torch was being imported."""
    try:
        with gzip.open(path, "rb") as fp:
            raw = fp.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348 or raw[344:348] != b"n+1\0":
        return None
    for order in "<>":
        if struct.unpack_from(order + "i", raw, 0)[0] == 348:
            break
    else:
        return None
    dim = struct.unpack_from(order + "8h", raw, 40)
    datatype = struct.unpack_from(order + "h", raw, 70)[0]
    vox_offset, slope, inter = struct.unpack_from(order + "3f", raw, 108)
    trivial_scaling = (np.isnan(slope) or slope in (0.0, 1.0)) and (np.isnan(inter) or inter == 0.0)
    if (dim[0] != 3 or min(dim[1:4]) < 1 or datatype not in NIFTI_PLAIN_TYPES or not trivial_scaling
            or vox_offset < 348):
        return None
    return (dim[1], dim[2], dim[3]), np.dtype(order + NIFTI_PLAIN_TYPES[datatype]), int(vox_offset)


#: Most bytes one decompression call of :func:`_inflate_in_pieces` returns, and compressed bytes it reads at
#: a time (larger input chunks are copied again and again as ``unconsumed_tail``).
INFLATE_PIECE = 1 << 22
#: Compressed bytes ISA-L's C reader takes per call (:func:`_inflate_into`): the GIL is taken back once per chunk.
INFLATE_CHUNK = 1 << 24


def _inflate_into(path: Path, view: memoryview) -> int:
    """Decompress the gzip file ``path`` (one or more members) into ``view`` until it is full or the file
    ends; returns the bytes written. Errors of a corrupt or truncated file propagate.

    ISA-L's C gzip reader inflates straight into ``view`` with the GIL released, taking the GIL back once per
    16 MB of compressed input. A loop of many small decompression calls took the GIL back hundreds of times,
    each time waiting for ``segment``'s main thread, which imports torch meanwhile: a whole ``segment`` process
    on the 756x512x512 float CT took 5.12 s that way against 4.06 s now (2 cores, 6 interleaved pairs)."""
    isal_zlib = _isal("isal_zlib")
    reader_type = getattr(isal_zlib, "_GzipReader", None)  # python-isal's C reader behind igzip.open (>= 1.6)
    if reader_type is None:  # no ISA-L (or an ISA-L without its C reader)
        return _inflate_in_pieces(path, view, isal_zlib or zlib)
    filled = 0
    with open(path, "rb") as fp:
        try:
            reader = reader_type(fp, INFLATE_CHUNK)
        except TypeError:  # another constructor in a later ISA-L: the general loop, never a refused file
            return _inflate_in_pieces(path, view, isal_zlib)
        while filled < len(view):
            count = reader.readinto(view[filled:])
            if not count:
                break
            filled += count
        if filled == len(view):
            reader.readinto(bytearray(1))  # reach the end of the member: its CRC and length are checked
    return filled


def _inflate_in_pieces(path: Path, view: memoryview, gz: Any) -> int:
    """:func:`_inflate_into` with a zlib-like module's ``decompressobj``."""
    expected = len(view)
    filled = 0
    with open(path, "rb") as fp:
        inflater = gz.decompressobj(31)
        while filled < expected:
            chunk = fp.read(INFLATE_PIECE)
            if not chunk:
                break
            while chunk and filled < expected:
                # output in pieces: each is copied while in the cache and its memory reused (one output of
                # all the rest page-faulted a fresh allocation per input chunk: 1.6 s -> 1.05 s for 756 MB)
                out = inflater.decompress(chunk, min(expected - filled, INFLATE_PIECE))
                view[filled : filled + len(out)] = out
                filled += len(out)
                chunk = inflater.unconsumed_tail
                if inflater.eof:  # a multi-member gzip file: start the next member
                    chunk = inflater.unused_data + chunk
                    inflater = gz.decompressobj(31)
    return filled


def _read_nifti_gz_once(path: Path) -> Volume | None:
    """A plain-scalar ``.nii.gz`` without intensity scaling (int16 CTs, float MRs, uint8 masks...), decompressed
    once by ISA-L; None when another path must read it.

    ITK maps NaN to 0, so float NIfTI files used to be decompressed twice (by ITK, then by nibabel to look for
    NaN), and ITK inflates with zlib into an image that is then copied (int16 756x512x512 CT, a whole process
    reading it on 2 cores: 1.62 s and 909 MiB through ITK, 0.75 s and 516 MiB here). Here the file is
    decompressed once into the array (ISA-L when installed), its size is checked against the header
    (truncation) and NaN/inf are looked for on that array; ITK reads only the header, for the geometry in its
    own (LPS) terms. NIfTI stores voxels with x fastest, which is ITK's and numpy's (z, y, x) C order, so the
    bytes are the array as ``sitk.GetArrayFromImage`` would give it, in the same dtype.
    """
    sitk = simpleitk()
    layout = _nifti1_plain_layout(path)
    if layout is None:
        return None
    shape, dtype, offset = layout
    with _itk_readable_name(path, "nifti") as itk_name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(itk_name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None  # let the general path report it
        if tuple(reader.GetSize()) != shape or reader.GetNumberOfComponents() != 1:
            return None
        if numpy_dtype(reader.GetPixelID()) != dtype.newbyteorder("="):  # keep to the type ITK would give
            return None
        spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    count = check_voxel_count(shape, path)  # before the buffer is allocated (a small file can claim a huge image)
    expected = offset + count * dtype.itemsize
    buffer = np.empty(expected, dtype=np.uint8)  # not zero-filled (a bytearray would be: 0.2 s per 800 MB)
    try:
        filled = _inflate_into(path, memoryview(buffer))
    except (OSError, zlib.error) as exc:
        raise InputError(f"truncated or corrupt NIfTI file ({exc})", path) from None
    except Exception as exc:  # isal's error type
        raise InputError(f"truncated or corrupt NIfTI file ({exc})", path) from None
    if filled < expected:
        raise InputError(f"truncated NIfTI file ({filled} bytes of data after decompression, "
                         f"its header needs {expected})", path)
    array = buffer[offset:].view(dtype).reshape(shape[::-1])
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return volume_from_array(array, spacing, origin, direction, path, "nifti", None, {})


def _check_nifti_finite(path: Path) -> None:
    """Refuse NaN/inf in a float NIfTI: ITK's reader silently turns NaN into 0, so look at the file itself."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        depth = image.shape[2]
    except Exception:  # nibabel cannot parse it (SimpleITK could): nothing more to check
        return
    dataobj = image.dataobj
    step = max(1, (1 << 22) // max(1, image.shape[0] * image.shape[1]))
    for start in range(0, depth, step):
        check_finite(np.asarray(dataobj[:, :, start:start + step]), path, "the image")


_NIFTI_FAMILY = (".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")


@contextlib.contextmanager
def _itk_readable_name(path: Path, fmt: str) -> Iterator[str]:
    """A file name under which ITK reads exactly ``path``.

    ITK's NIfTI reader (niftilib) looks files up by base name and prefers ``x.nii`` when asked for
    ``x.nii.gz``; when such a sibling exists, the file is read through a symlink (or copy) in a private
    temporary folder instead.
    """
    if not encodable(str(path)):  # ITK cannot take a name that is not valid UTF-8: read through a safe alias
        with itk_path(path) as alias:
            yield alias
        return
    if fmt != "nifti":
        yield str(path)
        return
    lower = path.name.lower()
    base = path.name[: -len(".nii.gz")] if lower.endswith(".nii.gz") else path.name[: -len(".nii")]
    siblings = [path.with_name(base + ext) for ext in _NIFTI_FAMILY]
    if not any(s.name != path.name and s.exists() for s in siblings):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="text3dsam-read-") as tmp:
        alias = Path(tmp) / ("image.nii.gz" if lower.endswith(".gz") else "image.nii")
        try:
            os.symlink(path.resolve(), alias)
        except OSError:
            shutil.copyfile(path, alias)
        yield str(alias)


# --- completeness checks (ITK silently zero-fills truncated NIfTI files) ------------------------------------


def _nifti_expected_bytes(path: Path) -> int | None:
    """Header offset plus data size that a NIfTI file must hold, from its header (None if unknown)."""
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # the loaded image's header copy has vox_offset reset to 0
        shape = proxy.shape
        itemsize = proxy.dtype.itemsize
        offset = int(proxy.offset)
    except Exception:  # nibabel refuses it: let SimpleITK report what is wrong
        return None
    return offset + int(np.prod(shape, dtype=np.int64)) * itemsize


def _check_nifti_complete(path: Path) -> None:
    expected = _nifti_expected_bytes(path)
    if expected is None:
        return
    if not path.name.lower().endswith(".gz"):
        if path.stat().st_size < expected:
            raise InputError(f"truncated NIfTI file ({path.stat().st_size} bytes, its header needs {expected})",
                             path)
        return
    with open(path, "rb") as fp:
        fp.seek(-4, os.SEEK_END)
        if int.from_bytes(fp.read(4), "little") == expected % (1 << 32):
            return  # the gzip trailer records the expected size: complete
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"truncated or corrupt NIfTI file ({exc})", path) from None
    if total < expected:
        raise InputError(f"truncated NIfTI file ({total} bytes of data after decompression, "
                         f"its header needs {expected})", path)


def _nifti_raw_header(path: Path) -> tuple[list[int], list[float]] | None:
    """``dim`` and ``pixdim`` exactly as stored (nibabel silently replaces zero pixdims by 1 on loading)."""
    import struct

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fp:
            raw = fp.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in ("<", ">"):
        if len(raw) >= 348 and struct.unpack(f"{order}i", raw[:4])[0] == 348:
            return list(struct.unpack(f"{order}8h", raw[40:56])), list(struct.unpack(f"{order}8f", raw[76:108]))
        if len(raw) >= 540 and struct.unpack(f"{order}i", raw[:4])[0] == 540:
            return list(struct.unpack(f"{order}8q", raw[16:80])), list(struct.unpack(f"{order}8d", raw[104:168]))
    return None


def _check_nifti_header(path: Path) -> None:
    """Refuse a NIfTI whose header gives a zero (or non-finite) voxel size: ITK would silently use 1 mm."""
    header = _nifti_raw_header(path)
    if header is None:
        return  # not a header we understand: let SimpleITK report what is wrong
    dim, pixdim = header
    zooms = [float(v) for v in pixdim[1:1 + max(0, min(3, int(dim[0])))]]
    if any(not np.isfinite(v) or v == 0 for v in zooms):
        raise InputError(f"the header gives voxel spacing {zooms} (pixdim[1:4]); a zero or non-finite spacing "
                         "cannot be used (ITK would silently assume 1 mm): fix the header", path)


def _check_nrrd_complete(path: Path, needed: int) -> None:
    """A raw NRRD must hold as many data bytes as its header declares (checked before allocating them)."""
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as fp:
            for _ in range(400):
                line = fp.readline(1 << 16)
                if not line or line in (b"\n", b"\r\n"):
                    break
                key, sep, value = line.decode("latin-1").partition(":")
                if sep and not key.startswith("#"):
                    fields[key.strip().lower()] = value.lstrip("=").strip()
            header_end = fp.tell()
    except OSError:
        return
    if fields.get("encoding", "").lower() != "raw":
        return  # compressed: the voxel limit bounds what decompression can allocate
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file is not None and " " in data_file:
        return
    _check_data_size(path, None if data_file is None else data_file, header_end, needed, "NRRD")


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage_complete(path: Path) -> None:
    """Check a MetaImage file holds as many data bytes as its header announces (ITK prints, not raises)."""
    fields: dict[str, str] = {}
    header_end = 0
    try:
        with open(path, "rb") as fp:
            for _ in range(200):
                line = fp.readline(4096)
                if not line:
                    break
                key, sep, value = line.decode("latin-1").partition("=")
                if not sep:
                    return  # not a header we understand: let SimpleITK decide
                fields[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    header_end = fp.tell()
                    break
    except OSError:
        return
    data_file = fields.get("ElementDataFile")
    if data_file is None:
        return
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    item = _MET_SIZES.get(fields.get("ElementType", ""))
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if not dims or item is None:
        return
    if compressed:
        size_text = fields.get("CompressedDataSize")
        if size_text is None or not size_text.isdigit():
            return
        needed = int(size_text)
    else:
        needed = int(np.prod(dims, dtype=np.int64)) * channels * item
    _check_data_size(path, None if data_file == "LOCAL" else data_file, header_end, needed, "MetaImage")


def _check_data_size(path: Path, data_file: str | None, header_end: int, needed: int, name: str) -> None:
    """Refuse a header/data image whose data (after the header, or in ``data_file`` beside it) is shorter than
    the ``needed`` bytes its header announces. File lists and patterns are not checked."""
    if data_file is None:
        where, available = path, path.stat().st_size - header_end
    else:
        if "%" in data_file or data_file.startswith("LIST"):
            return
        where = path.parent / data_file
        if not where.is_file():
            raise InputError(f"the {name} data file {data_file!r} is missing", path)
        available = where.stat().st_size
    if available < needed:
        raise InputError(f"truncated {name} data ({available} bytes, the header needs {needed})", where)


# --- writing -----------------------------------------------------------------------------------------------


def _sitk_array(array: np.ndarray, path: Path) -> np.ndarray:
    """The array in a dtype SimpleITK can write (bool -> uint8, float16 -> float32, native byte order)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind not in "biuf":
        raise OutputError(f"cannot write an array of dtype {array.dtype} as an image", path)
    return array


def volume_to_image(volume: Volume, path: Path | None = None) -> sitk.Image:
    """A SimpleITK image of ``volume.array`` carrying exactly the volume's origin, spacing and direction."""
    sitk = simpleitk()
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise OutputError(f"expected a 3-D (z, y, x) array, got shape {array.shape}", path)
    image = sitk.GetImageFromArray(_sitk_array(array, path or Path("?")), isVector=False)
    try:
        image.SetSpacing([float(v) for v in volume.spacing])
        image.SetOrigin([float(v) for v in volume.origin])
        image.SetDirection([float(v) for v in volume.direction])
    except RuntimeError as exc:
        raise OutputError(f"invalid geometry for writing ({first_error_line(exc)})", path) from None
    return image


def is_orthogonal(direction: tuple[float, ...] | list[float], tol: float = 1e-4) -> bool:
    """Whether a row-major 3x3 direction matrix is orthonormal (no shear), within ``tol``."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(matrix.T @ matrix, np.eye(3), atol=tol))


def write_itk_image(volume: Volume, path: Path, compress: bool = True, keeps_shear: bool = True) -> Path:
    """Write ``volume`` through SimpleITK (the writer picked by the name's ending), atomically.

    ``keeps_shear`` False (NIfTI) refuses a sheared direction matrix. The written file is checked before it
    gets its final name (ITK reports some write errors, e.g. a full disk, only on stderr).
    """
    sitk = simpleitk()
    if not keeps_shear and not is_orthogonal(volume.direction):
        raise OutputError(SHEARED_NIFTI, path)
    array = _sitk_array(np.asarray(volume.array), path)  # the voxels as ITK stores them (no ITK copy yet)
    data_bytes = array.size * array.itemsize
    chatter: list[str] = []

    def check(tmp: Path) -> str | None:
        problem = verify_image_file(tmp, data_bytes)
        if problem is None and any("ERROR" in text.upper() for text in chatter):
            problem = "ITK reported a write error"
        return problem

    name = path.name.lower()
    gz = compress and name.endswith(".nii.gz")
    igzip = _isal("igzip") if gz else None
    keep_input_header = "nifti_header" in volume.meta  # the input's qform/sform are written back (below)
    header = None
    if name.endswith(".nii") or (gz and (igzip is not None or keep_input_header)):
        header = _itk_nifti_header(volume, array.dtype, path)
    if header is not None:
        # NIfTI: ITK's own header (with the input's qform, sform and codes when on its grid), then the voxels
        # straight from the array (no full-size ITK copy), compressed by ISA-L (a sixth of ITK's gzip time;
        # docs/performance.md), else by Python's gzip.
        header = nifti_header.patch_header(header, volume.meta, np.shape(volume.array), volume.spacing,
                                           volume.origin, volume.direction)

        # Written by this process, so a write error raises here (no ITK stderr to read): the check is that the
        # file is whole (its size, or the gzip trailer's length), not a second decompression of it.
        def whole(tmp: Path) -> str | None:
            return _written_whole(tmp, len(header) + data_bytes, gz)

        with atomic_path(path, verify=whole) as tmp, (_gzip_writer(tmp) if gz else open(tmp, "wb")) as fp:
            fp.write(header)
            write_voxels(fp, array)
        return path
    del array
    image = volume_to_image(volume, path)
    with atomic_path(path, verify=check) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetUseCompression(compress)
        with itk_path(tmp) as itk_name, captured_stderr() as chatter:
            writer.SetFileName(itk_name)
            try:
                writer.Execute(image)
            except RuntimeError as exc:
                reason = "no space left on device" if disk_full(path.parent) else first_error_line(exc)
                raise OutputError(f"cannot write the image ({reason})", path) from None
    return path


#: ISA-L compression level of written .nii.gz files (0-3; 2 is ISA-L's default: 10.0 MB for a 198 MB label map
#: where ITK's zlib wrote 7.2 MB, in a sixth of the time).
GZIP_LEVEL = 2
#: Bytes per slab copied to the file by :func:`write_voxels` (a non-contiguous view is made contiguous per slab).
SLAB_BYTES = 1 << 24
_NIFTI1_HEADER = 352  # 348-byte header + the 4-byte extension flag; voxels start here (vox_offset)


#: Fewest compression threads for which :func:`_gzip_writer` compresses on threads: one compression thread beside
#: the feeding one was slower than compressing in the calling thread (the 756x512x512 benchmark label map on 2
#: cores: 0.120 s against 0.110 s, best of 5).
GZIP_MIN_THREADS = 2


def _gzip_writer(path: Path) -> Any:
    """A gzip file open for writing at GZIP_LEVEL: ISA-L compressing blocks on ``parallel.thread_budget() - 1``
    threads while the calling thread prepares the next slab (``isal.igzip_threaded``, one gzip stream any
    reader reads) where that is at least GZIP_MIN_THREADS; else ISA-L in the calling thread; Python's gzip
    without ISA-L."""
    workers = thread_budget() - 1
    igzip = _isal("igzip")
    if igzip is None:
        return gzip.open(path, "wb", compresslevel=GZIP_LEVEL)
    if workers < GZIP_MIN_THREADS:
        return igzip.open(path, "wb", compresslevel=GZIP_LEVEL)
    return _isal("igzip_threaded").open(path, "wb", compresslevel=GZIP_LEVEL, threads=workers)


def _written_whole(path: Path, total: int, gz: bool) -> str | None:
    """None when ``path``, just written by this process, holds ``total`` bytes: its size, or for gzip the length
    its trailer records (ISIZE, modulo 2**32) after a complete stream; else what is wrong."""
    size = path.stat().st_size
    if not gz:
        return None if size == total else f"{size} bytes written, expected {total}"
    with open(path, "rb") as fp:
        fp.seek(max(0, size - 4))
        tail = fp.read(4)
    if size < 18 or len(tail) != 4 or struct.unpack("<I", tail)[0] != total % (1 << 32):
        return f"the written file is truncated ({size} bytes of gzip data)"
    return None


def _itk_nifti_header(volume: Volume, dtype: np.dtype, path: Path) -> bytes | None:
    """The bytes ITK writes before the voxels of a NIfTI-1 file of ``volume`` (shape, geometry) and ``dtype``.

    ITK writes a one-voxel image of the same geometry and dtype; its three sizes are then set to the volume's
    (tests compare the result byte for byte with ITK's own file). None, so that ITK writes the whole file, when
    that would not be a little-endian NIfTI-1 file (a size over 32767 needs NIfTI-2) or ITK refuses.
    """
    sitk = simpleitk()
    shape = np.shape(volume.array)
    if len(shape) != 3 or not 0 < min(shape) <= max(shape) <= 32767 or sys.byteorder != "little":
        return None
    image = volume_to_image(Volume(np.zeros((1, 1, 1), dtype=dtype), volume.spacing, volume.origin, volume.direction),
                            path)
    try:
        with tempfile.TemporaryDirectory(prefix="text3dsam-header-") as folder:
            name = os.path.join(folder, "header.nii")
            writer = sitk.ImageFileWriter()
            writer.SetUseCompression(False)
            writer.SetFileName(name)
            with captured_stderr():
                writer.Execute(image)
            with open(name, "rb") as fp:
                header = bytearray(fp.read(_NIFTI1_HEADER + 64))
    except (RuntimeError, OSError):  # e.g. no writable temporary folder: ITK writes the whole file instead
        return None
    size = _NIFTI1_HEADER + np.dtype(dtype).itemsize
    if (len(header) != size or header[:4] != struct.pack("<i", 348) or header[344:348] != b"n+1\0"
            or struct.unpack_from("<f", header, 108)[0] != _NIFTI1_HEADER):
        return None
    struct.pack_into("<3h", header, 42, shape[2], shape[1], shape[0])  # dim[1..3]: x, y, z
    return bytes(header[:_NIFTI1_HEADER])


def write_voxels(fp: Any, array: np.ndarray) -> None:
    """Write ``array`` in C order (NIfTI's x-fastest order for a (z, y, x) array), little-endian, in slabs."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    step = max(1, SLAB_BYTES // max(1, array[:1].nbytes))
    for start in range(0, array.shape[0], step):
        slab = np.ascontiguousarray(array[start:start + step], dtype=dtype)
        fp.write(memoryview(slab).cast("B"))


def _gunzip_size(fp: Any) -> int:
    """Decompressed size of a gzip stream (raises on a truncated or corrupt one: the CRC is checked); ISA-L's
    reader when installed (3.5x Python's on a 198 MB label map)."""
    total = 0
    with (_isal("igzip") or gzip).GzipFile(fileobj=fp, mode="rb") as gz:
        while chunk := gz.read(1 << 22):
            total += len(chunk)
    return total


def _zlib_size(fp: Any) -> int:
    """Decompressed size of a complete zlib stream (raises when it is truncated)."""
    decomp = zlib.decompressobj()
    total = 0
    while chunk := fp.read(1 << 22):
        total += len(decomp.decompress(chunk))
        if decomp.eof:
            break
    total += len(decomp.flush())
    if not decomp.eof:
        raise EOFError("compressed data end early")
    return total


def _text_header(fp: Any, end_marker: bytes | None) -> tuple[dict[str, str], int]:
    """``key: value`` / ``key = value`` lines up to a blank line (NRRD) or the ``ElementDataFile`` line (MHA)."""
    fields: dict[str, str] = {}
    for _ in range(400):
        line = fp.readline(1 << 16)
        if not line or line in (b"\n", b"\r\n"):
            break
        text = line.decode("latin-1").strip()
        sep = "=" if "=" in text and (":" not in text or text.index("=") < text.index(":")) else ":"
        key, _, value = text.partition(sep)
        fields[key.strip().lower()] = value.strip().lstrip("=").strip()
        if end_marker is not None and line.lstrip().lower().startswith(end_marker):
            break
    return fields, fp.tell()


def verify_image_file(path: Path, data_bytes: int) -> str | None:
    """None when ``path`` (a freshly written NIfTI/NRRD/MHA file) holds all ``data_bytes`` of voxel data, else
    what is wrong. Compressed data is decompressed (checking its CRC) without keeping it in memory."""
    name = path.name.lower()
    size = path.stat().st_size
    isal_zlib = _isal("isal_zlib")  # ISA-L's decompression error is not a zlib.error
    broken = (OSError, EOFError, zlib.error, gzip.BadGzipFile, *((isal_zlib.error,) if isal_zlib else ()))
    try:
        with open(path, "rb") as fp:
            if name.endswith(".nii.gz"):
                got = _gunzip_size(fp)
                return None if got >= data_bytes + 348 else f"{got} bytes of NIfTI data, expected {data_bytes}"
            if name.endswith(".nii"):
                return None if size >= data_bytes + 348 else f"{size} bytes written, expected {data_bytes + 348}"
            if name.endswith(".nrrd"):
                fields, start = _text_header(fp, None)
                encoding = fields.get("encoding", "raw")
                if "data file" in fields or "datafile" in fields:
                    return None
                got = _gunzip_size(fp) if encoding in ("gzip", "gz") else size - start
                return None if got >= data_bytes else f"{got} bytes of NRRD data, expected {data_bytes}"
            if name.endswith(".mha"):
                fields, start = _text_header(fp, b"elementdatafile")
                compressed = fields.get("compresseddata", "false").lower() == "true"
                got = _zlib_size(fp) if compressed else size - start
                return None if got >= data_bytes else f"{got} bytes of MetaImage data, expected {data_bytes}"
    except broken as exc:
        return f"the written file is truncated or corrupt ({exc})"
    return None
