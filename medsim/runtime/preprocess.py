"""Model input from an image, with NumPy + PIL (+ pydicom / nibabel), exactly as training's ``eval#preprocessing``.

The recipe comes from ``manifest.json["preprocessing"]`` (written by ``medsim export``); this module reimplements
the MONAI transforms it names, step by step, so a host without PyTorch/MONAI feeds the model the same numbers:

=========  ======================================================================================================
kind       steps (MONAI name → what is done here)
=========  ======================================================================================================
rgb2d      LoadImaged (PILReader, ``reverse_indexing``: (C, x, y)) → EnsureTyped (float32) → ToRGBd (alpha
           dropped, one channel repeated to 3) → ScaleIntensityRanged (``scale``: affine map, clipped) → Resized
           (``resize_mode`` "area": adaptive average pooling) → NormalizeIntensityd (``(v - mean[c]) / std[c]``)
gray2d     LoadImaged (DICOM: modality LUT → VOI LUT / window → MONOCHROME1 inverted; else PIL / nibabel) →
           EnsureTyped → ChannelMaxd (max over the first 3 channels) → ScaleIntensityd (min–max of the image to
           ``scale.to``) → Resized (area)
ct3d       NIfTI / DICOM series → RAS orientation → resampling to ``pixdim`` → HU window → pad / centre crop
           (:mod:`medsim.runtime.volume`)
=========  ======================================================================================================

Axis order: the model input is MONAI's (C, x, y) — x is the image column (PIL width), y the row — i.e. the
transpose of NumPy/PIL (H, W, C). Arrays given to :func:`preprocess` are in NumPy/PIL layout, ``(H, W)`` or
``(H, W, C)``, as ``np.asarray(PIL.Image.open(f))`` returns them.

The array transforms (area resize, intensity scaling, normalisation) are :mod:`medsim.runtime.transforms`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from medsim.data.dicom import apply_window  # torch-free: reused, not copied
from medsim.errors import DataError
from medsim.files import check_pixel_count, file_format, open_image  # one format sniffer and pixel limit
from medsim.preprocessing import RGB_SCALE
from medsim.runtime.errors import DeployError, UnsupportedPreprocessing
from medsim.runtime.manifest import MANIFEST_NAME, manifest_path, read_manifest
from medsim.runtime.transforms import (area_resize, channel_max, normalize_intensity, scale_minmax, scale_range,
                                       to_rgb)

__all__ = ["MANIFEST_NAME", "ImageSource", "load_manifest", "read_image", "preprocess", "preprocess_with_size",
           "area_resize", "apply_window", "scale_range", "KNOWN_STEPS"]

logger = logging.getLogger(__name__)

#: the MONAI steps each kind may contain; anything else means the manifest describes a pipeline this module
#: would silently get wrong, so it is refused
KNOWN_STEPS = {
    "rgb2d": {"LoadImaged", "EnsureTyped", "ToRGBd", "ScaleIntensityRanged", "Resized", "NormalizeIntensityd"},
    "gray2d": {"LoadImaged", "EnsureTyped", "ChannelMaxd", "ScaleIntensityd", "Resized"},
    "ct3d": {"LoadImaged", "EnsureTyped", "Orientationd", "Spacingd", "ScaleIntensityRanged",
             "ScaleIntensityRangePercentilesd", "CTorMRd", "SpatialPadd", "CenterSpatialCropd"},
}

try:  # PIL is a hard requirement of reading images, but arrays alone need only NumPy
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - PIL is a medsim dependency
    _PILImage = None  # type: ignore[assignment]

#: what :func:`preprocess` accepts: a file path, a NumPy array in (H, W[, C]) layout, or a PIL image
ImageSource = Union[str, os.PathLike, np.ndarray, Any]


# --------------------------------------------------------------------------------------------------- manifest
def load_manifest(path: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Read ``manifest.json`` from a model directory, a model file beside it, or the manifest file itself
    (a dict is returned as is, after the same checks).

    Raises:
        DeployError: the file is missing, not JSON, or lacks ``preprocessing`` / ``input``.
    """
    if isinstance(path, dict):
        manifest, where = path, "manifest"
    else:
        where = str(manifest_path(path))
        manifest = read_manifest(path)  # one reader for export and deploy
    if not isinstance(manifest, dict):
        raise DeployError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("preprocessing", "input"):
        if not isinstance(manifest.get(key), dict):
            raise DeployError(f"{where}: no '{key}' section — not a medsim export manifest (re-run medsim export)")
    return manifest


