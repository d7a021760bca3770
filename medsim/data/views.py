"""Several random views of one image, for joint-embedding self-supervised learning (SimCLR, MoCo, BYOL, DINO).

Each factory returns one flat MONAI ``Compose``:

1. the deterministic loading of the eval pipeline (:func:`~medsim.data.transforms.rgb2d_transforms` /
   :func:`~medsim.data.transforms.gray2d_transforms`, resized to ``load_size``), so views are cut from the image
   the eval preprocessing sees;
2. ``CopyItemsd``: one copy of ``image`` per view (the cache boundary: ``CacheDataset`` keeps the loaded image
   once, not once per view);
3. per copy, its own random chain (crop-resize, flips/rotations, intensity jitter, blur);
4. for RGB, the eval normalisation (ImageNet mean/std) per view: a pretrained encoder sees train and eval inputs
   scaled alike;
5. :class:`GatherViewsd`: ``"views": [v_1, …, v_V]`` (each (C, H, W)); the per-view keys and the loaded image
   are dropped.

``monai.data.DataLoader`` collates ``views`` into a list of V batches (B, C, H_v, W_v) — what
:func:`medsim.engines.views_prepare_batch` reads. Multi-crop (``local_views``) appends smaller crops after the
global ones. The chain is seedable: ``set_random_state(seed=…)`` (what ``TrainingHooks`` calls each epoch) fixes
every view.

Crop scales are fractions of the loaded image's *area*, as in ``RandomResizedCrop`` (SimCLR); MONAI's
``RandScaleCropd`` draws each side independently, so a crop of area fraction in ``scale`` has sides in
``sqrt(scale)``, with aspect-ratio jitter from the independent draws.
"""

from __future__ import annotations

import math
from typing import Sequence

from medsim.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODE

__all__ = ["rgb_view_transforms", "xray_view_transforms", "GatherViewsd", "VIEWS_KEY"]

VIEWS_KEY = "views"


def _transform_base():
    from monai.transforms import MapTransform

    return MapTransform


class GatherViewsd(_transform_base()):  # type: ignore[misc]
    """Move the per-view entries ``keys`` (in order) into one list ``data[views_key]`` and drop them (and ``drop``,
    by default the loaded ``image``, which the views replace)."""

    def __init__(self, keys: Sequence[str], views_key: str = VIEWS_KEY, drop: Sequence[str] = ("image",)):
        super().__init__(list(keys))
        self.views_key = views_key
        self.drop = tuple(drop)

    def __call__(self, data):
        d = dict(data)
        d[self.views_key] = [_plain(d.pop(k)) for k in self.keys]
        for k in self.drop:
            d.pop(k, None)
        return d


def _plain(x):
    """A MetaTensor as a plain ``torch.Tensor`` (its meta dict would be collated beside every view for nothing)."""
    import torch

    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _copy_base():
    import monai.transforms as mt
    from monai.transforms.traits import RandomizableTrait

    return mt.CopyItemsd, RandomizableTrait


class _CopyViewsd(*_copy_base()):  # type: ignore[misc]
    """``CopyItemsd`` marked as a random trait: ``CacheDataset`` caches up to the first random transform, so the
    cache stops here and holds the loaded image once rather than once per view."""


