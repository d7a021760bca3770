"""Two overlapping 3-D crops of one volume with known voxel correspondence, for pixel-wise contrastive learning.

SAM (Yan et al., "SAM: Self-supervised learning of pixel-wise anatomical embeddings in radiological images",
IEEE TMI 2022) trains on two augmented crops of the same unlabelled volume: the spatial transforms are known, so
every voxel of the overlap has an exact partner in the other crop, and those pairs are the positives.

:func:`sam_view_transforms` returns one MONAI ``Compose``:

1. the deterministic loading of the eval pipeline (:func:`medsim.data.transforms.volume_loading`: RAS, resampling
   to ``pixdim`` mm, HU window for CT or percentile scaling for MR) — the cache boundary of a ``CacheDataset``;
2. :class:`PairedCrops3Dd`: view 0 is an axis-aligned ``roi_size`` crop of the volume; view 1 is a ``roi_size``
   crop of another, overlapping box rescaled by a random factor ``s`` per axis (trilinear); ``P`` positive
   points are drawn in the overlap, ``pos_0`` (P, 3) in view 0's voxel coordinates and ``pos_1`` (P, 3) the same
   anatomical points in view 1's;
3. per view, its own random intensity chain (contrast, scale, shift, noise);
4. :class:`~medsim.data.views.GatherViewsd`: ``"views": [view_0, view_1]``, each (C, *roi_size).

Coordinates are voxel *indices* (voxel ``k`` is centred at ``k``) in MONAI axis order (x, y, z) of the view
tensors, as floats. With the volume's resampled grid ``V`` (the ``pixdim`` grid after RAS orientation), view 0's
voxel ``i`` is ``V[o + i]`` (``o`` an integer origin: an exact crop) and view 1's voxel ``j`` is the trilinear
value of ``V`` at ``c + (j - (roi - 1) / 2) / s`` (``c`` the centre of its box): ``s > 1`` zooms in. So
``pos_1 = (o + pos_0 - c) · s + (roi - 1) / 2`` exactly. ``pos_0`` are integer voxels of view 0 inside the
overlap of both boxes and at least one view-1 voxel inside the volume (so view 1's trilinear neighbours of
``pos_1`` are volume, not padding); both lie inside their views.

``monai.data.DataLoader`` collates ``pos_0`` / ``pos_1`` into (B, P, 3); :func:`medsim.engines.views_prepare_batch`
passes them to the loss as ``target["pos_0"]`` / ``target["pos_1"]`` (:class:`medsim.ssl.SAMLoss`).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

from medsim.data.views import VIEWS_KEY, GatherViewsd
from medsim.preprocessing import CT_PIXDIM, HU_WINDOW

__all__ = ["PairedCrops3Dd", "sam_view_transforms", "seeded_copy", "crop_box", "sample_volume"]


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear values of ``volume`` (C, X, Y, Z) at continuous voxel-index ``points`` (..., 3) in (x, y, z) order
    (voxel k centred at k); outside the volume the values fade to zero (``grid_sample`` zero padding).

    Returns (C, ...) of the points' shape.
    """
    sizes = torch.tensor(volume.shape[1:], dtype=points.dtype, device=points.device)
    norm = 2 * points / (sizes - 1).clamp_min(1) - 1  # align_corners=True: index 0 -> -1, n-1 -> +1
    grid = norm.flip(-1).reshape(1, 1, 1, -1, 3)  # grid_sample reads (w, h, d) = (z, y, x)
    out = F.grid_sample(volume[None].to(points.dtype), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out.reshape(volume.shape[0], *points.shape[:-1])


def crop_box(volume: torch.Tensor, centre: Sequence[float], scale: Sequence[float],
             roi_size: Sequence[int]) -> torch.Tensor:
    """The ``roi_size`` view of ``volume`` (C, X, Y, Z) whose voxel ``j`` is the trilinear value at volume index
    ``centre + (j - (roi_size - 1) / 2) / scale`` (per axis); zeros outside the volume. Returns (C, *roi_size)."""
    axes = [torch.as_tensor(float(c), dtype=torch.float64) + (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)
            / float(s) for c, s, n in zip(centre, scale, roi_size)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return sample_volume(volume.double(), points).to(volume.dtype if volume.is_floating_point() else torch.float32)


class PairedCrops3Dd(Randomizable, MapTransform):
    """Two overlapping ``roi_size`` crops of ``data[key]`` (C, X, Y, Z), the second rescaled, plus ``n_points``
    positive point pairs (see the module docstring for the coordinate rule).

    Args:
        keys: the volume's key (one).
        roi_size: spatial size of both views (voxels).
        scale_range: (min, max) zoom of view 1 relative to the volume, drawn log-uniformly (``s > 1``: view 1 covers
            a smaller box, magnified); per axis unless ``isotropic``.
        max_shift: the centre of view 1's box is view 0's centre moved by up to ``max_shift · roi_size`` voxels
            per axis (uniform); with ``max_shift <= 0.4`` and ``scale_range[1] <= 1.6`` the boxes always overlap.
        n_points: P, positive pairs per item.
        names: keys the two views are written to (the volume key is kept; :class:`GatherViewsd` drops it).
        pos_keys: keys of the (P, 3) point coordinates of view 0 and view 1.
        scale_key: when set, also write view 1's zoom ``s`` (3,) under this key: with it the whole crop transform
            is known, ``x_1 = s · x_0 + (pos_1 - s · pos_0)`` for any view-0 voxel coordinate ``x_0`` (PGL maps
            boxes, not only points, between the views: :mod:`medsim.ssl.pgl`).

    Raises:
        ValueError: a non-3-D volume, or options outside their ranges (the message names the value).
    """

    def __init__(self, keys: str | Sequence[str] = "image", roi_size: Sequence[int] = (32, 32, 32), *,
                 scale_range: Sequence[float] = (0.8, 1.25), isotropic: bool = False, max_shift: float = 0.25,
                 n_points: int = 32, names: Sequence[str] = ("_view0", "_view1"),
                 pos_keys: Sequence[str] = ("pos_0", "pos_1"), scale_key: str | None = None):
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"PairedCrops3Dd crops one volume, got keys={list(self.keys)}")
        self.roi_size = tuple(int(v) for v in roi_size)
        lo, hi = (float(v) for v in scale_range)
        if len(self.roi_size) != 3 or min(self.roi_size) < 2:
            raise ValueError(f"roi_size must be 3 sizes >= 2, got roi_size={list(roi_size)}")
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < min <= max, got scale_range={list(scale_range)}")
        if not 0 <= max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5) (a fraction of roi_size), got max_shift={max_shift}")
        if n_points < 1:
            raise ValueError(f"n_points must be >= 1, got n_points={n_points}")
        self.scale_range, self.isotropic, self.max_shift, self.n_points = (lo, hi), isotropic, max_shift, n_points
        self.names, self.pos_keys, self.scale_key = tuple(names), tuple(pos_keys), scale_key
        self._draw: dict[str, Any] = {}

    def randomize(self, data: Sequence[int]) -> None:
        """Draw view 0's origin, view 1's scale and centre for a volume of spatial shape ``data`` (X, Y, Z)."""
        shape = np.asarray(data, dtype=np.int64)
        roi = np.asarray(self.roi_size)
        origin = np.where(shape >= roi, [self.R.randint(0, max(int(n - r), 0) + 1) for n, r in zip(shape, roi)],
                          np.floor((shape - roi) / 2)).astype(np.int64)  # a volume smaller than the ROI: centred
        lo, hi = np.log(self.scale_range)
        scale = np.exp(self.R.uniform(lo, hi, size=1 if self.isotropic else 3)) * np.ones(3)
        shift = self.R.uniform(-1, 1, size=3) * self.max_shift * roi
        self._draw = {"origin": origin, "scale": scale, "centre": origin + (roi - 1) / 2 + shift,
                      "u": self.R.uniform(size=(self.n_points, 3))}

    def points(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``pos_0`` and ``pos_1`` (P, 3) float64 for the current draw on a volume of spatial ``shape``: integer
        voxels of view 0 in the overlap of both boxes, at least one view-1 voxel inside the volume's border (when
        that part of the overlap is not empty)."""
        o, s, c, u = (self._draw[k] for k in ("origin", "scale", "centre", "u"))
        roi = np.asarray(self.roi_size, dtype=np.float64)
        half1 = (roi - 1) / (2 * s)
        lo, hi = np.maximum(o, c - half1), np.minimum(o + roi - 1, c + half1)
        # a margin of one view-1 voxel (1/s volume voxels): the trilinear neighbours of pos_1 in view 1 are
        # then volume, not padding
        inside_lo, inside_hi = np.maximum(lo, 1 / s), np.minimum(hi, np.asarray(shape) - 1 - 1 / s)
        use_inside = inside_lo <= inside_hi
        lo, hi = np.where(use_inside, inside_lo, lo), np.where(use_inside, inside_hi, hi)
        first, last = np.ceil(lo - 1e-9), np.floor(hi + 1e-9)  # whole voxels of the volume inside the overlap
        whole = first <= last
        pts = np.where(whole, first + np.floor(u * (last - first + 1)).clip(max=last - first), lo + u * (hi - lo))
        pos_0 = pts - o
        pos_1 = (pts - c) * s + (roi - 1) / 2
        return pos_0, pos_1

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        img = d[key]
        img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(np.asarray(img))
        if img.ndim != 4:
            raise ValueError(f"PairedCrops3Dd expects a channel-first volume (C, X, Y, Z) under '{key}', got shape "
                             f"{tuple(img.shape)}")
        img = img.float()
        self.randomize(img.shape[1:])
        o, s, c = self._draw["origin"], self._draw["scale"], self._draw["centre"]
        roi = np.asarray(self.roi_size)
        d[self.names[0]] = crop_box(img, o + (roi - 1) / 2, np.ones(3), self.roi_size)
        d[self.names[1]] = crop_box(img, c, s, self.roi_size)
        pos_0, pos_1 = self.points(img.shape[1:])
        d[self.pos_keys[0]] = torch.as_tensor(pos_0, dtype=torch.float32)
        d[self.pos_keys[1]] = torch.as_tensor(pos_1, dtype=torch.float32)
        if self.scale_key:
            d[self.scale_key] = torch.as_tensor(s, dtype=torch.float32)
        return d


def _intensity_chain(key: str, contrast: float, brightness: float, noise: float) -> list:
    """One view's random intensity augmentation: gamma ``1 ± contrast``, scale ``1 ± brightness``, shift
    ``± brightness / 2`` (each p = 0.8), Gaussian noise of std ``noise`` (p = 0.5)."""
    import monai.transforms as mt

    xs: list = []
    if contrast:
        xs.append(mt.RandAdjustContrastd(key, prob=0.8, gamma=(1 - contrast, 1 + contrast)))
    if brightness:
        xs += [mt.RandScaleIntensityd(key, factors=brightness, prob=0.8),
               mt.RandShiftIntensityd(key, offsets=brightness / 2, prob=0.8)]
    if noise:
        xs.append(mt.RandGaussianNoised(key, prob=0.5, std=noise))
    return xs


def sam_view_transforms(roi_size: Sequence[int] = (32, 32, 32), *, pixdim: Sequence[float] = CT_PIXDIM,
                        intensity: str = "hu", hu_window: tuple[float, float] = HU_WINDOW,
                        percentiles: tuple[float, float] = (0.5, 99.5), scale_range: Sequence[float] = (0.8, 1.25),
                        isotropic: bool = False, max_shift: float = 0.25, n_points: int = 32,
                        contrast: float = 0.3, brightness: float = 0.1, noise: float = 0.02, load: bool = True,
                        views_key: str = VIEWS_KEY, scale_key: str | None = None):
    """SAM's paired views of a volume: ``{"image": path} → {"views": [(1, *roi) × 2], "pos_0": (P, 3),
    "pos_1": (P, 3)}`` (module docstring).

    Args:
        roi_size, scale_range, isotropic, max_shift, n_points: the crops (:class:`PairedCrops3Dd`).
        pixdim, intensity, hu_window, percentiles: the loading (:func:`medsim.data.transforms.volume_loading`:
            ``intensity="hu"`` for CT, ``"percentile"`` for MR).
        contrast, brightness, noise: the per-view intensity augmentation (0 switches a term off).
        load: ``False`` when ``image`` is already a loaded (C, X, Y, Z) volume on its final grid.
        scale_key: also output view 1's zoom (3,) under this key (PGL's region boxes; :class:`PairedCrops3Dd`).
    """
    import monai.transforms as mt

    from medsim.data.transforms import volume_loading

    names = ("_view0", "_view1")
    xs: list = [*(volume_loading(pixdim=pixdim, intensity=intensity, hu_window=hu_window,
                                 percentiles=percentiles) if load else []),
                mt.EnsureTyped("image", dtype="float32", track_meta=False),
                PairedCrops3Dd("image", roi_size, scale_range=scale_range, isotropic=isotropic,
                               max_shift=max_shift, n_points=n_points, names=names,
                               scale_key=scale_key)]
    for name in names:
        xs += _intensity_chain(name, contrast, brightness, noise)
    xs.append(GatherViewsd(names, views_key))
    return mt.Compose(xs)


def seeded_copy(transform: Any, seed: int) -> Any:
    """An independent copy of a random MONAI ``transform`` with its random state set from ``seed`` (validation
    pairs drawn reproducibly, without touching the training pipeline's random state)."""
    import copy

    twin = copy.deepcopy(transform)
    twin.set_random_state(seed=int(seed) % 2**32)
    return twin
