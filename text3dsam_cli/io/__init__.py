"""Reading inputs (NIfTI, NRRD, MetaImage, DICOM series, challenge npz) and writing results atomically."""

from text3dsam_cli.io.atomic import atomic_path
from text3dsam_cli.io.dicom import (
    DicomSeries,
    choose_series,
    folder_has_dicom_images,
    is_dicom_file,
    list_series,
    read_dicom,
)
from text3dsam_cli.io.inputs import InputItem, expand_inputs, parse_shard, select_shard
from text3dsam_cli.io.npz import (
    npz_keys,
    read_challenge_npz,
    read_npz_array,
    read_npz_object,
    read_text_prompts,
    write_challenge_npz,
)
from text3dsam_cli.io.readers import SUFFIX_FORMATS, image_format, read_volume, strip_image_suffix
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.io.writers import OUTPUT_SUFFIXES, label_dtype, volume_to_image, write_label_map, write_volume

__all__ = [
    "OUTPUT_SUFFIXES",
    "SUFFIX_FORMATS",
    "DicomSeries",
    "InputItem",
    "Volume",
    "atomic_path",
    "choose_series",
    "expand_inputs",
    "folder_has_dicom_images",
    "image_format",
    "is_dicom_file",
    "label_dtype",
    "list_series",
    "npz_keys",
    "parse_shard",
    "read_challenge_npz",
    "read_dicom",
    "read_npz_array",
    "read_npz_object",
    "read_text_prompts",
    "read_volume",
    "select_shard",
    "strip_image_suffix",
    "volume_to_image",
    "write_challenge_npz",
    "write_label_map",
    "write_volume",
]
