"""MONAI dictionary pipelines for the three kinds of input medsim trains on.

=========  ===============================================  ==============================================
kind       eval (deterministic)                             train-time augmentation added
=========  ===============================================  ==============================================
rgb2d      load RGB, [0, 1], resize, per-channel normalise  flips, 90° rotations, affine, colour/contrast
gray2d     load (DICOM: window + MONOCHROME1), [0, 1],      small affine, contrast, noise (no flips: the
           resize                                           heart's side carries meaning)
ct3d       load, RAS orientation, resample to spacing,      random crop, flips, affine, intensity shift
           HU window (MR: percentiles) → [0, 1], pad/crop
           to the ROI
=========  ===============================================  ==============================================

Masks (``mask`` key) follow the image through every spatial transform with nearest-neighbour interpolation,
so the lesion masks used to score localization stay aligned.
"""

from __future__ import annotations

from typing import Sequence

# the constants of the pipelines live with the preprocessing spec, where export and the runtime read them too
from medsim.preprocessing import (AUTO_CT_BELOW, CT_AXCODES, CT_PAD, CT_PIXDIM, CT_ROI_SIZE, CT_SPACING, HU_WINDOW,
                                  IMAGENET_MEAN, IMAGENET_STD, MR_PERCENTILES, RESIZE_MODE, RGB_SCALE,
                                  SPATIAL_SIZE_2D)

__all__ = ["rgb2d_transforms", "gray2d_transforms", "ct3d_transforms", "volume_loading", "make_transforms",
           "IMAGENET_MEAN", "IMAGENET_STD", "KINDS", "INTENSITIES", "MR_PERCENTILES", "AUTO_CT_BELOW"]

KINDS = ("rgb2d", "gray2d", "ct3d")


def _keys(with_mask: bool) -> tuple[list[str], list[str]]:
    keys = ["image", "mask"] if with_mask else ["image"]
    return keys, (["bilinear", "nearest"] if with_mask else ["bilinear"])


def _load_images(keys: list[str], reader):
    """``LoadImaged(keys, reader)``, without MONAI's nvImageCodec notices: ``LoadImage`` instantiates every
    default reader, even beside the one medsim chooses here, and the absent GPU DICOM codec warns on every CPU
    host (a ``UserWarning`` and a log line per command) about a reader medsim never uses."""
    import logging
    import warnings

    import monai.transforms as mt

    from medsim.files import raise_pil_limit

    raise_pil_limit()  # PIL's default limit is below medsim's: what validation accepted must load
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
        return mt.LoadImaged(keys, reader=reader, image_only=True, ensure_channel_first=True)


def _readers():
    from monai.data import PILReader

    from medsim.data.dicom import DicomReader

    # DICOM (files, series dirs, lists), PIL for 2D images, nibabel for 2D NIfTI: MONAI picks by suffix
    return [DicomReader(display=True), PILReader(reverse_indexing=True), "NibabelReader"]


def rgb2d_transforms(spatial_size: Sequence[int] = SPATIAL_SIZE_2D, *, train: bool = False,
                     with_mask: bool = False,
                     normalize: bool = True, load: bool = True):
    """2D RGB (dermoscopy, histology tiles) → float (3, H, W). Masks → binary (1, H, W).

    ``load=False`` for samples whose ``image`` is already a channel-first array (histology patches read by
    :func:`medsim.data.histology.patch_dataset`)."""
    import monai.transforms as mt

    from monai.data import PILReader

    keys, modes = _keys(with_mask)
    xs: list = [
        # PIL explicitly (as medsim.deploy reads): MONAI's reader choice by suffix would take a DICOM reader for
        # .tif files when ITK is absent
        *([_load_images(keys, PILReader(reverse_indexing=True))] if load else []),
        mt.EnsureTyped(keys, dtype="float32", track_meta=False),
        _ToRGBd("image"),
        mt.ScaleIntensityRanged("image", *RGB_SCALE["from"], *RGB_SCALE["to"], clip=RGB_SCALE["clip"]),
    ]
    if with_mask:
        xs += [_ChannelMaxd("mask"), mt.ThresholdIntensityd("mask", threshold=0.5, above=True, cval=0.0),
               mt.ThresholdIntensityd("mask", threshold=0.5, above=False, cval=1.0)]
    xs.append(mt.Resized(keys, spatial_size=tuple(spatial_size), mode=[
        RESIZE_MODE if m == "bilinear" else "nearest" for m in modes]))
    if train:
        xs += [
            mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
            mt.RandRotate90d(keys, prob=0.5, max_k=3),
            mt.RandAffined(keys, prob=0.5, rotate_range=0.3, scale_range=0.1, translate_range=0.05 * spatial_size[0],
                           mode=modes, padding_mode="border"),
            mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            mt.RandScaleIntensityd("image", factors=0.1, prob=0.3, channel_wise=True),
        ]
    if normalize:
        xs.append(mt.NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True))
    return mt.Compose(xs)


