"""One preprocessing spec, read by training, export and the torch-free runtime alike.

A run records its eval preprocessing as a *spec* — the transform factory and its plain arguments, e.g.
``{"_target_": "medsim.data.transforms.rgb2d_transforms", "spatial_size": [64, 64], "train": false}`` (``run.json``,
written at train time). The MONAI pipeline is built from it (:mod:`medsim.data.transforms`, with the constants
below), and :func:`describe` turns the same spec into the manifest's ``preprocessing`` section that
:mod:`medsim.runtime` executes with NumPy — no reading of MONAI class names or private attributes.

Torch-free and MONAI-free (a base module: every layer may import it).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RGB_SCALE", "RESIZE_MODE", "SPATIAL_SIZE_2D", "CT_ROI_SIZE",
           "CT_PIXDIM", "HU_WINDOW", "CT_AXCODES", "CT_SPACING",
           "CT_PAD", "AXIS_NOTE", "FACTORY_KINDS", "describe", "kind_of"]

#: ImageNet channel statistics used to normalise RGB inputs (after scaling to [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: RGB uint8 → [0, 1]
RGB_SCALE = {"from": [0.0, 255.0], "to": [0.0, 1.0], "clip": True}
#: image resize (MONAI ``Resized`` mode); masks use nearest
RESIZE_MODE = "area"
#: the factories' default sizes (2D ``spatial_size``; CT ``roi_size`` and ``pixdim`` in mm)
SPATIAL_SIZE_2D = (224, 224)
CT_ROI_SIZE = (96, 96, 96)
CT_PIXDIM = (1.5, 1.5, 2.0)
#: default CT window (HU) → [0, 1]
HU_WINDOW = (-175.0, 250.0)
#: MR volumes (no absolute intensity scale): their own (lower, upper) percentiles → [0, 1], clipped
MR_PERCENTILES = (0.5, 99.5)
#: ``intensity="auto"``: a volume with values below this is CT in HU (air is -1000) and gets the HU window; MR
#: intensities are >= 0 and get the percentiles
AUTO_CT_BELOW = -500.0
CT_AXCODES = "RAS"
#: MONAI ``Spacingd`` settings of the CT pipeline (image interpolation; labels use nearest)
CT_SPACING = {"mode": "bilinear", "padding_mode": "border", "align_corners": False, "diagonal": False,
              "scale_extent": False}
#: MONAI ``SpatialPadd`` settings of the CT pipeline
CT_PAD = {"method": "symmetric", "mode": "constant"}

AXIS_NOTE = ("MONAI axis order: arrays are (C, x, y) with x the image column (PIL width) and y the row, i.e. "
             "spatially transposed relative to PIL/NumPy (H, W, C): feed np.asarray(pil_image).transpose(2, 1, 0); "
             "spatial_size is (x, y) = (width, height)")

#: transform factory (last part of ``_target_``) → source kind
FACTORY_KINDS = {"rgb2d_transforms": "rgb2d", "gray2d_transforms": "gray2d", "ct3d_transforms": "ct3d"}

_RGB_RECIPE = ("RGB uint8 (alpha dropped, gray repeated to 3 channels) → float32 → (C, x, y) → "
               "(v - from[0]) / (from[1] - from[0]) * (to[1] - to[0]) + to[0], clipped → resize to "
               "spatial_size (area) → (v - mean[c]) / std[c] → add the batch axis")
_CT_RECIPE = ("NIfTI / DICOM series → float32 (x, y, z) with its RAS affine → orientation to axcodes → "
              "trilinear resampling to pixdim (MONAI Spacing: voxel centres, border padding) → "
              "(HU - from[0]) / (from[1] - from[0]) clipped to [0, 1] → symmetric zero pad and centre "
              "crop to spatial_size → add channel and batch axes")


def kind_of(spec: Mapping[str, Any]) -> str:
    """``rgb2d`` / ``gray2d`` / ``ct3d`` from a spec's ``_target_`` (``custom`` for anything else)."""
    return FACTORY_KINDS.get(str(spec.get("_target_", "")).rsplit(".", 1)[-1], "custom")


def _floats(v: Any) -> list[float]:
    return [float(x) for x in v]


