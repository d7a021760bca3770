"""Open every file of a source before any training starts, so a bad file costs a line, not an hour.

:func:`check_file` decodes one file (PIL for 2D images, pydicom for DICOM, nibabel for NIfTI) and checks what a
pipeline of the given kind needs: decodable, not a decompression bomb, the right dimensionality, finite values.
:func:`validate_source` runs it over a whole :class:`~medsim.data.sources.Source`: strict mode raises one
:class:`~medsim.errors.DataError` listing every bad file; lenient mode drops the items that use them and
records them in the source and a :class:`~medsim.errors.BadInputReport`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsim.data.dicom import check_pixels, dicom_to_array, read_dataset
from medsim.data.sources import Source
from medsim.errors import BadInputReport, DataError
from medsim.files import check_pixel_count, file_format, open_image

__all__ = ["check_file", "validate_source", "ValidationResult", "EXPECTED_NDIM"]

logger = logging.getLogger(__name__)

#: spatial dimensionality each pipeline kind expects
EXPECTED_NDIM = {"rgb2d": 2, "gray2d": 2, "ct3d": 3}


def _check_pil(path: Path, kind: str) -> dict[str, Any]:
    with open_image(path) as im:  # the shared pixel limit; truncated/corrupt files named with their format
        size, mode, frames = im.size, im.mode, getattr(im, "n_frames", 1)
    if frames > 1 and kind in ("rgb2d", "gray2d"):
        raise DataError(path, f"expected a single 2D image, got {frames} frames")
    if mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "I;16B", "I;16L", "F", "1", "CMYK", "YCbCr"):
        raise DataError(path, f"unsupported image mode '{mode}'")
    if kind == "ct3d":
        raise DataError(path, f"expected a 3D volume, got a 2D image ({size[0]}x{size[1]})")
    return {"shape": (size[0], size[1]), "channels": len(mode) if mode in ("RGB", "RGBA", "LA") else 1}


def _check_nifti(path: Path, kind: str) -> dict[str, Any]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        check_pixel_count(int(np.prod(img.shape)), path, "x".join(map(str, img.shape)))
        data = np.asanyarray(img.dataobj)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except Exception as e:
        raise DataError(path, f"not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    shape = tuple(int(s) for s in data.shape)
    spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    want = EXPECTED_NDIM.get(kind, 3)
    if len(spatial) != want:
        raise DataError(path, f"expected a {want}D volume, got shape {shape}")
    if np.issubdtype(data.dtype, np.floating):
        bad = int((~np.isfinite(data)).sum())
        if bad:
            raise DataError(path, f"{bad} voxels are NaN or infinite")
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    return {"shape": spatial, "spacing": zooms}


def _check_dicom(path: Path, kind: str) -> dict[str, Any]:
    ds = read_dataset(path)
    check_pixels(ds, path)
    arr = dicom_to_array(ds, path)
    if arr.ndim != 2:
        raise DataError(path, f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    return {"shape": (arr.shape[1], arr.shape[0])}


def check_file(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Decode one file and check it fits a ``kind`` pipeline. Returns ``{"shape": (x, y[, z]), ...}``;
    raises :class:`DataError` naming the file and the reason."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    if p.stat().st_size == 0:
        raise DataError(p, "empty file (0 bytes)")
    fmt = file_format(p)  # by content: a JPEG named .dcm is a JPEG, a DICOM named .png a DICOM
    if fmt == "nifti":
        return _check_nifti(p, kind)
    if fmt == "dicom":
        return _check_dicom(p, kind)
    return _check_pil(p, kind)


@dataclass
class ValidationResult:
    """What validation saw: shapes/spacings per item and the skip report."""

    report: BadInputReport
    shapes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)


def validate_source(source: Source, *, lenient: bool = False, progress: bool = True,
                    report_path: str | os.PathLike | None = None) -> ValidationResult:
    """Open every image and mask of ``source``. Strict: raise one DataError listing all bad files (after
    checking all of them). Lenient: drop their items from ``source.items``, add them to ``source.bad``."""
    from tqdm.auto import tqdm

    result = ValidationResult(BadInputReport(source.root, total=len(source.items) + len(source.bad)))
    for b in source.bad:
        result.report.add(b)
    keep, bad_now = [], []
    for it in tqdm(source.items, desc=f"checking {Path(source.root).name}", disable=not progress, unit="item",
                   leave=False):
        try:
            info = _check_item(it, source.kind)
        except DataError as e:
            bad_now.extend(e.items)
            continue
        result.shapes[tuple(info["shape"])] += 1
        if "spacing" in info:
            result.spacings[tuple(round(v, 3) for v in info["spacing"])] += 1
        if "channels" in info:
            result.channels[info["channels"]] += 1
        keep.append(it)
    if (bad_now or source.bad) and not lenient:  # every problem at once: table rows and undecodable files
        everything = [*source.bad, *bad_now]
        raise DataError(items=everything, header=f"{len(everything)} unusable file(s) or row(s) in {source.root}; "
                                                 "nothing was trained. Fix or remove them, or run in lenient mode "
                                                 "(--lenient) to skip them:")
    for b in bad_now:
        result.report.add(b)
    source.items[:] = keep
    source.bad.extend(bad_now)
    if report_path is not None and result.report.skipped:
        result.report.write(report_path)
        logger.warning("skipped %d bad item(s); report written to %s", len(result.report.skipped), report_path)
    return result


def _check_item(item: dict, kind: str) -> dict[str, Any]:
    if "location" in item:  # a histology patch: the slide was checked when the grid was cut
        return {"shape": tuple(item["size"])}
    img = item["image"]
    if isinstance(img, list):  # a DICOM series: decode every slice once
        from medsim.data.dicom import load_dicom

        vol, _, series = load_dicom(img)
        info: dict[str, Any] = {"shape": vol.shape, "spacing": series.spacing}
    else:
        info = check_file(img, kind)
    if "mask" in item:
        m = check_file(item["mask"], kind)
        if tuple(m["shape"]) != tuple(info["shape"]):
            raise DataError(item["mask"], f"mask shape {tuple(m['shape'])} differs from image shape "
                                          f"{tuple(info['shape'])} ({img})")
    return info