def _side_scale(scale: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must be 0 < min <= max <= 1 (fractions of the image area), got {list(scale)}")
    return math.sqrt(lo), math.sqrt(hi)


def _view_chain(key: str, size: Sequence[int], scale: Sequence[float], *, flips: Sequence[int], rot90: bool,
                rotate_deg: float, contrast: float, brightness: float, channel_wise: bool, blur_prob: float,
                hflip_prob: float = 0.5) -> list:
    """The random chain of one view (``key``): crop-resize, flips, rotations, intensity jitter clipped to [0, 1],
    blur."""
    import monai.transforms as mt

    lo, hi = _side_scale(scale)
    xs: list = [mt.RandScaleCropd(key, roi_scale=lo, max_roi_scale=hi, random_size=True, random_center=True),
                # the eval resize ("area"): MONAI's bilinear anti-aliasing blurs with zero padding and darkens borders
                mt.Resized(key, spatial_size=tuple(size), mode=RESIZE_MODE)]
    xs += [mt.RandFlipd(key, prob=hflip_prob, spatial_axis=axis) for axis in flips]
    if rot90:
        xs.append(mt.RandRotate90d(key, prob=0.5, max_k=3))
    if rotate_deg:
        xs.append(mt.RandRotated(key, range_x=math.radians(rotate_deg), prob=0.8, padding_mode="border"))
    if contrast:
        xs.append(mt.RandAdjustContrastd(key, prob=0.8, gamma=(1 - contrast, 1 + contrast)))
    if brightness:
        xs += [mt.RandScaleIntensityd(key, factors=brightness, prob=0.8, channel_wise=channel_wise),
               mt.RandShiftIntensityd(key, offsets=brightness / 4, prob=0.8, channel_wise=channel_wise)]
    xs.append(mt.ScaleIntensityRanged(key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True))  # clip only
    if blur_prob:
        sigma = (0.1, max(0.1, 0.02 * min(size)))  # SimCLR: sigma up to ~2% of the side (kernel 10% of it)
        xs.append(mt.RandGaussianSmoothd(key, sigma_x=sigma, sigma_y=sigma, prob=blur_prob))
    return xs


def _check_views(n_views: int, local_views: int) -> None:
    # one view is allowed: a building block (MedAug views one image and its partner with a one-view chain)
    if n_views < 1 or local_views < 0:
        raise ValueError(f"need n_views >= 1 and local_views >= 0, got n_views={n_views} local_views={local_views}")


def _assemble(load: list, n_views: int, local_views: int, chain, after: list | None = None,
              views_key: str = VIEWS_KEY):
    import monai.transforms as mt

    _check_views(n_views, local_views)
    names = [f"_view{i}" for i in range(n_views + local_views)]
    xs = [*load, _CopyViewsd("image", times=len(names), names=names)]
    for i, name in enumerate(names):
        xs += chain(name, local=i >= n_views)
    xs += [t for name in names for t in (after(name) if after else [])]
    xs.append(GatherViewsd(names, views_key))
    return mt.Compose(xs)


def rgb_view_transforms(spatial_size: Sequence[int] = (64, 64), n_views: int = 2, *,
                        load_size: Sequence[int] | None = None, scale: Sequence[float] = (0.2, 1.0),
                        local_views: int = 0, local_size: Sequence[int] = (32, 32),
                        local_scale: Sequence[float] = (0.05, 0.4), contrast: float = 0.4, brightness: float = 0.4,
                        blur_prob: float = 0.5, normalize: bool = True, load: bool = True,
                        views_key: str = VIEWS_KEY):
    """Views of 2D RGB images (dermoscopy, histology): ``{"image": path} → {"views": [(3, H, W) × V]}``.

    Args:
        spatial_size: size of the ``n_views`` global views.
        n_views: global views (crops of area fraction ``scale``).
        load_size: the size the image is loaded at (and cached at) before cropping; default twice
            ``spatial_size``.
        local_views, local_size, local_scale: multi-crop (DINO/SwAV): extra smaller crops, listed after the
            global views.
        contrast: gamma range ``1 ± contrast``; brightness: per-channel scale ``1 ± brightness`` and shift
            ``± brightness / 4`` (colour jitter: channels move independently); each applied with p = 0.8.
        blur_prob: probability of a Gaussian blur.
        normalize: ImageNet mean/std per view, as the eval pipeline (``rgb2d_transforms``) does.
        load: ``False`` when ``image`` is already a channel-first array (histology patches).
    """
    from medsim.data.transforms import rgb2d_transforms

    load_size = tuple(load_size) if load_size is not None else tuple(2 * int(s) for s in spatial_size)
    loading = list(rgb2d_transforms(load_size, normalize=False, load=load).transforms)

    def chain(key: str, local: bool) -> list:
        return _view_chain(key, local_size if local else spatial_size, local_scale if local else scale,
                           flips=(0, 1), rot90=True, rotate_deg=0.0, contrast=contrast, brightness=brightness,
                           channel_wise=True, blur_prob=blur_prob)

    def after(key: str) -> list:
        import monai.transforms as mt

        return [mt.NormalizeIntensityd(key, subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD,
                                       channel_wise=True)] if normalize else []

    return _assemble(loading, n_views, local_views, chain, after, views_key)


def xray_view_transforms(spatial_size: Sequence[int] = (64, 64), n_views: int = 2, *,
                         load_size: Sequence[int] | None = None, scale: Sequence[float] = (0.5, 1.0),
                         rotate_deg: float = 10.0, contrast: float = 0.3, brightness: float = 0.2,
                         hflip_prob: float = 0.0, blur_prob: float = 0.0, channels: int = 1, local_views: int = 0,
                         local_size: Sequence[int] = (32, 32), local_scale: Sequence[float] = (0.1, 0.4),
                         views_key: str = VIEWS_KEY):
    """Views of grayscale X-rays: ``{"image": path} → {"views": [(channels, H, W) × V]}``, in [0, 1] like the
    eval pipeline (``gray2d_transforms``, which does not normalise).

    Crop-resize, rotation of ± ``rotate_deg`` (MoCo-CXR: 10°), contrast (gamma ``1 ± contrast``) and brightness
    (scale ``1 ± brightness``, shift ``± brightness / 4``); no colour operations and no vertical flip. Horizontal
    flips are off by default (``hflip_prob``): MoCo-CXR flips, but the heart's side carries meaning (dextrocardia,
    situs), as in medsim's ``gray2d`` training pipeline. ``channels=3`` repeats the gray channel (RGB-pretrained
    encoders).
    """
    import monai.transforms as mt

    from medsim.data.transforms import gray2d_transforms

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got channels={channels}")
    load_size = tuple(load_size) if load_size is not None else tuple(2 * int(s) for s in spatial_size)
    loading = list(gray2d_transforms(load_size).transforms)

    def chain(key: str, local: bool) -> list:
        return _view_chain(key, local_size if local else spatial_size, local_scale if local else scale,
                           # axis 0 is x (left-right): MONAI reads 2D images in (x, y) order
                           flips=(0,) if hflip_prob else (), rot90=False, rotate_deg=rotate_deg, contrast=contrast,
                           brightness=brightness, channel_wise=False, blur_prob=blur_prob, hflip_prob=hflip_prob)

    def after(key: str) -> list:
        return [mt.RepeatChanneld(key, repeats=3)] if channels == 3 else []

    return _assemble(loading, n_views, local_views, chain, after, views_key)
