"""Intensity preprocessing into the model's 0..255 range (float32).

* Challenge ``.npz`` inputs are already 0..255 (the organisers windowed them): returned unchanged.
* CT: clip to a window (level L, width W: ``[L - W/2, L + W/2]``) and rescale linearly to 0..255.
  Named windows: ``soft_tissue`` L40/W400 (default), ``lung`` L-600/W1500, ``bone`` L500/W1500; or ``"L,W"``.
* Every other modality: clip to the 0.5th and 99.5th percentiles of the voxels > 0 and rescale to 0..255;
  voxels <= 0 end up 0 (all zeros if no voxel is > 0).

The modality is resolved by :func:`resolve_modality`, first rule that answers wins (the sidecar's
``modality.source`` names it): ``override`` (``--modality``); the file's metadata: ``dicom`` (the DICOM
Modality tag), ``bids`` (a BIDS suffix ending the file name: ``_T1w``, ``_T2w``, ``_FLAIR``, ``_dwi``, ... ->
MR, ``_ct`` -> CT, ``_pet`` -> PT); ``prompts`` (every known prompt belongs to one modality of the vocabulary,
:func:`text3dsam_cli.prompts.prompt_modality`); ``heuristic``: CT when the minimum value is below -500 (air in
Hounsfield units), otherwise MR-like percentile normalisation. When metadata or prompts decide, the heuristic
is still asked, and a disagreement (CT or not CT) is recorded as the decision's ``warning``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.parallel import map_shares

#: Named CT windows as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (500.0, 1500.0),
}
DEFAULT_WINDOW = "soft_tissue"

#: Minimum value below which a volume of unknown modality is taken for CT (air is about -1000 HU).
CT_MINIMUM_THRESHOLD = -500.0
PERCENTILES = (0.5, 99.5)

_ALIASES = {"MRI": "MR", "PET": "PT", "CT": "CT", "MR": "MR", "PT": "PT", "US": "US",
            "ULTRASOUND": "US", "MICROSCOPY": "MICROSCOPY"}
#: Accepted ``--modality`` values (after aliases): the model's modalities plus common DICOM image modality codes.
KNOWN_MODALITIES = frozenset({*_ALIASES.values(), "NM", "XA", "RF", "CR", "DX", "MG", "OCT", "OPT", "OT", "SM"})
_NPZ_PREFIXES = {"CT": "CT", "MR": "MR", "PET": "PT", "US": "US", "MICROSCOPY": "MICROSCOPY"}
#: BIDS suffixes (the last ``_`` part of a file name, any case) that name a modality: MR anatomical, diffusion,
#: perfusion and functional suffixes, ``ct`` (the CT extension proposal) and ``pet`` (BIDS-PET).
BIDS_SUFFIXES: dict[str, str] = {
    **dict.fromkeys(("t1w", "t2w", "pdw", "t2starw", "flair", "pdt2", "inplanet1", "inplanet2", "t1map", "t2map",
                     "t2starmap", "unit1", "mp2rage", "dwi", "bold", "sbref", "asl", "m0scan", "cbv"), "MR"),
    "ct": "CT",
    "pet": "PT",
}


@dataclass(frozen=True)
class ModalityDecision:
    """Which modality was used, where it came from and how intensities are normalised (for sidecars).

    ``source`` is "override", "dicom", "bids", "prompts", "npz" or "heuristic"; ``normalization`` is "none"
    (npz), "ct_window" or "percentile"; ``detail`` says why in words; ``warning`` (or None) says that the
    intensity heuristic disagrees with a modality taken from the metadata or the prompts.
    """

    modality: str | None
    source: str
    normalization: str
    detail: str
    warning: str | None = None


def normalize_modality_name(name: str) -> str:
    """Canonical modality code ("ct" -> "CT", "MRI" -> "MR", "PET" -> "PT"); unknown names upper-cased."""
    key = name.strip().upper()
    return _ALIASES.get(key, key)


def _npz_modality(volume: Volume) -> str | None:
    """Modality from a challenge file name prefix (``CT_...``, ``MR_...``, ``US_...``), if recognisable."""
    if volume.path is None:
        return None
    prefix = volume.path.name.split("_", 1)[0].upper()
    return _NPZ_PREFIXES.get(prefix)


def bids_modality(path: Path | None) -> tuple[str | None, str]:
    """The modality a BIDS suffix ending the file name implies (``sub-01_T1w.nii.gz`` -> MR) and the suffix."""
    if path is None:
        return None, ""
    from text3dsam_cli.io.formats import strip_suffix

    name = strip_suffix(path.name)
    if "_" not in name:
        return None, ""
    suffix = name.rsplit("_", 1)[1]
    return BIDS_SUFFIXES.get(suffix.lower()), suffix


def _heuristic(volume: Volume) -> ModalityDecision:
    minimum = float(volume.array.min()) if volume.array.size else 0.0
    if minimum < CT_MINIMUM_THRESHOLD:
        return ModalityDecision("CT", "heuristic", "ct_window",
                                f"minimum value {minimum:g} < {CT_MINIMUM_THRESHOLD:g} looks like Hounsfield units")
    return ModalityDecision("MR", "heuristic", "percentile",
                            f"minimum value {minimum:g} >= {CT_MINIMUM_THRESHOLD:g}: not CT, "
                            "using percentile normalisation")


def _checked(volume: Volume, decision: ModalityDecision, where: str) -> ModalityDecision:
    """``decision`` with a ``warning`` when the intensity heuristic disagrees on whether it is a CT."""
    guess = _heuristic(volume)
    if (decision.modality == "CT") == (guess.modality == "CT"):
        return decision
    if decision.modality == "CT":
        warning = (f"modality CT from {where}, but the intensities do not look like Hounsfield units ("
                   f"{guess.detail.split(':')[0]}, no air); normalised as CT")
        if volume.array.dtype.kind == "u":
            warning += ("; if the values are Hounsfield units plus an offset, shift --window by it "
                        "(e.g. --window 1064,400 for +1024)")
    else:
        warning = (f"modality {decision.modality} from {where}, but the intensities look like a CT "
                   f"({guess.detail}); normalised as {decision.modality}")
    return ModalityDecision(decision.modality, decision.source, decision.normalization, decision.detail, warning)


def resolve_modality(volume: Volume, override: str | None = None, prompts: Sequence[str] = ()) -> ModalityDecision:
    """Decide the modality (and so the normalisation) of ``volume``; see the module docstring for the rule.

    ``prompts``: the prompts to be segmented (they decide when the metadata does not and every known prompt
    belongs to one modality of the vocabulary).
    """
    if volume.source_format == "npz":
        modality = normalize_modality_name(override) if override else (volume.modality or _npz_modality(volume))
        low, high = _value_range(volume.array)
        if low >= 0 and high <= 255:
            return ModalityDecision(modality, "override" if override else "npz", "none",
                                    "challenge npz images are already normalised to 0..255")
        if modality is None:
            modality = "CT" if low < CT_MINIMUM_THRESHOLD else "MR"
        return ModalityDecision(modality, "override" if override else "npz", _normalization(modality),
                                f"npz 'imgs' hold values {low:g}..{high:g}, outside 0..255 (not normalised): "
                                "normalised like other inputs")
    if override:
        modality = normalize_modality_name(override)
        return ModalityDecision(modality, "override", _normalization(modality), "given explicitly")
    if volume.modality:
        modality = normalize_modality_name(volume.modality)
        return _checked(volume, ModalityDecision(modality, "dicom", _normalization(modality),
                                                 "DICOM Modality tag (0008,0060)"), "the DICOM Modality tag")
    modality, suffix = bids_modality(volume.path)
    if modality is not None:
        return _checked(volume, ModalityDecision(modality, "bids", _normalization(modality),
                                                 f"BIDS suffix _{suffix} of the file name"),
                        f"the file name's BIDS suffix _{suffix}")
    if prompts:
        from text3dsam_cli.prompts import prompt_modality

        named, detail = prompt_modality(prompts)
        if named is not None:
            modality = normalize_modality_name(named)
            return _checked(volume, ModalityDecision(modality, "prompts", _normalization(modality), detail),
                            "the prompts")
    return _heuristic(volume)


def _value_range(array: np.ndarray) -> tuple[float, float]:
    """Minimum and maximum (0, 255 for uint8 without looking)."""
    if array.dtype == np.uint8 or array.size == 0:
        return 0.0, 255.0 if array.size else 0.0
    return float(array.min()), float(array.max())


def _normalization(modality: str) -> str:
    return "ct_window" if modality == "CT" else "percentile"


_CUSTOM_WINDOW = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*,\s*([-+]?\d+(?:\.\d*)?)\s*$")


def parse_window(window: str | tuple[float, float]) -> tuple[float, float]:
    """A window name or ``"L,W"`` (level, width in HU) -> ``(level, width)``; bad values raise UsageError."""
    if isinstance(window, tuple):
        level, width = (float(v) for v in window)
    elif window in CT_WINDOWS:
        level, width = CT_WINDOWS[window]
    else:
        match = _CUSTOM_WINDOW.match(window or "")
        if not match:
            names = ", ".join(CT_WINDOWS)
            raise UsageError(f"unknown CT window {window!r}: use one of {names} or 'level,width' (e.g. 40,400)")
        level, width = float(match.group(1)), float(match.group(2))
    if not width > 0:
        raise UsageError(f"CT window width must be positive, got {width:g}")
    return level, width


#: Values per slab of the intensity mapping (1 M float32 = 4 MB: the cast and the clip/shift/scale passes run on a
#: slab while it is in a core's cache); the slabs are shared among ``parallel.thread_budget()`` threads (numpy
#: releases the GIL in these loops).
SLAB_VALUES = 1 << 20


def _float32_target(array: np.ndarray, in_place: bool) -> np.ndarray:
    """``array`` itself when it may be overwritten (``in_place``, writable C-ordered float32), else a new float32
    array of its shape (filled by :func:`_map_in_slabs`)."""
    if in_place and array.dtype == np.float32 and array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.empty(array.shape, dtype=np.float32)


def _map_in_slabs(source: np.ndarray, out: np.ndarray, mapping: Callable[[np.ndarray], None]) -> np.ndarray:
    """``out`` = ``mapping`` applied in place to float32 ``source``, slab by slab along the first axis, on up to
    ``parallel.thread_budget()`` threads. Elementwise, so the result is the same as one whole-array pass per
    operation (those were memory-bound: 0.23-0.29 s for the three passes of a 198 M-voxel CT window)."""
    if out.ndim == 0 or out.size == 0:
        if out is not source:
            out[...] = source
        mapping(out)
        return out
    rows = max(1, SLAB_VALUES // max(1, out[:1].size))
    starts = list(range(0, out.shape[0], rows))

    def run(share: list[int]) -> None:
        for start in share:
            slab = out[start:start + rows]
            if out is not source:
                slab[...] = source[start:start + rows]  # the float32 cast, per slab
            mapping(slab)

    map_shares(run, starts)
    return out


def _clip_rescale(low: float, high: float, scale: float) -> Callable[[np.ndarray], None]:
    """In place: clip to [low, high], subtract low, multiply by scale (float32)."""
    def apply(x: np.ndarray) -> None:
        np.clip(x, low, high, out=x)
        x -= np.float32(low)
        x *= np.float32(scale)
    return apply


def window_ct(array: np.ndarray, level: float, width: float, in_place: bool = False) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and rescale to 0..255 (float32).

    The caller's array is never modified unless ``in_place`` (then a float32 array is reused, saving a copy of
    the whole volume).
    """
    low = level - width / 2.0
    return _map_in_slabs(array, _float32_target(array, in_place), _clip_rescale(low, low + width, 255.0 / width))


