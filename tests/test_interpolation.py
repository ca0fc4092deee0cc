"""The one interpolation-index rule (``model/interpolation.py``) against ``torch.nn.functional.interpolate``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from text3dsam_cli.model.interpolation import interpolation_matrix, source_index

SIZES = [(1, 4), (2, 8), (3, 7), (5, 23), (8, 32), (16, 64), (7, 3), (10, 3), (64, 17), (100, 100), (12, 12 * 4 + 1)]


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
def test_matrix_equals_interpolate_exactly(n_in, n_out):
    """Interpolating the unit vectors gives PyTorch's weights exactly: the matrix must hold the same numbers."""
    eye = torch.eye(n_in, dtype=torch.float32)[:, None, :]  # (in, 1, in): one unit vector per batch row
    torch_matrix = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T  # (out, in)
    assert torch.equal(interpolation_matrix(n_in, n_out), torch_matrix)


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
def test_source_index_reproduces_interpolate(n_in, n_out):
    x = torch.randn(3, 1, n_in, generator=torch.Generator().manual_seed(n_in * 1000 + n_out))
    i0, i1, w1 = source_index(n_in, n_out)
    assert i0.min() >= 0 and i1.max() <= n_in - 1 and bool(((w1 >= 0) & (w1 < 1)).all())
    ours = x[..., i0] * (1 - w1) + x[..., i1] * w1
    theirs = F.interpolate(x, size=n_out, mode="linear", align_corners=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_trilinear_is_the_product_of_three_matrices():
    x = torch.randn(1, 1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    size = (16, 9, 23)
    mats = [interpolation_matrix(n, m) for n, m in zip(x.shape[2:], size)]
    ours = torch.einsum("bcdhw,Dd,Hh,Ww->bcDHW", x, *mats)
    theirs = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
