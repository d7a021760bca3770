"""Weakly supervised lesion localization from the model's attention map: heatmap → mask → boxes, files, metrics.

Axis order — the one thing to get right. The model's ``attention`` output is (1, h, w) in MONAI order, i.e.
(1, x, y) with x the image *column*; images, masks and heatmaps here are NumPy/PIL (H, W) row-major. So the map
is transposed (``attention[0].T``: (y, x) = (rows, columns)) *before* it is upsampled to the image size.

Pipeline of :meth:`Localizer.localize`:

1. each cell placed at its receptive-field centre on the image (``geometry``: the model's
   :class:`~medsim.deploy.geometry.AttentionGeometry`, the export manifest's ``attention_geometry``), bilinear
   between cell centres, the edge cell's value held outside them (:func:`medsim.deploy.geometry.resample_attention`,
   the same weights as ``medsim.nn.upsample_attention(..., geometry)``), then transposed to (rows, columns).
   Without a geometry the grid is stretched over the whole image (``align_corners=False``, as
   ``torch.nn.functional.interpolate(mode="bilinear")``) — right for maps at input resolution (Grad-CAM), wrong
   for patch grids whose centres do not span the image (loss-based attention: 13–76 %);
2. optional min–max normalisation to [0, 1] (``normalize=True``; a constant map becomes all zeros);
3. threshold: Otsu's (between-class variance over a 256-bin histogram) or a fixed float in [0, 1];
4. connected components (8-connectivity); components smaller than ``min_area`` pixels are dropped (from the
   mask too);
5. one box per component, ``score`` = mean heat inside it (``peak`` = max), sorted by score, best first.

Boxes are pixel coordinates ``x0, y0`` inclusive and ``x1, y1`` exclusive (``mask[y0:y1, x0:x1]`` is the box),
x along columns, y along rows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.runtime.errors import DeployError
from medsim.runtime.geometry import AttentionGeometry, resample_attention

__all__ = ["Localizer", "Localization", "bilinear_resize", "otsu_threshold", "dice", "iou", "pointing_game",
           "box_hit", "mask_box", "box_iou", "patch_counts", "match_boxes", "average_precision", "jet", "overlay",
           "rgb_image"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- helpers
def bilinear_resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D array (rows, cols) → ``size`` (H, W), ``align_corners=False`` (PyTorch's
    ``interpolate(mode="bilinear")`` without antialiasing). Returns float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise DeployError(f"bilinear_resize expects a 2D array, got shape {a.shape}")
    H, W = int(size[0]), int(size[1])
    if H < 1 or W < 1:
        raise DeployError(f"image size must be positive (H, W), got {tuple(size)}")
    return resample_attention(a, (H, W))  # the stretched placement: align_corners=False, edges clamped


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (``skimage.filters.threshold_otsu``, a medsim dependency that needs no torch);
    foreground is ``values > threshold``. Non-finite values are ignored; a constant input returns its value."""
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise DeployError("otsu_threshold: no finite values in the attention map")
    return float(threshold_otsu(v, nbins=bins)) if v.min() < v.max() else float(v.min())


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the True pixels of a 2D mask, or None if empty."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.any(m, axis=1), np.any(m, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def _as_xyxy(box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, dict):
        return float(box["x0"]), float(box["y0"]), float(box["x1"]), float(box["y1"])
    x0, y0, x1, y1 = box
    return float(x0), float(y0), float(x1), float(y1)


