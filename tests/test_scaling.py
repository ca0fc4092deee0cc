"""Sized to the machine: one thread budget for every parallel step, threaded compression, the on-device label map.

The device path runs here on the CPU (``on_device=True``): the same code a GPU runs, proven against the CPU path.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DATA

from text3dsam_cli import parallel, upsampling
from text3dsam_cli.devices import set_threads
from text3dsam_cli.errors import UsageError
from text3dsam_cli.io.images import _written_whole, write_itk_image
from text3dsam_cli.io.volume import Volume
from text3dsam_cli.preprocess import window_ct
from text3dsam_cli.quality import assess_labels

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture
def budget():
    """Set the thread budget for one test, restored afterwards (torch's threads too)."""
    torch_threads = torch.get_num_threads()
    yield parallel.set_thread_budget
    parallel.set_thread_budget(None)
    torch.set_num_threads(torch_threads)


def test_thread_budget_follows_threads_option(budget):
    assert parallel.thread_budget() == parallel.usable_cores()
    set_threads(3)
    assert parallel.thread_budget() == 3 and torch.get_num_threads() == 3
    set_threads(None)
    assert parallel.thread_budget() == parallel.usable_cores()
    with pytest.raises(UsageError):
        set_threads(-1)


def test_map_shares_uses_the_budget(budget):
    import threading

    def names(share: list[int]) -> set[str]:
        return {threading.current_thread().name}

    budget(1)
    assert len(parallel.map_shares(names, list(range(8)))) == 1  # in the calling thread
    budget(4)
    shares = parallel.map_shares(lambda share: share, list(range(10)))
    assert len(shares) == 4 and sorted(i for share in shares for i in share) == list(range(10))
    assert len(parallel.map_shares(lambda share: share, list(range(10)), most=2)) == 2


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_normalisation_and_quality_same_on_any_budget(budget, threads):
    image = np.asanyarray(nib.load(CT).dataobj).astype(np.float32)
    budget(1)
    reference = window_ct(image, 40, 400)
    labels = (reference > 120).astype(np.uint8) + (reference > 200)
    expected = assess_labels(labels, [1, 2], 0.003375)
    budget(threads)
    assert np.array_equal(window_ct(image, 40, 400), reference)
    assert assess_labels(labels, [1, 2], 0.003375) == expected


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threaded_compression_reads_everywhere(budget, tmp_path, threads):
    """The .nii.gz written on 1, 2 or 4 threads is one valid gzip stream: nibabel, Python's gzip and SimpleITK
    read the same voxels, at a known position."""
    import SimpleITK as sitk

    rng = np.random.default_rng(threads)
    array = np.zeros((40, 300, 280), dtype=np.uint8)
    array[rng.random(array.shape) < 0.3] = 4
    array[7, 11, 13] = 9
    budget(threads)
    out = write_itk_image(Volume(array, (0.7, 0.8, 2.5), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                          tmp_path / f"t{threads}.nii.gz", keeps_shear=False)
    data = np.asarray(nib.load(out).dataobj)  # nibabel: (x, y, z)
    assert data.shape == (280, 300, 40) and data[13, 11, 7] == 9
    assert np.array_equal(data.transpose(2, 1, 0), array)
    with gzip.open(out) as fp:
        assert len(fp.read()) == 352 + array.size
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), array)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_written_whole_finds_a_cut_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    payload = bytes(range(256)) * 1000
    with gzip.open(path, "wb") as fp:
        fp.write(payload)
    assert _written_whole(path, len(payload), True) is None
    assert "truncated" in _written_whole(path, len(payload) + 1, True)
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # the trailer cut
    assert "truncated" in _written_whole(path, len(payload), True)
    raw = tmp_path / "x.nii"
    raw.write_bytes(payload[:100])
    assert _written_whole(raw, 100, False) is None and "expected 101" in _written_whole(raw, 101, False)


def test_full_disk_while_compressing_on_threads(budget, tmp_path):
    """A write error inside a compression thread still fails the write, and nothing is left behind."""
    import subprocess
    import sys

    script = (
        "import numpy as np, resource, sys\n"
        "from pathlib import Path\n"
        "from text3dsam_cli import parallel\n"
        "from text3dsam_cli.errors import OutputError\n"
        "from text3dsam_cli.io.images import write_itk_image\n"
        "from text3dsam_cli.io.volume import Volume\n"
        "parallel.set_thread_budget(3)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "a = np.random.default_rng(0).integers(0, 200, (30, 200, 200)).astype(np.uint8)\n"
        "try:\n"
        "    write_itk_image(Volume(a, (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),\n"
        "                    Path(sys.argv[1]) / 'big.nii.gz', keeps_shear=False)\n"
        "except OutputError as exc:\n"
        "    print('refused:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused:"), proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def _logits(k: int, grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, *grid, generator=gen) * 12.0 + 3.0
    return torch.cat([base, base[:1] + 30.0, base[1:2] + 30.0])  # saturated ties go to the earlier prompt


@pytest.mark.parametrize("values", [None, [3, 7, 300, 2, 5, 9]])
@pytest.mark.parametrize("slab", [1, 4, 1000])
def test_device_label_map_equals_cpu_path(monkeypatch, values, slab):
    """The on-device path (one slab, several, one slice each) gives the CPU dense path's labels, uint16 too."""
    logits = _logits(4, (5, 7, 6), seed=slab)
    values = values or list(range(1, logits.shape[0] + 1))
    out_shape = (23, 31, 17)
    expected, _ = upsampling.upsample_argmax_dense(logits, out_shape, values)
    monkeypatch.setattr(upsampling, "device_slab_slices", lambda device, per_slice, slices: min(slab, slices))
    got, _ = upsampling.upsample_argmax_dense(logits, out_shape, values, on_device=True)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert got.dtype == (np.uint16 if max(values) > 255 else np.uint8)


def test_device_slab_fits_free_memory():
    cpu = torch.device("cpu")  # no free-memory query: a 256 MB slab
    assert upsampling.device_slab_slices(cpu, 1 << 20, 10_000) == 256
    assert upsampling.device_slab_slices(cpu, 1 << 20, 7) == 7
    assert upsampling.device_slab_slices(cpu, 1 << 40, 7) == 1
