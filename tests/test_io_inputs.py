"""expand_inputs (files, folders, DICOM series, stdin) and select_shard."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from text3dsam_cli.errors import InputError, UsageError
from text3dsam_cli.io.inputs import InputItem, expand_inputs, parse_shard, select_shard

DATA = Path(__file__).parents[1].parent / "shared" / "data"
CHALLENGE = DATA / "challenge"
D2N = DATA / "dicom" / "dicom2nifti"


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A batch folder: NIfTI, NRRD, npz (+ its _gt), two DICOM series subfolders, clutter."""
    root = tmp_path / "batch"
    root.mkdir()
    shutil.copy(DATA / "nifti" / "totalsegmentator" / "example_mr_sm.nii.gz", root / "mr.nii.gz")
    shutil.copy(DATA / "extra" / "pyradiomics" / "breast1_image.nrrd", root / "breast.nrrd")
    shutil.copy(CHALLENGE / "Microscopy_SELMA3D_patchvolume_nuclei_004_crop.npz", root / "cells.npz")
    shutil.copy(CHALLENGE / "Microscopy_SELMA3D_patchvolume_nuclei_004_crop_gt.npz", root / "cells_gt.npz")
    shutil.copytree(D2N / "siemens_anatomical_001" / "dicom", root / "series_a")
    shutil.copytree(DATA / "dicom" / "totalsegmentator_ct" / "dicom", root / "series_b")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.nii.gz").write_bytes(b"")
    (root / "not_dicom").mkdir()
    (root / "not_dicom" / "deep.nii.gz").write_bytes(b"")  # deeper folders are not searched
    return root


def test_challenge_folder_skips_ground_truth() -> None:
    items = expand_inputs([str(CHALLENGE)])
    names = [item.name for item in items]
    assert names == sorted(p.name for p in CHALLENGE.glob("*.npz") if not p.name.endswith("_gt.npz"))
    assert all(item.kind == "npz" and item.name == item.path.name for item in items)


def test_explicit_gt_file_is_kept() -> None:
    items = expand_inputs([str(CHALLENGE / "CT_AMOS_amos_0018_gt.npz")])
    assert [item.name for item in items] == ["CT_AMOS_amos_0018_gt.npz"]


def test_mixed_folder(mixed_folder: Path) -> None:
    items = expand_inputs([mixed_folder])
    got = {item.name: (item.kind, item.path.name) for item in items}
    assert got == {
        "breast.nii.gz": ("nrrd", "breast.nrrd"),
        "cells.npz": ("npz", "cells.npz"),
        "mr.nii.gz": ("nifti", "mr.nii.gz"),
        "series_a.nii.gz": ("dicom", "series_a"),
        "series_b.nii.gz": ("dicom", "series_b"),
    }
    stems = {item.stem for item in items}
    assert stems == {"breast", "cells", "mr", "series_a", "series_b"}


def test_dicom_series_folder_is_one_input() -> None:
    items = expand_inputs([str(D2N / "hitachi_anatomical_001" / "dicom")])
    assert len(items) == 1
    assert items[0].kind == "dicom" and items[0].stem == "dicom"


def test_dicom_file_names_its_series_folder() -> None:
    first = sorted((DATA / "dicom" / "totalsegmentator_ct" / "dicom").iterdir())[0]
    (item,) = expand_inputs([str(first)])
    assert item.kind == "dicom" and item.path == first and item.name == "dicom.nii.gz"


def test_clashing_names_get_parent_prefixes() -> None:
    folders = sorted(D2N.glob("*/dicom"))
    items = expand_inputs([str(f) for f in folders])
    assert [item.stem for item in items] == [f"{f.parent.name}_dicom" for f in folders]
    assert len({item.name for item in items}) == len(items)


def test_same_folder_clash_is_numbered(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8))
    sitk.WriteImage(image, str(tmp_path / "x.nii"))
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))
    items = expand_inputs([tmp_path])
    assert sorted(item.name for item in items) == ["x_1.nii.gz", "x_2.nii.gz"]