def box_iou(a: Any, b: Any) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)`` or ``{"x0", ...}`` dicts (exclusive x1, y1: areas in pixels)."""
    ax0, ay0, ax1, ay1 = _as_xyxy(a)
    bx0, by0, bx1, by1 = _as_xyxy(b)
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _gt(gt: np.ndarray, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    g = np.asarray(gt)
    if g.dtype == bool and shape is not None and g.shape == shape:  # e.g. a 3D mask on a volume's grid
        return g
    if g.ndim == 3 and g.shape[-1] in (1, 3, 4):  # RGB(A) masks read with PIL
        g = g[..., : min(3, g.shape[-1])].max(axis=-1)
    if g.ndim != 2:
        raise DeployError(f"{what}: ground-truth mask must be 2D (H, W), got shape {g.shape}")
    if shape is not None and g.shape != shape:
        raise DeployError(f"{what}: shapes differ: prediction {shape} vs ground truth {g.shape} (both (H, W))")
    return g > (127 if g.dtype == np.uint8 and g.max() > 1 else 0)


# ---------------------------------------------------------------------------------------------------- metrics
def dice(mask: np.ndarray, gt: np.ndarray) -> float:
    """Dice ``2|A∩B| / (|A| + |B|)`` of two (H, W) masks (gt may be 0/255 uint8); 1.0 when both are empty."""
    m = np.asarray(mask, dtype=bool)
    g = _gt(gt, m.shape, "dice")
    total = int(m.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int((m & g).sum()) / total


def iou(mask: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard ``|A∩B| / |A∪B|`` of two (H, W) masks; 1.0 when both are empty."""
    m = np.asarray(mask, dtype=bool)
    g = _gt(gt, m.shape, "iou")
    union = int((m | g).sum())
    return 1.0 if union == 0 else int((m & g).sum()) / union


def pointing_game(heatmap: np.ndarray, gt: np.ndarray, *, tolerance: int = 0) -> bool:
    """Pointing game: is the heatmap's maximum inside the lesion?

    The point is ``np.argmax`` (the first maximum in row-major order when several pixels tie); a hit when the gt
    mask has a foreground pixel within ``tolerance`` pixels (Euclidean) of it (0: the pixel itself).

    Raises:
        DeployError: shapes differ or the gt mask is empty (the game is undefined without a lesion).
    """
    h = np.asarray(heatmap, dtype=np.float64)
    g = _gt(gt, h.shape, "pointing_game")
    if not g.any():
        raise DeployError("pointing_game: the ground-truth mask is empty")
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    if tolerance <= 0:
        return bool(g[r, c])
    rr, cc = np.nonzero(g)
    return bool(np.min((rr - r) ** 2 + (cc - c) ** 2) <= tolerance ** 2)


def _box_extent(box: Any, ndim: int) -> list[tuple[float, float]]:
    """A box's [lo, hi) per array axis: 2D boxes are x = column, y = row; 3D boxes x, y, z along axes 0, 1, 2."""
    if ndim == 2:
        x0, y0, x1, y1 = _as_xyxy(box)
        return [(y0, y1), (x0, x1)]
    return [(float(box[f"{a}0"]), float(box[f"{a}1"])) for a in "xyz"]


def box_hit(boxes: Sequence[Any], gt: np.ndarray, *, iou_threshold: float = 0.5, centroid: bool = True) -> bool:
    """Is the lesion found by a box?

    Rule: a hit when **any** predicted box has IoU >= ``iou_threshold`` with the bounding box of the gt mask
    (all its foreground pixels, one box), **or** — with ``centroid=True`` — any predicted box contains the gt
    mask's centroid (mean foreground pixel position, in pixel-centre coordinates: pixel (r, c) covers
    [c, c + 1) × [r, r + 1) and its centre is (c + 0.5, r + 0.5)). No boxes: no hit. ``gt`` may also be a 3D
    boolean mask (x, y, z) with boxes ``x0, y0, z0, x1, y1, z1`` (as :meth:`Localizer.components` gives).

    Raises:
        DeployError: the gt mask is empty.
    """
    g = np.asarray(gt, dtype=bool) if np.asarray(gt).ndim == 3 and np.asarray(gt).dtype == bool else \
        _gt(gt, None, "box_hit")
    idx = np.nonzero(g)
    if not idx[0].size:
        raise DeployError("box_hit: the ground-truth mask is empty")
    centre = [float(v.mean()) + 0.5 for v in idx]
    gbox = [(float(v.min()), float(v.max()) + 1.0) for v in idx]
    gvol = np.prod([hi - lo for lo, hi in gbox])
    for b in boxes:
        ext = _box_extent(b, g.ndim)
        inter = np.prod([max(0.0, min(h1, h2) - max(l1, l2)) for (l1, h1), (l2, h2) in zip(ext, gbox)])
        union = np.prod([hi - lo for lo, hi in ext]) + gvol - inter
        if union > 0 and inter / union >= iou_threshold:
            return True
        if centroid and all(lo <= c < hi for (lo, hi), c in zip(ext, centre)):
            return True
    return False