def describe(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``preprocessing`` section for an eval preprocessing spec (see the module docstring).

    Returns ``{"kind", "steps", "mean", "std", "scale", "spatial_size", …, "channel_order", "axis_order",
    "recipe", "spec"}``: what :mod:`medsim.runtime` reads, plus the spec itself.

    Raises:
        ValueError: a spec of another factory, or a training (augmenting) pipeline.
    """
    kind = kind_of(spec)
    args = {k: v for k, v in spec.items() if k != "_target_"}
    if kind == "custom":
        raise ValueError(f"no preprocessing description for {spec.get('_target_')!r}: medsim describes "
                         f"{', '.join(sorted(FACTORY_KINDS))}")
    if args.get("train"):
        raise ValueError("the deployed preprocessing is the eval pipeline (train=false), got train=true")
    mask = bool(args.get("with_mask", False))
    load = ["LoadImaged"]
    desc: dict[str, Any] = {"kind": kind}
    if kind == "rgb2d":
        normalize = bool(args.get("normalize", True))
        desc["steps"] = [*(load if args.get("load", True) else []), "EnsureTyped", "ToRGBd", "ScaleIntensityRanged",
                         *(["ChannelMaxd", "ThresholdIntensityd", "ThresholdIntensityd"] if mask else []),
                         "Resized", *(["NormalizeIntensityd"] if normalize else [])]
        desc["mean"] = list(IMAGENET_MEAN) if normalize else None
        desc["std"] = list(IMAGENET_STD) if normalize else None
        desc["scale"] = dict(RGB_SCALE)
        desc["spatial_size"] = [int(v) for v in args.get("spatial_size", SPATIAL_SIZE_2D)]
        desc["resize_mode"] = RESIZE_MODE
        if normalize:
            desc["channel_wise"] = True
    elif kind == "gray2d":
        desc["steps"] = [*load, "EnsureTyped", "ChannelMaxd", "ScaleIntensityd", "Resized"]
        desc["mean"] = desc["std"] = None
        desc["scale"] = {"from": "min..max of each image", "to": [0.0, 1.0], "clip": False}
        desc["spatial_size"] = [int(v) for v in args.get("spatial_size", SPATIAL_SIZE_2D)]
        desc["resize_mode"] = RESIZE_MODE
    else:
        intensity = str(args.get("intensity", "hu"))
        scaling = {"hu": "ScaleIntensityRanged", "percentile": "ScaleIntensityRangePercentilesd",
                   "auto": "CTorMRd"}.get(intensity)
        if scaling is None:
            raise ValueError(f"no preprocessing description for intensity={intensity!r} (hu, percentile or auto)")
        desc["steps"] = [*load, "EnsureTyped", "Orientationd", "Spacingd", scaling, "SpatialPadd",
                         "CenterSpatialCropd", "EnsureTyped"]
        desc["mean"] = desc["std"] = None
        desc["axcodes"] = CT_AXCODES
        desc["pixdim"] = _floats(args.get("pixdim", CT_PIXDIM))
        desc["spacing"] = dict(CT_SPACING)
        desc["scale"] = {"from": _floats(args.get("hu_window", HU_WINDOW)), "to": [0.0, 1.0], "clip": True}
        if intensity != "hu":  # MR: the volume's own percentiles → [0, 1], clipped ("auto": CT by its HU values)
            desc["intensity"] = {"mode": intensity, "percentiles": _floats(args.get("percentiles", MR_PERCENTILES)),
                                 "to": [0.0, 1.0], "clip": True, **({"ct_below": AUTO_CT_BELOW}
                                                                     if intensity == "auto" else {})}
        desc["pad"] = dict(CT_PAD)
        desc["spatial_size"] = [int(v) for v in args.get("roi_size", CT_ROI_SIZE)]
        desc["recipe"] = _CT_RECIPE
    desc["channel_order"] = "RGB" if kind == "rgb2d" else "single channel"
    desc["axis_order"] = AXIS_NOTE
    if kind == "rgb2d":
        desc["recipe"] = _RGB_RECIPE
    desc["spec"] = {"_target_": str(spec["_target_"]), **args}
    return desc