def test_stdin_list(mixed_folder: Path) -> None:
    text = f"\n{mixed_folder / 'mr.nii.gz'}\n\n  {mixed_folder / 'series_a'}  \n{CHALLENGE}\n\n"
    items = expand_inputs(["-"], stdin=io.StringIO(text))
    assert items[0].path == mixed_folder / "mr.nii.gz"
    assert items[1].path == mixed_folder / "series_a"
    assert len(items) == 2 + len(expand_inputs([CHALLENGE]))


def test_stdin_mixed_with_arguments_and_duplicates(mixed_folder: Path) -> None:
    items = expand_inputs([str(mixed_folder / "mr.nii.gz"), "-"],
                          stdin=io.StringIO(f"{mixed_folder / 'mr.nii.gz'}\n{mixed_folder / 'breast.nrrd'}\n"))
    assert [item.name for item in items] == ["mr.nii.gz", "breast.nii.gz"]


def test_missing_path_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        expand_inputs([str(CHALLENGE), str(tmp_path / "ghost.nii.gz")])
    assert "ghost.nii.gz" in str(info.value)


def test_missing_path_from_stdin_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"ghost\.mha"):
        expand_inputs(["-"], stdin=io.StringIO(str(tmp_path / "ghost.mha")))


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("# nothing\n")
    with pytest.raises(InputError, match="no images") as info:
        expand_inputs([tmp_path / "empty"])
    assert "empty" in str(info.value)


def test_folder_with_only_ground_truth_has_no_images(tmp_path: Path) -> None:
    shutil.copy(CHALLENGE / "Microscopy_SELMA3D_patchvolume_nuclei_004_crop_gt.npz", tmp_path / "a_gt.npz")
    with pytest.raises(InputError, match="no images"):
        expand_inputs([tmp_path])


def test_unsupported_explicit_file(tmp_path: Path) -> None:
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(InputError, match="unsupported") as info:
        expand_inputs([tmp_path / "scan.jpg"])
    assert "scan.jpg" in str(info.value)


def test_no_inputs() -> None:
    with pytest.raises(InputError, match="no inputs"):
        expand_inputs(["-"], stdin=io.StringIO("\n\n"))


# --- shards ------------------------------------------------------------------------------------------------


def _fake_items(n: int) -> list[InputItem]:
    return [InputItem(Path(f"/data/case_{(i * 7919) % n:03d}.nii.gz"), "nifti", f"case_{i}") for i in range(n)]


@pytest.mark.parametrize("n_items", [0, 1, 3, 4, 10, 17])
def test_shards_cover_every_input_exactly_once(n_items: int) -> None:
    items = _fake_items(n_items)
    seen: list[Path] = []
    for i in range(1, 5):
        shard = select_shard(items, f"{i}/4")
        assert len(shard) in (n_items // 4, n_items // 4 + 1)
        seen.extend(item.path for item in shard)
    assert sorted(seen) == sorted(item.path for item in items)
    assert len(seen) == len(set(seen))


def test_shards_are_deterministic_and_order_independent() -> None:
    items = _fake_items(10)
    forward = select_shard(items, "2/3")
    backward = select_shard(list(reversed(items)), "2/3")
    assert forward == backward
    ordered = sorted(items, key=lambda item: str(item.path))
    assert forward == [ordered[1], ordered[4], ordered[7]]


def test_real_inputs_sharded(mixed_folder: Path) -> None:
    items = expand_inputs([mixed_folder, CHALLENGE])
    shards = [select_shard(items, f"{i}/4") for i in range(1, 5)]
    assert sorted(str(it.path) for s in shards for it in s) == sorted(str(it.path) for it in items)


def test_no_shard_returns_everything_sorted() -> None:
    items = _fake_items(5)
    assert select_shard(items, None) == sorted(items, key=lambda item: str(item.path))


@pytest.mark.parametrize("spec", ["0/4", "5/4", "1/0", "a/b", "", "1-4", "1/4/2", "-1/4", "1.5/4"])
def test_bad_shard_is_usage_error(spec: str) -> None:
    with pytest.raises(UsageError, match="shard"):
        select_shard(_fake_items(3), spec)


def test_parse_shard() -> None:
    assert parse_shard("3/8") == (3, 8)
    assert parse_shard(" 1 / 1 ") == (1, 1)