def patch_counts(attention: np.ndarray, gt: np.ndarray, *, threshold: str | float = "otsu",
                 min_fraction: float = 0.5, geometry: AttentionGeometry | None = None) -> tuple[int, int, int]:
    """Patch-level selection counts ``(tp, fp, fn)`` in the style of loss-based attention (Shi et al., patch
    precision / recall): the image is cut into the attention grid's cells; a cell is a lesion patch when at least
    ``min_fraction`` of its pixels are lesion; a cell is *selected* when its (min–max normalised) attention exceeds
    ``threshold`` (``"otsu"`` over the cells, or a float in [0, 1]).

    Args:
        attention: (1, x, y) or (x, y) — MONAI order, as the model outputs it — at feature resolution.
        gt: (H, W) lesion mask of the image.
        geometry: where the cells sit (:class:`~medsim.deploy.geometry.AttentionGeometry`). A cell owns the image
            pixels nearer to its centre than to its neighbours' (boundaries halfway between centres; the edge cells
            reach the image border). ``None``: the stretched grid, cell ``(i, j)`` of an (h, w) grid covers rows
            ``floor(i·H/h) .. floor((i+1)·H/h) - 1`` and likewise columns.
    """
    a = np.asarray(attention, dtype=np.float64)
    a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
    if a.ndim != 2:
        raise DeployError(f"attention must be (1, x, y) or (x, y), got shape {a.shape}")
    cells = a.T  # (x, y) → (rows, cols)
    g = _gt(gt, None, "patch_counts")
    h, w = cells.shape
    H, W = g.shape
    if geometry is None:
        ys, xs = (np.arange(h + 1) * H) // h, (np.arange(w + 1) * W) // w
    else:
        geometry.check_grid(a.shape)
        ys, xs = (_cell_bounds(ax, n_in, n) for ax, n_in, n in
                  zip(reversed(geometry.axes), reversed(geometry.input_size), (H, W)))
    frac = np.array([[g[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() if ys[i + 1] > ys[i] and xs[j + 1] > xs[j] else 0.0
                      for j in range(w)] for i in range(h)])
    lo, hi = float(cells.min()), float(cells.max())
    norm = (cells - lo) / (hi - lo) if hi > lo else np.zeros_like(cells)
    t = otsu_threshold(norm) if threshold == "otsu" else float(threshold)
    sel, pos = norm > t, frac >= min_fraction
    return int((sel & pos).sum()), int((sel & ~pos).sum()), int((~sel & pos).sum())


def _cell_bounds(axis: Any, input_size: int, n_out: int) -> np.ndarray:
    """(cells + 1,) pixel bounds of the cells of ``axis`` on ``n_out`` image pixels: halfway between centres, a
    pixel belongs to the cell whose centre is nearest to the pixel's centre; the edge cells reach the border."""
    mids = (axis.centres()[:-1] + axis.stride / 2.0) * (n_out / input_size)  # in image pixels, continuous
    inner = np.clip(np.ceil(mids - 0.5), 0, n_out).astype(int)  # first pixel whose centre is past the midpoint
    return np.concatenate([[0], inner, [n_out]])


def match_boxes(boxes: Sequence[Any], gt_boxes: Sequence[Any], *, iou_threshold: float = 0.5) -> list[bool]:
    """PASCAL-VOC matching for one image: boxes (already sorted best first) → True where the box takes a
    not-yet-matched ground-truth box with IoU >= ``iou_threshold`` (each gt box matches at most once)."""
    taken = [False] * len(gt_boxes)
    out = []
    for b in boxes:
        ious = [box_iou(b, g) if not taken[k] else -1.0 for k, g in enumerate(gt_boxes)]
        k = int(np.argmax(ious)) if ious else -1
        hit = k >= 0 and ious[k] >= iou_threshold
        if hit:
            taken[k] = True
        out.append(bool(hit))
    return out


def average_precision(scores: Sequence[float], is_tp: Sequence[bool], n_gt: int) -> float:
    """Detection AP (all-point interpolated area under precision–recall, as PASCAL VOC ≥ 2010 / COCO per IoU):
    detections pooled over images, ranked by ``scores``; recall is over ``n_gt`` ground-truth boxes, so missed
    lesions count. 0.0 when there are no detections; ValueError when ``n_gt`` < 1."""
    if n_gt < 1:
        raise ValueError(f"average_precision needs at least one ground-truth box, got n_gt={n_gt}")
    if len(scores) != len(is_tp):
        raise ValueError(f"{len(scores)} scores but {len(is_tp)} match flags")
    if not len(scores):
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_tp, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    # precision envelope (monotone non-increasing from the right), then sum over recall steps
    env = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * env))