def gray2d_transforms(spatial_size: Sequence[int] = SPATIAL_SIZE_2D, *, train: bool = False,
                      with_mask: bool = False):
    """2D grayscale X-ray → float (1, H, W) in [0, 1] (DICOM: VOI window and MONOCHROME1 applied)."""
    import monai.transforms as mt

    keys, modes = _keys(with_mask)
    xs: list = [
        _load_images(keys, _readers()),
        mt.EnsureTyped(keys, dtype="float32", track_meta=False),
        _ChannelMaxd("image"),
        mt.ScaleIntensityd("image", minv=0.0, maxv=1.0),
        mt.Resized(keys, spatial_size=tuple(spatial_size), mode=[RESIZE_MODE if m == "bilinear" else "nearest"
                                                                 for m in modes]),
    ]
    if train:
        xs += [
            mt.RandAffined(keys, prob=0.5, rotate_range=0.1, scale_range=0.1, translate_range=0.05 * spatial_size[0],
                           mode=modes, padding_mode="zeros"),
            mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            mt.RandGaussianNoised("image", prob=0.2, std=0.02),
        ]
    return mt.Compose(xs)


#: intensity scalings of 3-D volumes → [0, 1]: a fixed HU window (CT), the volume's own percentiles (MR, whose
#: intensities have no absolute scale: MR_PERCENTILES), or either chosen per volume ("auto": CT when it holds values
#: below AUTO_CT_BELOW — air is -1000 HU, MR intensities are >= 0); constants in medsim.preprocessing
INTENSITIES = ("hu", "percentile", "auto")


