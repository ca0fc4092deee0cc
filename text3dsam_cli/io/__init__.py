"""Reading inputs and writing results atomically, for every format of :mod:`text3dsam_cli.io.formats`.

The names below are imported on first use (PEP 562), so that importing a light part of the package (the format
registry, atomic writing) does not load SimpleITK, pydicom or nibabel.
"""

from __future__ import annotations

from text3dsam_cli.lazy import lazy_exports

#: Public name -> module that defines it.
_EXPORTS = {
    "atomic_path": "atomic",
    "write_json": "atomic",
    "write_text": "atomic",
    "DicomSeries": "dicom",
    "choose_series": "dicom",
    "folder_has_dicom_images": "dicom",
    "is_dicom_file": "dicom",
    "list_series": "dicom",
    "read_dicom": "dicom",
    "FORMATS": "formats",
    "Format": "formats",
    "InputItem": "inputs",
    "expand_inputs": "inputs",
    "parse_shard": "inputs",
    "select_shard": "inputs",
    "npz_keys": "npz",
    "read_challenge_npz": "npz",
    "read_npz_array": "npz",
    "read_npz_object": "npz",
    "read_text_prompts": "npz",
    "write_challenge_npz": "npz",
    "SUFFIX_FORMATS": "readers",
    "image_format": "readers",
    "read_volume": "readers",
    "strip_image_suffix": "readers",
    "Volume": "volume",
    "OUTPUT_SUFFIXES": "writers",
    "label_dtype": "writers",
    "volume_to_image": "writers",
    "write_label_map": "writers",
    "write_volume": "writers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
