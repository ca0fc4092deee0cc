"""The file formats text3dsam reads and writes: one class per format, one registry (:data:`FORMATS`).

Every other list of file endings, every ``--format`` choice, help text and error message about formats is
derived from here (``read_volume``, ``write_volume``, input expansion, ``segment``'s output planning, ``eval``,
the CLI help). Adding a label-map format is one :class:`Format` subclass and one entry in :data:`FORMATS`
(see docs/architecture.md).

Importing this module is cheap on purpose (``text3dsam --help`` reads it): the libraries that do the work
(SimpleITK, nibabel, pydicom, highdicom, scikit-image, numpy) are imported inside the methods.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from text3dsam_cli.io.volume import Volume


class Format:
    """One file format: its endings, how to read it, how to write label maps and probabilities to it.

    Capability flags: ``suffixes`` empty = never read; ``output_suffixes`` empty = never written as a label map;
    ``reads_folders`` = an input may be a folder (a DICOM series); ``keeps_shear`` = a sheared (non-orthogonal)
    direction matrix survives writing; ``stores_geometry`` = origin, spacing and direction are written (not in
    challenge npz); ``probabilities`` = how ``--probabilities`` are written ("per_label":
    one ``<stem>_prob<v><suffix>`` map per prompt, "bundle": one ``<stem>_probabilities<suffix>`` file holding
    all, None: not at all); ``companion`` = written only beside a label map, for inputs of ``source_format``
    (DICOM-SEG, RTSTRUCT: switched on by the :class:`~text3dsam_cli.pipeline.SegmentOptions` field named
    ``name``, on the command line ``--<name with dashes>``).
    """

    name: ClassVar[str] = ""  # Volume.source_format, InputItem.kind, the sidecar's "input_format"
    title: ClassVar[str] = ""  # how messages and help name it
    noun: ClassVar[str] = ""  # how help texts name one input of it ("NIfTI file")
    suffixes: ClassVar[tuple[str, ...]] = ()  # endings read, lower case
    output_suffixes: ClassVar[tuple[str, ...]] = ()  # endings written; each is a --format choice (without the dot)
    default_output: ClassVar[str] = ".nii.gz"  # label-map ending for inputs of this format without --format
    reads_folders: ClassVar[bool] = False
    keeps_shear: ClassVar[bool] = True
    stores_geometry: ClassVar[bool] = True  # origin, spacing and direction are written
    probabilities: ClassVar[str | None] = "per_label"
    probability_dtype: ClassVar[str] = "float32"
    companion: ClassVar[bool] = False
    source_format: ClassVar[str | None] = None  # companions: the input format they need

    def sniff(self, path: Path) -> bool:
        """Whether a file whose ending is not one of :attr:`suffixes` is nevertheless of this format."""
        return False

    def read(self, path: Path, series_uid: str | None = None) -> Volume:
        """The image at ``path`` as a :class:`~text3dsam_cli.io.volume.Volume` (``InputError`` when unusable)."""
        raise NotImplementedError(f"{self.title} is not read")

    def write_hint(self) -> str:
        """Why a file of this format cannot be named as a label-map output, and what to write instead (for an
        ending that is read but not written; override when the reason is not a header/data pair)."""
        if self.output_suffixes:
            return f"header/data pairs are not written: use {' or '.join(self.output_suffixes)}"
        return f"{self.title} label maps are not written"

    def write_volume(self, volume: Volume, path: Path, compress: bool = True) -> Path:
        """Write ``volume`` (a label map, a mask or one probability map, with its geometry) to ``path``
        atomically; return the path. Reached through :func:`text3dsam_cli.io.writers.write_volume`."""
        raise NotImplementedError(f"{self.title} is not written")

    def probability_files(self, stem: str, suffix: str, values: Sequence[int]) -> dict[str, Path]:
        """The probability outputs of a label map ``<stem><suffix>``, by output-plan key."""
        if self.probabilities == "bundle":
            return {"probabilities": Path(f"{stem}_probabilities{self.output_suffixes[0]}")}
        if self.probabilities == "per_label":
            return {f"prob:{value}": Path(f"{stem}_prob{value}{suffix}") for value in values}
        return {}

    def write_probabilities(self, volume: Volume, probabilities: np.ndarray, values: Sequence[int],
                            prompts: Sequence[str], files: dict[str, Path]) -> list[tuple[str, Path]]:
        """Write (K, z, y, x) ``probabilities`` to the planned ``files``; return (sidecar key, path) pairs."""
        written: list[tuple[str, Path]] = []
        for j, (value, prompt) in enumerate(zip(values, prompts)):
            path = files.get(f"prob:{value}")
            if path is not None:
                self.write_volume(volume.with_array(probabilities[j]), path)
                written.append((f"probabilities:{prompt}", path))
        return written

    def __repr__(self) -> str:
        return f"<format {self.name}>"


class _ITKFormat(Format):
    """A single-file image format read and written through SimpleITK (the geometry kept exactly)."""

    def read(self, path: Path, series_uid: str | None = None) -> Volume:
        from text3dsam_cli.io.images import read_image_file

        return read_image_file(path, self.name, self.title)

    def write_volume(self, volume: Volume, path: Path, compress: bool = True) -> Path:
        from text3dsam_cli.io.images import write_itk_image

        return write_itk_image(volume, path, compress, keeps_shear=self.keeps_shear)


class NIfTI(_ITKFormat):
    """NIfTI-1/2 (``.nii.gz``, ``.nii``). Cannot store a sheared direction matrix."""

    name, title, noun = "nifti", "NIfTI", "NIfTI file"
    suffixes = (".nii.gz", ".nii")
    output_suffixes = (".nii.gz", ".nii")
    keeps_shear = False


class NRRD(_ITKFormat):
    """NRRD, attached (``.nrrd``) or detached header (``.nhdr``, read only)."""

    name, title, noun = "nrrd", "NRRD", "NRRD file"
    suffixes = (".nrrd", ".nhdr")
    output_suffixes = (".nrrd",)


class MetaImage(_ITKFormat):
    """MetaImage, single file (``.mha``) or header/data pair (``.mhd``, read only)."""

    name, title, noun = "metaimage", "MetaImage", "MetaImage (.mha) file"
    suffixes = (".mha", ".mhd")
    output_suffixes = (".mha",)


class ChallengeNpz(Format):
    """The challenge's ``.npz`` (``imgs``, ``spacing``, ``text_prompts``; results under ``segs``, no geometry).

    Label maps of npz inputs are npz; probabilities go into one ``<stem>_probabilities.npz`` (float16
    ``probabilities`` and int32 ``label_values``)."""

    name, title, noun = "npz", "npz", "challenge .npz"
    suffixes = (".npz",)
    output_suffixes = (".npz",)
    default_output = ".npz"
    stores_geometry = False
    probabilities = "bundle"
    probability_dtype = "float16"

    def read(self, path: Path, series_uid: str | None = None) -> Volume:
        from text3dsam_cli.io.npz import read_challenge_npz

        return read_challenge_npz(path)

    def write_volume(self, volume: Volume, path: Path, compress: bool = True) -> Path:
        import numpy as np

        from text3dsam_cli.io.npz import write_challenge_npz

        return write_challenge_npz(path, segs=np.asarray(volume.array))

    def write_probabilities(self, volume: Volume, probabilities: np.ndarray, values: Sequence[int],
                            prompts: Sequence[str], files: dict[str, Path]) -> list[tuple[str, Path]]:
        import numpy as np

        from text3dsam_cli.io.npz import write_challenge_npz

        path = files.get("probabilities")
        if path is None:
            return []
        write_challenge_npz(path, probabilities=probabilities, label_values=np.asarray(values, dtype=np.int32))
        return [("probabilities", path)]


class DICOM(Format):
    """A DICOM image series: a folder, or one of its files (``.dcm`` or the ``DICM`` marker). Input only."""

    name, title, noun = "dicom", "DICOM", "DICOM series folder"
    suffixes = (".dcm",)
    reads_folders = True
    probabilities = None

    def sniff(self, path: Path) -> bool:
        from text3dsam_cli.io.dicom import is_dicom_file

        return is_dicom_file(path)

    def read(self, path: Path, series_uid: str | None = None) -> Volume:
        from text3dsam_cli.io.dicom import read_dicom

        return read_dicom(path, series_uid)

    def write_hint(self) -> str:
        names = " or ".join(f"--{f.name.replace('_', '-')}" for f in FORMATS if f.source_format == self.name)
        return f"DICOM outputs are written beside the label map, with {names}"


class _DicomCompanion(Format):
    """An output written beside the label map of a DICOM input, referencing its source series."""

    companion = True
    source_format = "dicom"
    probabilities = None
    extra: ClassVar[str] = ""  # the pip extra that installs what it needs
    description: ClassVar[str] = ""  # for --help: "Also write <description> (...)"

    def missing(self) -> str | None:
        """Why it cannot be written here (its library is missing), or None."""
        return None

    def help(self) -> str:
        """The ``segment --<name>`` help text."""
        return (f"Also write {self.description} ({self.source_format.upper()} inputs; needs the '{self.extra}' "
                f"extra: pip install 'text3dsam-cli[{self.extra}]').")

    def check_source(self, volume: Volume) -> Any:
        """Refuse, before the model runs, a series this output cannot reference; return what :meth:`write`
        may reuse (None: nothing)."""
        return None

    def write(self, volume: Volume, labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
              path: Path, model_name: str, sources: Any = None) -> Path:
        """Write the label map ``labels`` (on ``volume``'s grid) as this object."""
        raise NotImplementedError


class DicomSeg(_DicomCompanion):
    """DICOM Segmentation (``.seg.dcm``), one segment per prompt, written with highdicom."""

    name, title, noun = "dicom_seg", "DICOM-SEG", "DICOM-SEG"
    output_suffixes = (".seg.dcm",)
    extra, description = "dicomseg", "a DICOM-SEG"

    def missing(self) -> str | None:
        if importlib.util.find_spec("highdicom") is not None:
            return None
        from text3dsam_cli.io.dicomseg import MISSING_HIGHDICOM

        return MISSING_HIGHDICOM

    def write(self, volume: Volume, labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
              path: Path, model_name: str, sources: Any = None) -> Path:
        from text3dsam_cli.io.dicomseg import write_dicom_seg

        return write_dicom_seg(volume, labels, values, prompts, path, model_name=model_name)


class RTStruct(_DicomCompanion):
    """DICOM RT Structure Set (``.rtstruct.dcm``), one ROI of planar contours per prompt."""

    name, title, noun = "rtstruct", "RTSTRUCT", "RT Structure Set"
    output_suffixes = (".rtstruct.dcm",)
    extra, description = "rtstruct", "a DICOM RT Structure Set, one ROI per prompt"

    def missing(self) -> str | None:
        from text3dsam_cli.io.rtstruct import MISSING_SKIMAGE, skimage_available

        return None if skimage_available() else MISSING_SKIMAGE

    def check_source(self, volume: Volume) -> Any:
        from text3dsam_cli.io.dicomseg import read_source_series

        return read_source_series(volume, "RTSTRUCT")

    def write(self, volume: Volume, labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
              path: Path, model_name: str, sources: Any = None) -> Path:
        from text3dsam_cli.io.rtstruct import write_rtstruct

        return write_rtstruct(volume, labels, values, prompts, path, model_name=model_name, sources=sources)


#: The registry: every format text3dsam knows, in the order help texts list them.
FORMATS: tuple[Format, ...] = (NIfTI(), NRRD(), MetaImage(), ChallengeNpz(), DICOM(), DicomSeg(), RTStruct())

#: Formats that inputs may be in.
INPUT_FORMATS = tuple(f for f in FORMATS if f.suffixes or f.reads_folders)
#: Formats a label map may be written in (``--format``, ``-o FILE``).
LABEL_MAP_FORMATS = tuple(f for f in FORMATS if f.output_suffixes and not f.companion)
#: Outputs written beside the label map (``--dicom-seg``, ``--rtstruct``).
COMPANION_FORMATS = tuple(f for f in FORMATS if f.companion)


def _longest_first(pairs: list[tuple[str, Format]]) -> tuple[tuple[str, Format], ...]:
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


_READ_SUFFIXES = _longest_first([(s, f) for f in INPUT_FORMATS for s in f.suffixes])
_WRITE_SUFFIXES = _longest_first([(s, f) for f in LABEL_MAP_FORMATS for s in f.output_suffixes])

#: Every ending an input file may have, in registry order (``.nii.gz``, ``.nii``, ``.nrrd``, ...).
INPUT_SUFFIXES: tuple[str, ...] = tuple(s for f in INPUT_FORMATS for s in f.suffixes)
#: Every ending a label map may be written with, in registry order.
OUTPUT_SUFFIXES: tuple[str, ...] = tuple(s for f in LABEL_MAP_FORMATS for s in f.output_suffixes)
#: ``--format`` choice -> ending (``"nii.gz"`` -> ``".nii.gz"``).
FORMAT_CHOICES: dict[str, str] = {s[1:]: s for s in OUTPUT_SUFFIXES}
#: Endings of every file the tool writes (for temporary names); longest first.
WRITTEN_SUFFIXES: tuple[str, ...] = tuple(sorted({s for f in FORMATS for s in f.output_suffixes},
                                                 key=lambda s: (-len(s), s)))


def by_name(name: str) -> Format | None:
    """The format called ``name`` ("nifti", "npz", "dicom", ...), or None."""
    return next((f for f in FORMATS if f.name == name), None)


def input_format(path: str | os.PathLike[str]) -> Format | None:
    """The input format a file name's ending stands for (case-insensitive), or None."""
    name = Path(path).name.lower()
    return next((f for suffix, f in _READ_SUFFIXES if name.endswith(suffix)), None)


def detect_format(path: str | os.PathLike[str]) -> Format | None:
    """The input format of a file: by its ending, else by its content (a DICOM file without ``.dcm``)."""
    fmt = input_format(path)
    if fmt is None:
        fmt = next((f for f in INPUT_FORMATS if f.sniff(Path(path))), None)
    return fmt


def output_format(path: str | os.PathLike[str]) -> Format | None:
    """The label-map format a file name's ending asks for, or None when no format writes that ending."""
    name = Path(path).name.lower()
    return next((f for suffix, f in _WRITE_SUFFIXES if name.endswith(suffix)), None)


def strip_suffix(name: str, suffixes: Sequence[str] = INPUT_SUFFIXES) -> str:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive); otherwise unchanged."""
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def unwritable_hint(path: str | os.PathLike[str]) -> str:
    """`` (<why>)`` for a name that is an input format's but no label-map ending; empty otherwise."""
    fmt = input_format(path)
    return f" ({fmt.write_hint()})" if fmt is not None and output_format(path) is None else ""


