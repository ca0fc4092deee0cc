"""PNG preview: for each label, the three orthogonal slices through its centre with the mask overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from text3dsam_cli.io import Volume, atomic_path

PANEL = 256  # pixels on the longer side of each panel
# Distinct, colour-blind-friendly-ish overlay colours (cycled).
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def _grey(array: np.ndarray) -> np.ndarray:
    """Slice to uint8 for display (0.5/99.5 percentile contrast)."""
    a = array.astype(np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5)) if a.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _panel(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], aspect: float) -> Image.Image:
    """One slice with the mask blended in, resized to physical proportions (aspect = row mm / column mm)."""
    rgb = np.repeat(_grey(image)[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.asarray(colour, dtype=np.float32)
    rows, cols = image.shape
    height, width = rows * aspect, cols
    scale = PANEL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Medical convention: the first array row is at the top; flip z so the head is up in coronal/sagittal.
    return Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.NEAREST)


def _as_lps(volume: Volume, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Image and labels reoriented to LPS (rows anterior->posterior, columns right->left), so every preview
    shows the radiological convention whatever the file's voxel order; plus the (x, y, z) spacing."""
    from text3dsam_cli.io import volume_to_image
    from text3dsam_cli.io.itk import simpleitk

    sitk = simpleitk()

    try:
        image = sitk.DICOMOrient(volume_to_image(volume), "LPS")
        label_image = sitk.DICOMOrient(volume_to_image(volume.with_array(labels)), "LPS")
    except RuntimeError:  # a direction SimpleITK cannot reorient: show the voxels as stored
        return volume.array, labels, tuple(float(s) for s in volume.spacing)  # type: ignore[return-value]
    spacing = tuple(float(s) for s in image.GetSpacing())
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label_image), spacing  # type: ignore[return-value]


def write_preview(volume: Volume, labels: np.ndarray, values: Sequence[int], prompts: Sequence[str],
                  path: str | Path) -> Path:
    """Write a PNG with one row per label (axial, coronal, sagittal through its centre of mass)."""
    image, labels, (sx, sy, sz) = _as_lps(volume, labels)
    rows = []
    for i, (value, prompt) in enumerate(zip(values, prompts)):
        mask = labels == value
        colour = COLOURS[i % len(COLOURS)]
        if mask.any():
            z, y, x = (round(float(c.mean())) for c in np.nonzero(mask))
        else:
            z, y, x = (s // 2 for s in labels.shape)
        panels = [
            _panel(image[z], mask[z], colour, sy / sx),
            _panel(image[::-1, y, :], mask[::-1, y, :], colour, sz / sx),
            _panel(image[::-1, :, x], mask[::-1, :, x], colour, sz / sy),
        ]
        title = f"{value}: {prompt}" + ("" if mask.any() else "  (empty)")
        rows.append((title, panels))
    width = max(sum(p.width for p in panels) + 8 * (len(panels) + 1) for _, panels in rows) if rows else PANEL
    height = sum(max(p.height for p in panels) + 28 for _, panels in rows) + 8 if rows else PANEL
    canvas = Image.new("RGB", (max(width, 320), height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    top = 8
    for title, panels in rows:
        draw.text((8, top), title[:100], fill=(255, 255, 255))
        left = 8
        for p in panels:
            canvas.paste(p, (left, top + 18))
            left += p.width + 8
        top += max(p.height for p in panels) + 28
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
