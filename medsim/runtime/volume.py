"""3D CT model input with NumPy + nibabel + SciPy (+ pydicom), as training's ``ct3d`` eval pipeline made it.

The steps of :func:`medsim.data.transforms.ct3d_transforms` (eval), one function each:

==========================  ===========================================================================================
MONAI transform             here
==========================  ===========================================================================================
LoadImaged                  :func:`read_volume`: NIfTI via nibabel (``img.affine``), DICOM series via
                            :func:`medsim.data.dicom.load_dicom` (the reader training used, torch-free) → (x, y, z), RAS
Orientationd("RAS")         :func:`reorient`: ``nibabel.orientations`` flip + transpose, affine @ ``inv_ornt_aff``
Spacingd(pixdim)            :func:`resample_to_spacing`: MONAI's output grid (zoom of the affine keeping its rotation;
                            shape from the transformed corners) and trilinear sampling at voxel centres with border
                            padding (``grid_sample(align_corners=False, padding_mode="border")`` ≡
                            ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``), float64 like MONAI
ScaleIntensityRanged        affine HU window to [0, 1], clipped (shared with 2D: ``transforms.scale_range``)
SpatialPadd + CenterCrop    :func:`pad_crop`: symmetric zero padding, then MONAI's centre (``size // 2 - roi // 2``)
==========================  ===========================================================================================

Differences from MONAI are float rounding only (≤ 1e-5 after the window, measured in the tests on the shared CT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import DataError, MedsimError
from medsim.files import check_pixel_count
from medsim.runtime.errors import DeployError
from medsim.runtime.transforms import scale_range

__all__ = ["read_volume", "reorient", "resample_to_spacing", "output_grid", "pad_crop", "scale_intensity",
           "preprocess_volume",
           "model_grid", "whole_grid", "label_to_grid", "NIFTI_SUFFIXES", "MAX_WHOLE_VOXELS"]

#: MONAI's tolerance for "this affine is unchanged" (monai.data.utils.AFFINE_TOL)
_AFFINE_TOL = 1e-3
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_volume(source: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A CT volume → (float32 (x, y, z), 4×4 RAS affine), like MONAI's ``LoadImage`` (Nibabel / medsim's DICOM
    reader). ``source``: a ``.nii``/``.nii.gz`` file, a DICOM series folder or one DICOM file of a series."""
    p = Path(source)
    if not p.exists():
        raise DeployError(f"{p}: file or folder not found")
    if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            import nibabel as nib
        except ImportError:
            raise DeployError(f"{p}: reading NIfTI needs nibabel (pip install nibabel)") from None
        try:
            img = nib.load(str(p))
            check_pixel_count(int(np.prod(img.shape)), p, "x".join(map(str, img.shape)))  # before decoding
            arr = np.asanyarray(img.dataobj).astype(np.float32)
            affine = np.array(img.affine, dtype=np.float64)
        except DataError as e:
            raise DeployError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - ImageFileError, EOFError, OSError…
            raise DeployError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
        while arr.ndim > 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
    else:
        from medsim.data.dicom import load_dicom

        try:
            arr, affine, _ = load_dicom(p, display=False)
        except MedsimError as e:
            raise DeployError(str(e)) from e
        arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise DeployError(f"{p}: a ct3d model takes a 3D volume, got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DeployError(f"{p}: {int((~np.isfinite(arr)).sum())} voxels are NaN or infinite")
    return arr, affine


def reorient(arr: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``Orientation(axcodes)``: flip and transpose (x, y, z) so the axes run along ``axcodes``."""
    from nibabel import orientations as ornt

    src = ornt.io_orientation(affine)
    spatial = ornt.ornt_transform(src, ornt.axcodes2ornt(axcodes[: arr.ndim]))
    new_affine = affine @ ornt.inv_ornt_aff(spatial, arr.shape)
    return np.ascontiguousarray(ornt.apply_orientation(arr, spatial)), new_affine


def _zoomed(affine: np.ndarray, pixdim: Sequence[float], diagonal: bool) -> np.ndarray:
    """The affine's rotation with new voxel sizes ``pixdim`` and no translation (shear dropped)."""
    d = affine.shape[0] - 1
    scale = np.asarray(pixdim, dtype=float)[:d]
    if diagonal:
        return np.diag(np.append(scale, 1.0))
    rzs = affine[:d, :d]
    upper = np.linalg.cholesky(rzs.T @ rzs).T  # rzs = rotation @ upper
    rotation = rzs @ np.linalg.inv(upper)
    out = np.eye(d + 1)
    out[:d, :d] = rotation @ np.diag(np.sign(np.diag(upper)) * np.abs(scale))
    return out


def output_grid(shape: Sequence[int], affine: np.ndarray, pixdim: Sequence[float], *, diagonal: bool = False
                ) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of MONAI ``Spacing(pixdim)``'s output for an input of ``shape`` with ``affine``.

    The input's corner voxel centres, mapped into the new voxel grid, span the output (rounded); the output is
    anchored at the input corner that is smallest in the new grid (else the two grids share their centre).
    """
    d = len(shape)
    target = _zoomed(affine, pixdim, diagonal)
    corners = np.array(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(d, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    in_new = np.linalg.solve(target, affine) @ corners
    out_shape = np.round(np.ptp(in_new[:d] / in_new[d], axis=1) + 1.0).astype(int)
    world = affine @ corners
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(in_new[:d] - in_new[:d, i:i + 1], axis=1), 0.0, rtol=_AFFINE_TOL):
            offset = world[:d, i]
            break
    if offset is None:
        offset = (affine[:d, :d] @ (np.asarray(shape, float) / 2.0) + affine[:d, d]
                  - target[:d, :d] @ (out_shape / 2.0))
    target[:d, d] = offset
    return tuple(int(v) for v in out_shape), target


def resample_to_spacing(arr: np.ndarray, affine: np.ndarray, pixdim: Sequence[float], *, diagonal: bool = False,
                        mode: str = "bilinear", padding_mode: str = "border") -> tuple[np.ndarray, np.ndarray]:
    """MONAI ``Spacing(pixdim)`` on a channel-less (x, y, z) array: trilinear at voxel centres, border padding."""
    from scipy import ndimage

    if mode not in ("bilinear", "nearest") or padding_mode != "border":
        raise DeployError(f"Spacing mode '{mode}' / padding '{padding_mode}' is not reimplemented in medsim.deploy "
                          "(only bilinear or nearest with border padding)")
    shape, new_affine = output_grid(arr.shape, affine, pixdim, diagonal=diagonal)
    xform = np.linalg.solve(affine, new_affine)  # output voxel → input voxel
    if np.allclose(xform, np.eye(4), atol=_AFFINE_TOL) and tuple(shape) == arr.shape:
        return arr.astype(np.float32, copy=False), affine  # MONAI leaves the image as it is
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = xform[:3, :3] @ grid + xform[:3, 3:4]
    if mode == "nearest":
        # grid_sample "nearest" rounds half to even; clamp like border padding
        coords = np.clip(np.rint(coords), 0, np.array(arr.shape)[:, None] - 1)
    out = ndimage.map_coordinates(arr.astype(np.float64), coords, order=1 if mode == "bilinear" else 0,
                                  mode="nearest")
    return out.reshape(shape).astype(np.float32), new_affine


def pad_crop(arr: np.ndarray, roi: Sequence[int], *, return_shift: bool = False
             ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """MONAI ``SpatialPad(roi, method="symmetric")`` (zeros) then ``CenterSpatialCrop(roi)`` on (x, y, z).
    ``return_shift``: also the (3,) voxel shift — output voxel ``o`` is input voxel ``o + shift``."""
    roi = [int(r) for r in roi]
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(arr.shape, roi)]
    if any(a or b for a, b in pads):
        arr = np.pad(arr, pads, mode="constant")
    starts = [max(n // 2 - r // 2, 0) for n, r in zip(arr.shape, roi)]
    out = np.ascontiguousarray(arr[tuple(slice(s, s + r) for s, r in zip(starts, roi))])
    if return_shift:
        return out, np.array([s - p[0] for s, p in zip(starts, pads)], dtype=np.float64)
    return out


def _shifted(affine: np.ndarray, shift: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = shift
    return affine @ t


def _to_grid(source: str | os.PathLike, prep: dict[str, Any], *, mode: str
             ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """Read, orient, resample (``mode``) and pad/crop: ``(array (x, y, z), original shape, 4×4 affine of the
    model grid)`` — the affine MONAI's MetaTensor carries after the same transforms."""
    if not isinstance(source, (str, os.PathLike)):
        raise DeployError(f"a ct3d model reads volumes from files (NIfTI or a DICOM series folder), not a "
                          f"{type(source).__name__}: the affine (orientation, spacing) is needed")
    for key in ("pixdim", "scale", "spatial_size"):
        if not prep.get(key):
            raise DeployError(f"manifest ct3d preprocessing has no '{key}' (re-export with this medsim version)")
    arr, affine = read_volume(source)
    original = tuple(int(v) for v in arr.shape)
    if prep.get("axcodes"):
        arr, affine = reorient(arr, affine, str(prep["axcodes"]))
    sp = prep.get("spacing") or {}
    if sp.get("align_corners") or sp.get("scale_extent"):
        raise DeployError("manifest Spacing with align_corners/scale_extent is not reimplemented in medsim.deploy")
    arr, affine = resample_to_spacing(arr, affine, prep["pixdim"], diagonal=bool(sp.get("diagonal", False)),
                                      mode=mode, padding_mode=str(sp.get("padding_mode", "border")))
    return arr, original, affine


def _model_input(source: str | os.PathLike, prep: dict[str, Any]
                 ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    arr, original, affine = _to_grid(source, prep, mode=str((prep.get("spacing") or {}).get("mode", "bilinear")))
    arr, shift = pad_crop(scale_intensity(arr, prep), prep["spatial_size"], return_shift=True)
    return arr.astype(np.float32, copy=False), original, _shifted(affine, shift)


def scale_intensity(arr: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """The manifest's intensity step: the HU window (``scale``), or with ``intensity.mode`` ``percentile`` the
    volume's own (lower, upper) percentiles → [0, 1], clipped, like MONAI ``ScaleIntensityRangePercentiles``
    (linear-interpolated percentiles; a constant volume → 0); ``auto`` takes the HU window when the volume has
    values below ``intensity.ct_below`` and the percentiles otherwise."""
    spec = prep.get("intensity") or {"mode": "hu"}
    mode = str(spec.get("mode", "hu"))
    if mode not in ("hu", "percentile", "auto"):
        raise DeployError(f"manifest ct3d intensity mode '{mode}' is unknown to medsim.deploy (hu, percentile, auto)")
    if mode == "hu" or (mode == "auto" and float(arr.min()) < float(spec.get("ct_below", -500.0))):
        return scale_range(arr, prep["scale"])
    lo, hi = (float(v) for v in spec.get("percentiles", (0.5, 99.5)))
    a_min, a_max = (float(v) for v in np.percentile(arr.astype(np.float64), [lo, hi]))
    b_min, b_max = (float(v) for v in spec.get("to", (0.0, 1.0)))
    if a_max == a_min:  # MONAI: a constant range maps to b_min
        return np.full(arr.shape, b_min, dtype=np.float32)
    out = (arr.astype(np.float64) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    return np.clip(out, b_min, b_max).astype(np.float32) if spec.get("clip", True) else out.astype(np.float32)


def preprocess_volume(source: str | os.PathLike, prep: dict[str, Any]) -> tuple[np.ndarray, tuple[int, ...]]:
    """A volume → the model input (1, *spatial_size) float32 and the volume's original (x, y, z) shape."""
    arr, original, _ = _model_input(source, prep)
    return np.ascontiguousarray(arr[None], dtype=np.float32), original


def model_grid(source: str | os.PathLike, prep: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The model input of a volume (x, y, z) float32 and the 4×4 affine (voxel → RAS mm) of that grid: what a
    mask or heatmap at the model's input resolution needs to sit on the original scan in any NIfTI viewer."""
    arr, _, affine = _model_input(source, prep)
    return arr, affine


#: a whole-volume model grid larger than this is refused (float32: 1 GiB for the input alone)
MAX_WHOLE_VOXELS = 256**3


def whole_grid(source: str | os.PathLike, prep: dict[str, Any], *, multiple: int, min_size: Sequence[int],
               max_voxels: int = MAX_WHOLE_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """The whole volume on the model grid, not the training crop: read, orient, resample and scale as
    :func:`model_grid`, then zero-pad at the far end of each axis to at least ``min_size`` and a multiple of
    ``multiple`` (an export's ``dynamic_spatial``). The padding leaves voxel 0 where it was, so the returned 4×4
    affine (voxel → RAS mm) is the resampled volume's own.

    Raises:
        DeployError: the grid would exceed ``max_voxels`` (the message names the file and the grid size).
    """
    arr, _, affine = _to_grid(source, prep, mode=str((prep.get("spacing") or {}).get("mode", "bilinear")))
    m = max(int(multiple), 1)
    want = [max(int(lo), n) for n, lo in zip(arr.shape, min_size)]
    want = [-(-n // m) * m for n in want]
    if int(np.prod(want)) > max_voxels:
        raise DeployError(f"{source}: the whole volume is {want} voxels on the model grid (spacing "
                          f"{list(prep['pixdim'])} mm), more than {max_voxels}; crop the scan to the region of "
                          "interest, or search the model's centre crop only (`medsim landmark --crop`)")
    arr = scale_intensity(arr, prep)
    arr = np.pad(arr, [(0, w - n) for w, n in zip(want, arr.shape)], mode="constant")
    return np.ascontiguousarray(arr, dtype=np.float32), affine


def label_to_grid(source: str | os.PathLike, prep: dict[str, Any]) -> np.ndarray:
    """A label map (NIfTI) on the model grid: the image's orientation / spacing / pad-crop with nearest-neighbour
    resampling, as training's ``ct3d_transforms(with_mask=True)`` did. Returns (x, y, z) int labels."""
    arr, _, _ = _to_grid(source, prep, mode="nearest")
    return np.rint(pad_crop(arr, prep["spatial_size"])).astype(np.int32)
