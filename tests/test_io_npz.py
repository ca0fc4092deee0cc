"""Challenge npz reading: real cases, prompts, and refusing hostile or broken files."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from text3dsam_cli.errors import InputError, OutputError
from text3dsam_cli.io.npz import (
    npz_keys,
    read_challenge_npz,
    read_npz_array,
    read_npz_object,
    read_text_prompts,
    write_challenge_npz,
)

DATA = Path(__file__).parents[1].parent / "shared" / "data"
CHALLENGE = DATA / "challenge"
CASES = {
    "CT_AMOS_amos_0018": ((63, 512, 512), 15, 0),
    "MR_BraTS-T1c_bratsgli_0017": ((70, 218, 182), 4, 0),
    "US_Cardiac_patient0027_2CH_half_sequence": ((19, 551, 669), 3, 0),
    "Microscopy_SELMA3D_patchvolume_nuclei_004_crop": ((134, 96, 96), 1, 1),
}


# --- helpers -------------------------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _object_npy(payload: bytes, shape: tuple[int, ...] = ()) -> bytes:
    """An object-dtype .npy member whose pickle payload is exactly ``payload``."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": shape})
    buf.write(payload)
    return buf.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data)
    return path


def _case_with_prompts_payload(path: Path, payload: bytes) -> Path:
    imgs = np.zeros((3, 4, 5), dtype=np.uint8)
    return _write_npz(path, {"imgs": _npy_bytes(imgs), "spacing": _npy_bytes(np.ones(3)),
                             "text_prompts": _object_npy(payload)})


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


