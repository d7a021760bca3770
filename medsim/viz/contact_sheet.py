"""Contact sheets: a grid of images with optional mask outlines and captions, saved as PNG (PIL only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import atomic_path

__all__ = ["contact_sheet", "to_uint8", "save_png"]


def to_uint8(img: np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) float → (H, W, 3) uint8, min–max scaled per image."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = np.moveaxis(a[:3], 0, -1)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = (a * 255).round().astype(np.uint8)
    if a.ndim == 2 or a.shape[-1] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=-1)
    return a


def _outline(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of a binary mask (scikit-image)."""
    from skimage.segmentation import find_boundaries

    return find_boundaries(np.asarray(mask) > 0.5, mode="inner")


def contact_sheet(images: Sequence[np.ndarray], path: str | os.PathLike, *, masks: Sequence[np.ndarray] | None = None,
                  captions: Sequence[str] | None = None, columns: int = 8, scale: int = 2) -> Path:
    """Save ``images`` (each (C, H, W) or (H, W); arrays are in MONAI's (x, y) order and shown transposed so
    they look as the file does) in a grid, mask outlines in red, captions under each tile."""
    from PIL import Image, ImageDraw

    tiles = []
    for i, img in enumerate(images):
        a = np.asarray(img)
        rgb = to_uint8(np.swapaxes(a, -1, -2))
        if masks is not None and masks[i] is not None:
            m = np.swapaxes(np.asarray(masks[i]).reshape(a.shape[-2:]), -1, -2)
            rgb[_outline(m)] = (255, 0, 0)
        tiles.append(Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST))
    if not tiles:
        raise ValueError("no images to draw")
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    cap_h = 14 if captions else 0
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + cap_h + 4) + 4), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(tiles):
        x, y = 4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + cap_h + 4)
        sheet.paste(t, (x, y))
        if captions:
            draw.text((x + 2, y + h + 1), str(captions[i])[: max(4, w // 6)], fill=(230, 230, 230))
    return save_png(sheet, path)


def save_png(image: Any, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG under a temporary name, then move it into place (parents created)."""
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
