"""Previews show the radiological (LPS) orientation whatever the file's voxel order."""

from __future__ import annotations

import numpy as np

from text3dsam_cli.io import Volume
from text3dsam_cli.preview import _as_lps, write_preview


def test_flipped_storage_gives_the_same_preview_arrays():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 100, (4, 5, 6)).astype(np.int16)
    labels = (array > 50).astype(np.uint8)
    lps = Volume(array, spacing=(1.0, 2.0, 3.0))
    # The same image stored right-to-left flipped in x (an RAS-like file): direction -1 on x, origin at the end.
    flipped = Volume(array[:, :, ::-1].copy(), spacing=(1.0, 2.0, 3.0), origin=(5.0, 0.0, 0.0),
                     direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    a_img, a_lab, a_sp = _as_lps(lps, labels)
    b_img, b_lab, b_sp = _as_lps(flipped, labels[:, :, ::-1].copy())
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_sp == b_sp == (1.0, 2.0, 3.0)


def test_preview_png_has_a_row_per_label(tmp_path):
    array = np.zeros((8, 16, 16), np.int16)
    labels = np.zeros_like(array, dtype=np.uint8)
    labels[2:5, 4:9, 4:9] = 1
    path = write_preview(Volume(array), labels, [1, 2], ["liver", "spleen"], tmp_path / "p.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > 2 * 64