# --------------------------------------------------------------------------------------------------- overlays
def jet(v: np.ndarray) -> np.ndarray:
    """Matplotlib-like 'jet' colormap of values in [0, 1]: (...,) → (..., 3) uint8."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def rgb_image(image: Any, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 background: a path / array / PIL image, or the gray heatmap size when None."""
    from PIL import Image

    if image is None:
        return np.full((*size, 3), 96, dtype=np.uint8)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise DeployError(f"{image}: cannot be read for the overlay ({type(e).__name__}: {e})") from e
    elif isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.dtype != np.uint8:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            scale = 255.0 if hi <= 1.0 and lo >= 0.0 else (255.0 / (hi - lo) if hi > lo else 0.0)
            arr = ((arr - (0.0 if hi <= 1.0 and lo >= 0.0 else lo)) * scale).clip(0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DeployError(f"overlay image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[:2] != tuple(size):
        raise DeployError(f"overlay image is {arr.shape[0]}x{arr.shape[1]} (H x W) but the localization is "
                          f"{size[0]}x{size[1]}: localize with image_size=(H, W) of this image")
    return arr


def overlay(loc: "Localization", image: Any = None, *, alpha: float = 0.5, box_color: tuple[int, int, int] =
            (0, 255, 0)) -> np.ndarray:
    """(H, W, 3) uint8: the jet-coloured heatmap blended over ``image`` (weight ``alpha * heat``: cold areas
    show the image), box outlines drawn on top."""
    from PIL import Image, ImageDraw

    base = rgb_image(image, loc.heatmap.shape).astype(np.float64)
    w = (alpha * loc.heatmap)[..., None]
    out = (base * (1.0 - w) + jet(loc.heatmap).astype(np.float64) * w).round().clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for b in loc.boxes:
        draw.rectangle([b["x0"], b["y0"], b["x1"] - 1, b["y1"] - 1], outline=box_color, width=1)
    return np.asarray(pil)


# -------------------------------------------------------------------------------------------------- localizer
@dataclass
class Localization:
    """Where the model looked, at image resolution.

    Attributes:
        heatmap: (H, W) float32 in [0, 1], row-major like the image.
        mask: (H, W) bool, ``heatmap > threshold`` without components under ``min_area``.
        boxes: ``[{"x0", "y0", "x1", "y1", "score", "peak", "area"}]`` sorted by ``score`` (mean heat),
            best first; x1/y1 exclusive.
        threshold: the threshold applied (Otsu's value when ``threshold="otsu"``).
    """

    heatmap: np.ndarray
    mask: np.ndarray
    boxes: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = 0.0

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.heatmap.shape[0]), int(self.heatmap.shape[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {"image_size": list(self.image_size), "threshold": float(self.threshold),
                "box_convention": "pixels; x = column, y = row; x0/y0 inclusive, x1/y1 exclusive",
                "boxes": self.boxes}


class Localizer:
    """Attention map → :class:`Localization` (heatmap, mask, boxes) at the image's resolution.

    Args:
        threshold: ``"otsu"`` or a float in [0, 1] applied to the (normalised) heatmap; foreground is
            ``heat > threshold``.
        min_area: components with fewer pixels (at image resolution) are dropped.
        normalize: min–max normalise the upsampled map to [0, 1] (the attention is a sigmoid, often in a narrow
            band); ``False`` keeps the raw attention values (clipped to [0, 1]).
        max_boxes: keep at most this many boxes (best scores); ``None``: all.
        score: ``"mean"`` (default) or ``"max"`` heat inside a component, used for sorting.

    Raises:
        DeployError: invalid arguments (naming the value).
    """

    def __init__(self, threshold: str | float = "otsu", *, min_area: int = 16, normalize: bool = True,
                 max_boxes: int | None = None, score: str = "mean"):
        if isinstance(threshold, str):
            if threshold != "otsu":
                raise DeployError(f"threshold must be 'otsu' or a number in [0, 1], got '{threshold}'")
        elif not (isinstance(threshold, (int, float, np.floating)) and 0.0 <= float(threshold) <= 1.0):
            raise DeployError(f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}")
        if int(min_area) < 0:
            raise DeployError(f"min_area must be >= 0, got {min_area}")
        if score not in ("mean", "max"):
            raise DeployError(f"score must be 'mean' or 'max', got '{score}'")
        if max_boxes is not None and int(max_boxes) < 1:
            raise DeployError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        self.threshold = threshold if isinstance(threshold, str) else float(threshold)
        self.min_area, self.normalize, self.score = int(min_area), bool(normalize), score
        self.max_boxes = None if max_boxes is None else int(max_boxes)

    def heatmap(self, attention: np.ndarray, image_size: Sequence[int],
                geometry: AttentionGeometry | None = None) -> np.ndarray:
        """Attention (1, x, y) — MONAI order, as the model outputs it — or (x, y) → heatmap (H, W) float32 in
        [0, 1], row-major, for an image of ``image_size = (H, W)``; each cell at its centre from ``geometry``
        (``None``: stretched over the image, see the module docstring)."""
        a = np.asarray(attention, dtype=np.float64)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise DeployError(f"attention must be (1, x, y) or (x, y) for one 2D image, got shape {a.shape} "
                              "(pass attention[i] of a batch)")
        if not np.isfinite(a).all():
            raise DeployError("attention map contains NaN/inf values")
        size = tuple(int(v) for v in np.asarray(image_size).ravel()[:2])
        if len(size) != 2:
            raise DeployError(f"image_size must be (H, W), got {image_size!r}")
        heat = resample_attention(a, size[::-1], geometry).T  # on the (x, y) = (W, H) image, then (rows, cols)
        return self.normalized(heat)

    def localize(self, attention: np.ndarray, image_size: Sequence[int],
                 geometry: AttentionGeometry | None = None) -> Localization:
        """Attention (1, x, y) of one image → :class:`Localization` at ``image_size = (H, W)`` (rows, columns:
        ``engine.embed(..., return_sizes=True)["image_size"][i]`` or ``np.asarray(image).shape[:2]``); ``geometry``
        places the cells (the manifest's ``attention_geometry``, :func:`medsim.deploy.geometry.geometry_from_manifest`)."""
        heat = self.heatmap(attention, image_size, geometry)
        mask, boxes, t = self.components(heat)
        return Localization(heatmap=heat, mask=mask, boxes=boxes, threshold=t)

    def components(self, heat: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], float]:
        """Threshold a heatmap in [0, 1] — 2D (H, W) or 3D (x, y, z) — and box its connected components (8- /
        26-connected); components under ``min_area`` pixels/voxels are dropped from the mask too.

        Returns:
            ``(mask, boxes, threshold)``: boxes sorted by score, best first, at most ``max_boxes``. 2D boxes are
            ``x0, y0, x1, y1`` with x along columns and ``area``; 3D boxes ``x0, y0, z0, x1, y1, z1`` along the
            array's axes and ``volume_voxels``; both with ``score`` and ``peak``; upper bounds exclusive.
        """
        from scipy import ndimage

        t = otsu_threshold(heat) if self.threshold == "otsu" else float(self.threshold)
        labels, n = ndimage.label(heat > t, structure=np.ones((3,) * heat.ndim, dtype=bool))
        size_key = "area" if heat.ndim == 2 else "volume_voxels"
        found: list[tuple[int, dict[str, Any]]] = []
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            comp = labels[sl] == i
            area = int(comp.sum())
            if area < self.min_area:
                continue
            vals = heat[sl][comp]
            if heat.ndim == 2:  # rows, columns → x = column
                box = {"x0": sl[1].start, "y0": sl[0].start, "x1": sl[1].stop, "y1": sl[0].stop}
            else:
                box = {f"{a}{e}": getattr(sl[j], "start" if e == 0 else "stop")
                       for e in (0, 1) for j, a in enumerate("xyz")}
            box = {k: int(v) for k, v in box.items()}
            box.update(score=float(vals.mean() if self.score == "mean" else vals.max()), peak=float(vals.max()),
                       **{size_key: area})
            found.append((i, box))
        found.sort(key=lambda f: (-f[1]["score"], -f[1][size_key]))
        found = found[: self.max_boxes] if self.max_boxes is not None else found
        mask = np.isin(labels, [i for i, _ in found]) if found else np.zeros(heat.shape, dtype=bool)
        if n and not found:
            logger.debug("all %d component(s) are smaller than min_area=%d", n, self.min_area)
        return mask, [b for _, b in found], float(t)

    def normalized(self, heat: np.ndarray) -> np.ndarray:
        """A heatmap min–max normalised to [0, 1] (``normalize=False``: clipped to [0, 1]), float32."""
        if self.normalize:
            lo, hi = float(heat.min()), float(heat.max())
            heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        return np.clip(heat, 0.0, 1.0).astype(np.float32)

    def save(self, loc: Localization, out_dir: str | os.PathLike, stem: str, *, image: Any = None,
             alpha: float = 0.5) -> dict[str, Path]:
        """Write ``{stem}_mask.png`` (0/255 L), ``{stem}_boxes.json`` (:meth:`Localization.to_dict`) and
        ``{stem}_overlay.png`` (heatmap over ``image`` — a path, (H, W[, C]) array or PIL image of the
        localization's size; a gray background when None — with box outlines) into ``out_dir``.

        Returns:
            ``{"mask", "boxes", "overlay"}`` → paths. Files are written atomically (temporary name + rename).
        """
        from PIL import Image

        from medsim.errors import atomic_path, atomic_write_text

        if not stem or any(c in stem for c in "/\\") or stem in (".", ".."):
            raise DeployError(f"stem must be a plain file name part, got {stem!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"mask": out / f"{stem}_mask.png", "boxes": out / f"{stem}_boxes.json",
                 "overlay": out / f"{stem}_overlay.png"}
        over = overlay(loc, image, alpha=alpha)

        def png(arr: np.ndarray, path: Path) -> None:
            with atomic_path(path, suffix=".png") as tmp:
                Image.fromarray(arr).save(tmp)

        png(loc.mask.astype(np.uint8) * 255, paths["mask"])
        png(over, paths["overlay"])
        atomic_write_text(paths["boxes"], json.dumps(loc.to_dict(), indent=2) + "\n")
        logger.debug("localization of %s written to %s", stem, out)
        return paths