def volume_loading(keys: Sequence[str] = ("image",), modes: Sequence[str] = ("bilinear",), *,
                   pixdim: Sequence[float] = CT_PIXDIM, intensity: str = "hu",
                   hu_window: tuple[float, float] = HU_WINDOW,
                   percentiles: tuple[float, float] = MR_PERCENTILES) -> list:
    """The deterministic loading of a 3-D volume (CT or MR; NIfTI or DICOM series), as a list of MONAI dictionary
    transforms: load → float32 → RAS orientation → resampling to ``pixdim`` mm → intensity to [0, 1].

    Intensity (``"image"`` only; label maps in ``keys`` are resampled with their ``modes``, e.g. nearest):
    ``"hu"`` clips to the HU window ``hu_window`` (CT); ``"percentile"`` maps the volume's ``percentiles``
    (lower, upper) to 0 and 1 and clips (MR: MONAI ``ScaleIntensityRangePercentilesd``); ``"auto"`` takes the HU
    window for a volume with values below :data:`AUTO_CT_BELOW` and the percentiles otherwise (a folder mixing CT
    and MR).

    Shapes: a file → (1, x, y, z) on the ``pixdim`` grid, RAS.
    """
    import monai.transforms as mt

    from medsim.data.dicom import DicomReader

    keys, modes = list(keys), list(modes)
    intensity = _look_up_intensity(intensity)
    xs: list = [
        _load_images(keys, [DicomReader(display=False), "NibabelReader"]),
        mt.EnsureTyped(keys, dtype="float32"),
        mt.Orientationd(keys, axcodes=CT_AXCODES, labels=None),
        mt.Spacingd(keys, pixdim=tuple(pixdim), mode=modes, padding_mode=CT_SPACING["padding_mode"],
                    align_corners=CT_SPACING["align_corners"], diagonal=CT_SPACING["diagonal"],
                    scale_extent=CT_SPACING["scale_extent"]),
    ]
    lo, hi = (float(p) for p in percentiles)
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must be 0 <= lower < upper <= 100, got percentiles={list(percentiles)}")
    window = mt.ScaleIntensityRanged("image", a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True)
    by_percentile = mt.ScaleIntensityRangePercentilesd("image", lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    xs.append({"hu": window, "percentile": by_percentile}.get(intensity) or _CTorMRd("image", window, by_percentile))
    return xs


def _look_up_intensity(intensity: str) -> str:
    from monai.utils import look_up_option

    return look_up_option(intensity, INTENSITIES)


def ct3d_transforms(roi_size: Sequence[int] = CT_ROI_SIZE, *, pixdim: Sequence[float] = CT_PIXDIM,
                    hu_window: tuple[float, float] = HU_WINDOW, train: bool = False, with_mask: bool = False,
                    intensity: str = "hu", percentiles: tuple[float, float] = MR_PERCENTILES):
    """3D CT (NIfTI or DICOM series) → float (1, *roi_size) in [0, 1]; label maps resampled with nearest.

    ``intensity="percentile"`` scales MR volumes by their own ``percentiles`` instead of the HU window
    (:func:`volume_loading`)."""
    import monai.transforms as mt

    keys, modes = _keys(with_mask)
    xs: list = [
        *volume_loading(keys, modes, pixdim=pixdim, intensity=intensity, hu_window=hu_window,
                        percentiles=percentiles),
        mt.SpatialPadd(keys, spatial_size=tuple(roi_size), method=CT_PAD["method"], mode=CT_PAD["mode"]),
    ]
    if train:
        xs += [
            mt.RandSpatialCropd(keys, roi_size=tuple(roi_size), random_size=False),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
            mt.RandAffined(keys, prob=0.3, rotate_range=(0.1, 0.1, 0.1), scale_range=0.1, mode=modes,
                           padding_mode="zeros"),
            mt.RandShiftIntensityd("image", offsets=0.05, prob=0.3),
        ]
    else:
        xs.append(mt.CenterSpatialCropd(keys, roi_size=tuple(roi_size)))
    xs.append(mt.EnsureTyped(keys, track_meta=False))
    return mt.Compose(xs)


def make_transforms(kind: str, *, train: bool = False, **kwargs):
    """The pipeline for a source kind (see :data:`KINDS`); unknown kinds get a "did you mean"."""
    from monai.utils import look_up_option

    fn = look_up_option(kind, {"rgb2d": rgb2d_transforms, "gray2d": gray2d_transforms, "ct3d": ct3d_transforms})
    return fn(train=train, **kwargs)


def _transform_base():
    from monai.transforms import MapTransform

    return MapTransform


class _CTorMRd(_transform_base()):  # type: ignore[misc]
    """``ct`` (a transform) on a volume with values below :data:`AUTO_CT_BELOW` (CT in HU: air is -1000), ``mr``
    otherwise (MR intensities are >= 0): volume_loading's ``intensity="auto"``."""

    def __init__(self, keys, ct, mr):
        super().__init__(keys)
        self.ct, self.mr = ct, mr

    def __call__(self, data):
        d = dict(data)
        for k in self.key_iterator(d):
            d = (self.ct if float(d[k].min()) < AUTO_CT_BELOW else self.mr)(d)
        return d


class _ToRGBd(_transform_base()):  # type: ignore[misc]
    """Make a channel-first tensor 3-channel RGB: drop alpha, repeat a single gray channel."""

    def __call__(self, data):
        d = dict(data)
        for k in self.key_iterator(d):
            img = d[k]
            if img.shape[0] in (2, 4):  # gray+alpha, RGBA
                img = img[:1] if img.shape[0] == 2 else img[:3]
            if img.shape[0] == 1:
                img = img.repeat(3, *([1] * (img.ndim - 1)))
            d[k] = img
        return d


class _ChannelMaxd(_transform_base()):  # type: ignore[misc]
    """Collapse channels to one (max over colour channels): masks or X-rays saved as RGB(A) PNG."""

    def __call__(self, data):
        d = dict(data)
        for k in self.key_iterator(d):
            img = d[k]
            if img.shape[0] > 1:
                d[k] = img[: min(3, img.shape[0])].amax(0, keepdim=True)
        return d