# --- texts derived from the registry (help, messages) --------------------------------------------------------


def file_input_suffixes() -> tuple[str, ...]:
    """Endings of inputs that are single files (a DICOM file stands for its folder and is not listed)."""
    return tuple(s for f in INPUT_FORMATS if not f.reads_folders for s in f.suffixes)


def describe_inputs() -> str:
    """``.nii.gz, ..., .npz, a DICOM file or a DICOM series folder``: what an input may be, for messages."""
    folders = [f for f in INPUT_FORMATS if f.reads_folders]
    kinds = [*file_input_suffixes(), *(f"a {f.title} file" for f in folders)]
    return f"{', '.join(kinds)} or {' or '.join(f'a {f.noun}' for f in folders)}" if folders else ", ".join(kinds)


def input_help() -> str:
    """``NIfTI file, NRRD file, ..., DICOM series folder``: the kinds of input, for ``--help``."""
    return ", ".join(f.noun for f in INPUT_FORMATS)


def label_image_suffixes() -> tuple[str, ...]:
    """Endings of label maps that carry their geometry (every label-map format but challenge npz): what
    ``eval`` scores besides npz, spacing taken from the header."""
    return tuple(s for f in LABEL_MAP_FORMATS if f.stores_geometry for s in f.output_suffixes)


def output_help(separator: str = "/") -> str:
    """``.nii.gz/.nii/.nrrd/.mha/.npz``: the label-map endings, for ``--help``."""
    return separator.join(OUTPUT_SUFFIXES)


def format_help() -> str:
    """The ``--format`` help: choices and the default per input format."""
    base = Format.default_output[1:]
    special = [f"{f.default_output[1:]} for {f.title} inputs" for f in INPUT_FORMATS
               if f.default_output != Format.default_output]
    default = f"{', '.join(special)}, else {base}" if special else base
    return f"Output format in folder mode: {', '.join(FORMAT_CHOICES)} (default: {default})."


def probabilities_help() -> str:
    """The ``--probabilities`` help: which dtype each label-map format stores."""
    by_dtype: dict[str, list[str]] = {}
    for f in LABEL_MAP_FORMATS:
        if f.probabilities is not None:
            by_dtype.setdefault(f.probability_dtype, []).append(f.title)
    where = ", ".join(f"{dtype} in {'/'.join(titles)}" for dtype, titles in sorted(by_dtype.items()))
    return f"Also write per-prompt probabilities ({where})."