def _prep_section(manifest: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    m = load_manifest(manifest)
    return m["preprocessing"]


# ----------------------------------------------------------------------------------------------------- reading
def _runtime_error(e: DataError) -> DeployError:
    """The data layer's one-line ``path: reason`` as the runtime's error type."""
    return DeployError(str(e))


def _hwc_to_cxy(arr: np.ndarray, what: str) -> np.ndarray:
    """(H, W) or (H, W, C) → (C, x, y) float32 (MONAI PILReader ``reverse_indexing`` + EnsureChannelFirst)."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        out = arr.T[None]
    elif arr.ndim == 3 and arr.shape[2] <= 4:
        out = arr.transpose(2, 1, 0)
    elif arr.ndim == 3 and arr.shape[0] <= 4 < min(arr.shape[1:]):
        raise DeployError(f"{what}: array of shape {arr.shape} looks channel-first; give arrays as (H, W) or "
                          "(H, W, C) like np.asarray(PIL.Image.open(file)), e.g. arr.transpose(1, 2, 0)")
    else:
        raise DeployError(f"{what}: expected an image array (H, W) or (H, W, C) with C <= 4, got shape "
                          f"{arr.shape}")
    if not np.issubdtype(out.dtype, np.number):
        raise DeployError(f"{what}: array of dtype {arr.dtype} is not numeric")
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_pil(p: Path) -> np.ndarray:
    if _PILImage is None:  # pragma: no cover
        raise DeployError(f"{p}: reading images needs Pillow (pip install pillow)")
    try:
        im = open_image(p)  # the data layer's pixel limit: a decompression bomb is refused here too
    except DataError as e:
        raise _runtime_error(e) from None
    with im:
        if im.mode == "P":
            logger.warning("%s: palette image; read as palette indices, as training's MONAI PILReader did "
                           "(convert it to RGB/L beforehand if the model was trained on such files)", p)
        arr = np.asarray(im)
    return _hwc_to_cxy(arr, str(p))


def _read_nifti(p: Path) -> np.ndarray:
    """(1, x, y) from a 2D NIfTI (array axes as stored: i = x, j = y, like MONAI's NibabelReader)."""
    try:
        import nibabel as nib

        img = nib.load(str(p))
        check_pixel_count(int(np.prod(img.shape)), p, "x".join(map(str, img.shape)))
        arr = np.asanyarray(img.dataobj)
    except DataError as e:
        raise _runtime_error(e) from None
    except ImportError:
        try:
            import SimpleITK as sitk
        except ImportError:
            raise DeployError(f"{p}: reading NIfTI needs nibabel or SimpleITK (pip install nibabel)") from None
        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).T  # SimpleITK is (z, y, x): reverse to (x, y, z)
        except Exception as e:  # noqa: BLE001
            raise DeployError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - nibabel raises ImageFileError, OSError, EOFError…
        raise DeployError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DeployError(f"{p}: expected a 2D image, got a NIfTI array of shape {arr.shape} (3D volumes need a "
                          "ct3d model, whose manifest makes medsim.deploy read volumes)")
    return np.ascontiguousarray(arr[None], dtype=np.float32)


def _read_dicom(p: Path) -> np.ndarray:
    """(1, columns, rows) in [0, 1] from a single-frame grayscale DICOM: modality LUT (RescaleSlope/Intercept),
    VOI LUT or window, MONOCHROME1 inverted — as training's ``DicomReader(display=True)``."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise DeployError(f"{p}: reading DICOM needs pydicom >= 3 (pip install pydicom)") from None
    from medsim.data.dicom import check_pixels, read_dataset

    try:  # the data layer's reader and checks: no preamble, truncation, pixel limit, decoder present
        ds = read_dataset(p)
        check_pixels(ds, p)
    except DataError as e:
        raise _runtime_error(e) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        raise DeployError(f"{p}: {photometric} DICOM; gray2d models take grayscale (MONOCHROME1/2) images")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise DeployError(f"{p}: multi-frame DICOM ({frames} frames); give one frame as an array")
    try:
        raw = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing decoder plugins, truncated pixel data
        raise DeployError(f"{p}: DICOM pixel data could not be decoded ({type(e).__name__}: {e})") from e
    arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    if arr.ndim != 2:
        raise DeployError(f"{p}: expected one grayscale frame, got pixels of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DeployError(f"{p}: {int((~np.isfinite(arr)).sum())} pixels are NaN or infinite")
    arr = apply_window(arr, ds)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return np.ascontiguousarray(arr.T[None], dtype=np.float32)


def read_image(source: ImageSource, kind: str = "rgb2d") -> np.ndarray:
    """Load an image as MONAI's ``LoadImaged(..., ensure_channel_first=True)`` + ``EnsureTyped(float32)`` would.

    Args:
        source: a file (PNG/JPEG/BMP/TIFF… via PIL; DICOM and NIfTI for ``gray2d``), a NumPy array (H, W) or
            (H, W, C) in source units (0..255 for 8-bit), or a PIL image.
        kind: ``rgb2d`` or ``gray2d`` (decides which file formats are accepted; ``ct3d`` volumes are read by
            :func:`medsim.runtime.volume.read_volume`).

    Returns:
        float32 (C, x, y): channel-first, x = column, y = row (the transpose of (H, W, C)), values unscaled.

    Raises:
        DeployError: the file is missing or unreadable, a DICOM is not a single grayscale frame, or the array has
            an unusable shape.
    """
    if isinstance(source, np.ndarray):
        return _hwc_to_cxy(source, f"array of shape {source.shape}")
    if _PILImage is not None and isinstance(source, _PILImage.Image):
        return _hwc_to_cxy(np.asarray(source), f"PIL image ({source.mode}, {source.size[0]}x{source.size[1]})")
    if not isinstance(source, (str, os.PathLike)):
        raise DeployError(f"cannot read an image from a {type(source).__name__}; give a path, a NumPy array "
                          "(H, W[, C]) or a PIL image")
    p = Path(source)
    if p.is_dir():
        raise DeployError(f"{p}: a directory; 2D models take one image file (DICOM series are not supported)")
    if not p.is_file():
        raise DeployError(f"{p}: file not found")
    try:
        fmt = file_format(p)  # by content, as the data layer reads it
    except DataError as e:
        raise _runtime_error(e) from None
    if fmt == "nifti":
        return _read_nifti(p)
    if fmt == "dicom":
        if kind != "gray2d":
            raise DeployError(f"{p}: DICOM input to a {kind} model; {kind} models were trained on images read "
                              "with PIL (convert the DICOM to PNG first)")
        return _read_dicom(p)
    return _read_pil(p)


def _check_recipe(prep: dict[str, Any]) -> str:
    kind = str(prep.get("kind", "custom"))
    if kind not in KNOWN_STEPS:
        raise UnsupportedPreprocessing(f"manifest preprocessing kind '{kind}' is unknown to medsim.deploy "
                                       f"(supported: {', '.join(KNOWN_STEPS)}); preprocess the input yourself "
                                       "and use EmbeddingEngine.run")
    if not prep.get("steps"):  # guessing the steps would e.g. normalise a gray image by its own statistics
        raise UnsupportedPreprocessing(f"manifest {kind} preprocessing lists no 'steps'; re-export the run with "
                                       "`medsim export RUN --out DIR` (medsim writes them from the run's spec)")
    steps = [str(s) for s in prep["steps"]]
    unknown = [s for s in steps if s not in KNOWN_STEPS[kind]]
    if unknown:
        raise UnsupportedPreprocessing(f"manifest {kind} preprocessing has step(s) {unknown} that medsim.deploy "
                                       "does not reimplement; the input would differ from training")
    if kind != "ct3d" and ("Resized" in steps or "spatial_size" in prep):
        mode = str(prep.get("resize_mode", "area"))
        if mode != "area":
            raise UnsupportedPreprocessing(f"manifest resize_mode '{mode}': only 'area' is reimplemented")
        if not prep.get("spatial_size"):
            raise DeployError("manifest preprocessing has a Resized step but no spatial_size")
    return kind


def preprocess_with_size(source: ImageSource, manifest: dict[str, Any] | str | os.PathLike
                         ) -> tuple[np.ndarray, tuple[int, ...]]:
    """:func:`preprocess`, also returning the original image size ``(H, W)`` (rows, columns) — what
    :meth:`medsim.deploy.Localizer.localize` needs to map attention back onto the image — or, for ``ct3d``,
    the volume's original array shape (x, y, z)."""
    prep = _prep_section(manifest)
    kind = _check_recipe(prep)
    if kind == "ct3d":
        from medsim.runtime.volume import preprocess_volume  # lazy: SciPy / nibabel only for 3D models

        return preprocess_volume(source, prep)
    steps = [str(s) for s in prep["steps"]]
    img = read_image(source, kind)
    if kind == "rgb2d" and isinstance(source, np.ndarray) and np.issubdtype(source.dtype, np.floating) \
            and source.size and float(np.max(source)) <= 1.0:
        logger.warning("float array of shape %s with values <= 1 given to an rgb2d model: arrays are expected in "
                       "source units (0..255), as the model was trained on 8-bit images", source.shape)
    size_hw = (int(img.shape[2]), int(img.shape[1]))
    if kind == "rgb2d":
        img = to_rgb(img)
        if "ScaleIntensityRanged" in steps:
            img = scale_range(img, prep.get("scale") or RGB_SCALE)
    else:
        img = channel_max(img)
        if "ScaleIntensityd" in steps:
            img = scale_minmax(img, prep.get("scale"))
    if prep.get("spatial_size"):
        img = area_resize(img, prep["spatial_size"])
    if "NormalizeIntensityd" in steps:
        img = normalize_intensity(img, prep)
    if not np.isfinite(img).all():
        raise DeployError(f"{_describe(source)}: preprocessing produced NaN/inf values (a corrupt image?)")
    return np.ascontiguousarray(img, dtype=np.float32), size_hw


def preprocess(source: ImageSource, manifest: dict[str, Any] | str | os.PathLike) -> np.ndarray:
    """One image → the model input, as training's ``eval#preprocessing`` made it.

    Args:
        source: an image file, a NumPy array (H, W) / (H, W, C) in source units, or a PIL image.
        manifest: the export's manifest (dict) or its model directory / ``manifest.json`` path.

    Returns:
        float32 (C, x, y) — MONAI axis order (x = column) — or (1, x, y, z) for ``ct3d``, ready to stack into
        the model's batch.

    Raises:
        DeployError: unreadable input; UnsupportedPreprocessing: a kind or steps this module does not know.
    """
    return preprocess_with_size(source, manifest)[0]


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"array of shape {source.shape}"
    return type(source).__name__
