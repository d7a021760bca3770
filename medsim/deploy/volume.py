"""3D localization on a CT model's input grid; reading and resampling volumes is :mod:`medsim.runtime.volume`.

The runtime's names (``read_volume``, ``output_grid``, ``pad_crop``, ``model_grid``, ``label_to_grid``, …) are
re-exported here, so ``from medsim.deploy.volume import read_volume`` keeps working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.deploy.localizer import Localization, Localizer, box_hit, dice, iou, overlay, rgb_image
from medsim.errors import atomic_path, atomic_write_text
from medsim.runtime.errors import DeployError
from medsim.runtime.geometry import AttentionGeometry, geometry_from_manifest, resample_attention
from medsim.runtime.volume import (NIFTI_SUFFIXES, label_to_grid, model_grid, output_grid, pad_crop,
                                   preprocess_volume, read_volume, reorient, resample_to_spacing)

__all__ = ["read_volume", "reorient", "resample_to_spacing", "output_grid", "pad_crop", "preprocess_volume",
           "model_grid", "label_to_grid", "NIFTI_SUFFIXES", "trilinear_resize", "localize_grid", "localize_volumes"]


def trilinear_resize(a: np.ndarray, size: Sequence[int], geometry: AttentionGeometry | None = None) -> np.ndarray:
    """Trilinear resize of an (x, y, z) attention map to ``size``: each cell at its centre from ``geometry``
    (:class:`~medsim.runtime.geometry.AttentionGeometry`; linear between centres, edge values held outside them),
    or stretched over the volume when ``None`` (``align_corners=False`` with edge clamping, PyTorch's
    ``interpolate(mode="trilinear")``); ``medsim.nn.upsample_attention`` with the same geometry. Returns float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3 or len(size) != 3:
        raise DeployError(f"trilinear_resize expects a 3D array and a 3D size, got {a.shape} → {tuple(size)}")
    return resample_attention(a, size, geometry)


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(arr, affine), str(tmp))


def _display_slice(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of an (x, y, z) RAS volume in radiological display: rows anterior → posterior, columns
    patient right → left (the viewer sees the patient from the feet)."""
    return volume[::-1, ::-1, z].T


def localize_volumes(engine: Any, volumes: Sequence[Path], out: Path, localizer: Localizer, *,
                     names: Sequence[str], masks: Sequence[str | os.PathLike | None] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """3D counterpart of :func:`medsim.deploy.tasks.localize_images` (which opens ``engine``, an
    :class:`~medsim.deploy.EmbeddingEngine` of a ct3d export, and summarises the rows returned here), on the model
    grid (RAS, training spacing, ``spatial_size``): per volume (``<stem>``: its name in ``names``, an opaque case
    token, :func:`medsim.deploy.tasks.case_names`) ``<stem>_mask.nii.gz`` (uint8), ``<stem>_heatmap.nii.gz``
    (float32), both with the grid's affine so they overlay the original scan in world coordinates;
    ``<stem>_boxes.json`` (voxel boxes ``x0..z1`` on the grid, x1/y1/z1 exclusive, plus their RAS mm corners);
    ``<stem>_overlay.png`` (the axial slice through the heat peak, radiological display). Ground-truth label maps
    (> 0 = lesion) are put on the same grid with nearest-neighbour resampling and scored with Dice, IoU, pointing
    game and box hit (a box holding the lesion centroid or with 3D IoU ≥ 0.5 against its bounding box).

    Returns:
        one row per volume: ``image`` (its name), ``boxes``, ``overlay_slice`` and, with a non-empty label map,
        ``dice``, ``iou``, ``pointing``, ``box_hit`` (``empty_mask`` for an empty one).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from medsim.viz.contact_sheet import save_png

    manifest = engine.manifest
    prep = manifest["preprocessing"]
    geometry = geometry_from_manifest(manifest, where=str(engine.model_dir))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, vol in enumerate(tqdm(volumes, desc="localizing", unit="volume", disable=not progress, leave=False)):
        grid, affine = model_grid(vol, prep)
        att = engine.run(grid[None, None])["attention"][0, 0]
        loc = localize_grid(localizer, att, grid.shape, geometry)
        stem = names[i]
        _save_nifti(loc.mask.astype(np.uint8), affine, out / f"{stem}_mask.nii.gz")
        _save_nifti(loc.heatmap.astype(np.float32), affine, out / f"{stem}_heatmap.nii.gz")
        for b in loc.boxes:
            lo = affine @ np.array([b["x0"], b["y0"], b["z0"], 1.0])
            hi = affine @ np.array([b["x1"] - 1, b["y1"] - 1, b["z1"] - 1, 1.0])
            b["ras_mm"] = {"min": np.minimum(lo, hi)[:3].round(2).tolist(),
                           "max": np.maximum(lo, hi)[:3].round(2).tolist()}
        doc = {"grid_shape": list(grid.shape), "affine": affine.round(6).tolist(), "threshold": loc.threshold,
               "box_convention": "voxels of the model grid (x, y, z = RAS axes); x0/y0/z0 inclusive, x1/y1/z1 "
                                 "exclusive; ras_mm: world corners of the first and last voxel centres",
               "boxes": loc.boxes}
        atomic_write_text(out / f"{stem}_boxes.json", json.dumps(doc, indent=2) + "\n")
        z = int(np.unravel_index(int(np.argmax(loc.heatmap)), loc.heatmap.shape)[2])
        X, Y = grid.shape[:2]
        flat = [{"x0": X - b["x1"], "x1": X - b["x0"], "y0": Y - b["y1"], "y1": Y - b["y0"]}
                for b in loc.boxes if b["z0"] <= z < b["z1"]]
        sl = Localization(heatmap=_display_slice(loc.heatmap, z), mask=_display_slice(loc.mask, z), boxes=flat)
        bg = rgb_image(_display_slice(grid, z).clip(0, 1), sl.heatmap.shape)
        save_png(Image.fromarray(overlay(sl, bg)), out / f"{stem}_overlay.png")
        row: dict[str, Any] = {"image": stem, "boxes": len(loc.boxes), "overlay_slice": z}
        if masks is not None and masks[i] is not None:
            gt = label_to_grid(masks[i], prep) > 0
            if gt.shape != loc.mask.shape:
                raise DeployError(f"{masks[i]}: on the model grid the label map is {gt.shape}, the volume "
                                  f"{loc.mask.shape}: is it the label map of {vol}?")
            if not gt.any():
                row["empty_mask"] = True
            else:
                peak = np.unravel_index(int(np.argmax(loc.heatmap)), gt.shape)
                row.update(dice=dice(loc.mask, gt), iou=iou(loc.mask, gt), pointing=float(gt[peak]),
                           box_hit=float(box_hit(loc.boxes, gt)))
        rows.append(row)
    return rows


def localize_grid(localizer: Localizer, attention: np.ndarray, shape: Sequence[int],
                  geometry: AttentionGeometry | None = None) -> Localization:
    """Attention (x, y, z) at feature resolution → Localization on the grid (26-connected components); the cells
    placed by ``geometry`` (the model grid is the model input, so its size is the geometry's ``input_size``)."""
    if not np.isfinite(attention).all():
        raise DeployError("attention map contains NaN/inf values")
    heat = localizer.normalized(trilinear_resize(attention, shape, geometry))
    mask, boxes, t = localizer.components(heat)
    return Localization(heatmap=heat, mask=mask, boxes=boxes, threshold=t)