def percentile_normalize(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES,
                         in_place: bool = False) -> np.ndarray:
    """Clip to the given percentiles of the voxels > 0, rescale to 0..255; voxels <= 0 become 0 (float32).

    ``in_place``: as :func:`window_ct`.
    """
    positive = array[array > 0]
    if positive.size == 0:
        return np.zeros(array.shape, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(positive, percentiles, overwrite_input=True))
    del positive
    out = _float32_target(array, in_place)
    if high <= low:  # constant foreground: everything > 0 is the brightest value
        if out is not array:
            out[...] = array
        np.greater(out, 0, out=out)
        out *= np.float32(255.0)
        return out
    # low > 0, so voxels <= 0 clip to low and land on 0 after the shift.
    return _map_in_slabs(array, out, _clip_rescale(low, high, 255.0 / (high - low)))


def normalize_intensity(volume: Volume, modality: str | None = None,
                        window: str | tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """``volume.array`` mapped to 0..255 float32 for the model (see the module docstring for the rule).

    ``modality`` overrides the detected one; ``window`` names the CT window (ignored for other modalities).
    """
    return normalize_as(volume, resolve_modality(volume, modality), window)


def normalize_as(volume: Volume, decision: ModalityDecision,
                 window: str | tuple[float, float] = DEFAULT_WINDOW, in_place: bool = False) -> np.ndarray:
    """``volume.array`` mapped to 0..255 float32 following an already made :class:`ModalityDecision`.

    ``in_place``: a float32 ``volume.array`` may be overwritten instead of copied (the caller no longer needs
    its intensities).
    """
    if decision.normalization == "none":
        return volume.array.astype(np.float32)
    if decision.normalization == "ct_window":
        level, width = parse_window(window)
        return window_ct(volume.array, level, width, in_place)
    return percentile_normalize(volume.array, in_place=in_place)