class _BadObjectArrayState:
    """Pickles like an object ndarray whose state claims more elements than its data list holds."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (5,), np.dtype("O"), False, [1, 2]))


# --- real challenge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_reads_challenge_case_with_prompts(case: str) -> None:
    shape, n_classes, instance = CASES[case]
    volume = read_challenge_npz(CHALLENGE / f"{case}.npz")
    assert volume.shape == shape
    assert volume.array.dtype == np.uint8
    assert volume.source_format == "npz"
    assert volume.path == CHALLENGE / f"{case}.npz"
    assert len(volume.spacing) == 3 and all(isinstance(v, float) for v in volume.spacing)
    prompts = volume.meta["text_prompts"]
    assert prompts["instance_label"] == instance
    assert sorted((k for k in prompts if k != "instance_label"), key=int) == [str(i) for i in range(1, n_classes + 1)]
    assert all(isinstance(v, str) and v for k, v in prompts.items() if k != "instance_label")
    assert "imgs" in volume.meta["npz_keys"]


def test_spacing_is_kept_in_stored_xyz_order() -> None:
    volume = read_challenge_npz(CHALLENGE / "CT_AMOS_amos_0018.npz")
    stored = np.load(CHALLENGE / "CT_AMOS_amos_0018.npz")["spacing"]
    assert volume.spacing == tuple(float(v) for v in stored)
    assert volume.spacing[2] == pytest.approx(5.0)  # slice thickness last: x, y, z


def test_prompts_and_boxes_match_numpy_own_loader() -> None:
    path = CHALLENGE / "CT_AMOS_amos_0018.npz"
    trusted = np.load(path, allow_pickle=True)  # our own shipped data: fine to compare against here
    assert read_text_prompts(path) == trusted["text_prompts"].item()
    boxes = read_npz_object(path, "boxes")
    expected = [{k: int(v) for k, v in box.items()} for box in trusted["boxes"]]
    assert boxes == expected
    assert all(type(v) is int for box in boxes for v in box.values())


def test_ground_truth_array_and_keys() -> None:
    gts = read_npz_array(CHALLENGE / "MR_BraTS-T1c_bratsgli_0017_gt.npz", "gts")
    assert gts.shape == (70, 218, 182) and gts.dtype == np.uint8
    assert npz_keys(CHALLENGE / "MR_BraTS-T1c_bratsgli_0017_gt.npz") == ["gts", "spacing"]
    assert read_text_prompts(CHALLENGE / "MR_BraTS-T1c_bratsgli_0017_gt.npz") is None


def test_medsam2_npz_geometry_members_are_used() -> None:
    path = DATA / "extra" / "medsam2" / "CT_Lesion_000001_02_01_008-023.npz"
    volume = read_challenge_npz(path)
    stored = np.load(path)
    assert volume.direction == tuple(float(v) for v in stored["direction"])
    assert "text_prompts" not in volume.meta


def test_ground_truth_file_is_not_an_image() -> None:
    path = CHALLENGE / "CT_AMOS_amos_0018_gt.npz"
    with pytest.raises(InputError, match="no 'imgs'") as info:
        read_challenge_npz(path)
    assert path.name in str(info.value)


def test_missing_array_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no 'segs'"):
        read_npz_array(CHALLENGE / "CT_AMOS_amos_0018_gt.npz", "segs")


# --- hostile pickles ------------------------------------------------------------------------------------------


def test_pickle_calling_os_system_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    prompts = np.empty((), dtype=object)
    prompts[()] = {"1": _SystemCall(f"touch {marker}")}
    path = tmp_path / "evil.npz"
    np.savez(path, imgs=np.zeros((3, 4, 5), np.uint8), text_prompts=prompts)  # how an attacker would make it
    # sanity: the member really is a hostile pickle (numpy's own loader would run it)
    assert b"system" in zipfile.ZipFile(path).read("text_prompts.npy")
    with pytest.raises(InputError, match="refusing to unpickle") as info:
        read_challenge_npz(path)
    assert "evil.npz" in str(info.value)
    assert "only plain dicts, strings and numbers are accepted" in str(info.value)
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_text_prompts(path)
    assert not marker.exists()


def test_plain_pickle_of_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned2"
    payload = pickle.dumps(_SystemCall(f"touch {marker}"), protocol=2)
    with pytest.raises(InputError, match=r"refusing to unpickle .*posix\.system|refusing to unpickle .*os"):
        read_challenge_npz(_case_with_prompts_payload(tmp_path / "evil2.npz", payload))
    assert not marker.exists()


@pytest.mark.parametrize("value", [_Eval(), {"a": {1, 2}}, {"a": b"bytes"}, {"a": Path("x")}, {"a": complex(1, 2)}])
def test_other_objects_are_refused(tmp_path: Path, value: object) -> None:
    payload = pickle.dumps(value, protocol=4)
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_challenge_npz(_case_with_prompts_payload(tmp_path / "bad.npz", payload))


def test_object_array_of_foreign_class_is_refused(tmp_path: Path) -> None:
    prompts = np.empty((), dtype=object)
    prompts[()] = Path("/etc/passwd")
    path = _case_with_prompts_payload(tmp_path / "foreign.npz", pickle.dumps(prompts, protocol=4))
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_challenge_npz(path)


def test_inconsistent_array_state_is_refused_without_crashing(tmp_path: Path) -> None:
    # numpy's own __setstate__ crashes the interpreter on this; ours must refuse it cleanly.
    payload = pickle.dumps(_BadObjectArrayState(), protocol=4)
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_challenge_npz(_case_with_prompts_payload(tmp_path / "crash.npz", payload))


def test_garbage_pickle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="refusing to unpickle"):
        read_challenge_npz(_case_with_prompts_payload(tmp_path / "garbage.npz", b"\x80\x04not a pickle"))


def test_protocol_2_and_4_object_arrays_are_accepted(tmp_path: Path) -> None:
    value = {"1": "CT of the liver", "instance_label": 0, "extra": [1.5, None, True]}
    for protocol in (2, 3, 4, 5):
        prompts = np.empty((), dtype=object)
        prompts[()] = value
        payload = pickle.dumps(prompts, protocol=protocol)
        path = _case_with_prompts_payload(tmp_path / f"p{protocol}.npz", payload)
        assert read_challenge_npz(path).meta["text_prompts"] == value


def test_numpy_written_prompts_round_trip(tmp_path: Path) -> None:
    value = {"1": "MR of the brain tumour", "2": "edema", "instance_label": 1}
    path = tmp_path / "case.npz"
    np.savez_compressed(path, imgs=np.zeros((2, 3, 4), np.uint8), spacing=np.array([1.0, 2.0, 3.0]),
                        text_prompts=np.array(value, dtype=object))
    volume = read_challenge_npz(path)
    assert volume.meta["text_prompts"] == value
    assert volume.spacing == (1.0, 2.0, 3.0)


# --- broken files -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file") as info:
        read_challenge_npz(tmp_path / "nope.npz")
    assert "nope.npz" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(InputError, match="empty") as info:
        read_challenge_npz(tmp_path / "empty.npz")
    assert "empty.npz" in str(info.value)


def test_text_file_named_npz(tmp_path: Path) -> None:
    (tmp_path / "notes.npz").write_text("hello\n")
    with pytest.raises(InputError, match=r"not a valid \.npz") as info:
        read_challenge_npz(tmp_path / "notes.npz")
    assert "notes.npz" in str(info.value)


def test_truncated_npz(tmp_path: Path) -> None:
    data = (CHALLENGE / "Microscopy_SELMA3D_patchvolume_nuclei_004_crop.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        read_challenge_npz(tmp_path / "cut.npz")
    assert "cut.npz" in str(info.value)


def test_corrupt_member_data(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.npz"
    np.savez(path, imgs=np.arange(4000, dtype=np.uint8).reshape(10, 20, 20))  # stored, not deflated
    data = bytearray(path.read_bytes())
    data[1000:1010] = b"\xff" * 10  # inside imgs data: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="cannot read 'imgs'"):
        read_challenge_npz(path)


def test_imgs_must_be_3d(tmp_path: Path) -> None:
    path = tmp_path / "flat.npz"
    np.savez(path, imgs=np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match="3-D") as info:
        read_challenge_npz(path)
    assert "flat.npz" in str(info.value)


def test_imgs_with_nan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nan.npz"
    imgs = np.zeros((3, 4, 5), np.float32)
    imgs[1, 2, 3] = np.nan
    np.savez(path, imgs=imgs)
    with pytest.raises(InputError, match="NaN") as info:
        read_challenge_npz(path)
    assert "nan.npz" in str(info.value)


def test_object_imgs_are_refused(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "objimgs.npz", {"imgs": _object_npy(pickle.dumps([1, 2, 3]), (3,))})
    with pytest.raises(InputError, match="object array"):
        read_challenge_npz(path)


def test_bad_spacing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spacing.npz"
    np.savez(path, imgs=np.zeros((2, 3, 4), np.uint8), spacing=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(InputError, match="spacing"):
        read_challenge_npz(path)


# --- writing -----------------------------------------------------------------------------------------------------


def test_write_challenge_npz_round_trip(tmp_path: Path) -> None:
    segs = np.random.default_rng(0).integers(0, 5, (3, 4, 5)).astype(np.uint8)
    out = write_challenge_npz(tmp_path / "sub" / "case.npz", segs=segs, spacing=np.array([1.0, 1.0, 2.0]))
    assert out == tmp_path / "sub" / "case.npz"
    assert np.array_equal(read_npz_array(out, "segs"), segs)
    assert npz_keys(out) == ["segs", "spacing"]
    assert zipfile.ZipFile(out).infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.npz"]


def test_write_challenge_npz_refuses_object_arrays(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="object"):
        write_challenge_npz(tmp_path / "x.npz", segs=np.zeros((2, 2, 2), np.uint8),
                            text_prompts=np.array({"1": "x"}, dtype=object))
    assert not (tmp_path / "x.npz").exists()


def test_shared_reference_bomb_is_refused(tmp_path: Path) -> None:
    inner: list = ["x"] * 1000
    for _ in range(3):  # a few KB of pickle that would expand to 10**12 values
        inner = [inner] * 1000
    payload = pickle.dumps({"1": inner}, protocol=4)
    assert len(payload) < 100_000
    with pytest.raises(InputError, match="too many values"):
        read_challenge_npz(_case_with_prompts_payload(tmp_path / "bomb.npz", payload))


@pytest.mark.parametrize("layout", ["big_endian", "fortran", "npy_v2"])
def test_numeric_member_layouts(tmp_path: Path, layout: str) -> None:
    imgs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    if layout == "big_endian":
        stored = imgs.astype(">f4")
        member = _npy_bytes(stored)
    elif layout == "fortran":
        stored = np.asfortranarray(imgs)
        member = _npy_bytes(stored)
    else:
        buf = io.BytesIO()
        npy_format.write_array(buf, imgs, version=(2, 0))
        member = buf.getvalue()
    path = _write_npz(tmp_path / f"{layout}.npz", {"imgs": member})
    assert np.array_equal(read_challenge_npz(path).array, imgs)


def test_header_that_overstates_the_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXT3DSAM_MAX_VOXELS", str(1 << 40))  # past the size limit: the length check refuses it
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (4096, 4096, 4096)})
    buf.write(b"\0" * 64)
    path = _write_npz(tmp_path / "liar.npz", {"imgs": buf.getvalue()})
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_challenge_npz(path)


def test_plain_string_member_needs_no_pickle(tmp_path: Path) -> None:
    path = tmp_path / "strings.npz"
    np.savez(path, imgs=np.zeros((2, 3, 4), np.uint8), boxes=np.array(["a", "bc"]))
    assert read_npz_object(path, "boxes") == ["a", "bc"]
