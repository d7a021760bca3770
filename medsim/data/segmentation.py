"""Labelled 3-D volumes for few-label organ segmentation (PGL's downstream task): pair images with label maps and
load them on one grid.

:func:`labelled_volumes` pairs ``imagesTr/X`` with ``labelsTr/X`` (the MONAI/Decathlon layout of ``mr_chaos``) or,
in a folder of case folders (medsim's embedded sample ``ct/``, ``../shared/data/ct/*``), each image with the
``labels*.nii[.gz]`` beside it. :func:`segmentation_transforms` loads both on the ``pixdim`` grid (image bilinear,
labels nearest; :func:`medsim.data.transforms.volume_loading`) and, for training, draws ``num_samples`` random crops
of ``roi_size`` centred on foreground or background voxels (MONAI ``RandCropByPosNegLabeld``) with a mild intensity
augmentation. No flips: left and right kidney are different classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from medsim.errors import MedsimError
from medsim.preprocessing import CT_PAD, CT_PIXDIM, HU_WINDOW

__all__ = ["labelled_volumes", "segmentation_transforms"]

_NIFTI = (".nii", ".nii.gz")


def labelled_volumes(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}]`` of ``dataset_dir``, sorted by image path (module docstring).

    Raises:
        MedsimError: no folder, or no image with a label map (naming what was looked for).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise MedsimError(f"{root}: not a folder of labelled volumes")
    pairs: list[dict[str, str]] = []
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        for img in sorted((root / "imagesTr").iterdir()):
            lab = root / "labelsTr" / img.name
            if img.name.lower().endswith(_NIFTI) and lab.is_file():
                pairs.append({"image": str(img), "label": str(lab)})
    else:
        for lab in sorted(p for p in root.rglob("label*") if p.name.lower().endswith(_NIFTI)):
            images = sorted(p for p in lab.parent.iterdir() if p.name.lower().endswith(_NIFTI)
                            and not p.name.lower().startswith(("label", "mask", "seg")))
            if len(images) == 1:
                pairs.append({"image": str(images[0]), "label": str(lab)})
    if not pairs:
        raise MedsimError(f"{root}: no labelled volume (looked for imagesTr/X with labelsTr/X, else folders holding "
                          "one image and a labels*.nii[.gz])")
    return pairs


def segmentation_transforms(roi_size: Sequence[int] = (64, 64, 32), *, train: bool = False,
                            pixdim: Sequence[float] = CT_PIXDIM, intensity: str = "hu",
                            hu_window: tuple[float, float] = HU_WINDOW,
                            percentiles: tuple[float, float] = (0.5, 99.5), num_samples: int = 2,
                            pos: float = 2.0, neg: float = 1.0):
    """``{"image": path, "label": path}`` → image (1, *S) in [0, 1] and label (1, *S) integer classes on the
    ``pixdim`` grid (RAS); with ``train``, ``num_samples`` crops of ``roi_size`` (foreground : background centres
    = ``pos`` : ``neg``), each a dict of the same keys.

    Shapes: eval: the whole resampled volume (for sliding-window inference); train: (1, *roi_size) per crop.
    """
    import monai.transforms as mt

    from medsim.data.transforms import volume_loading

    keys = ["image", "label"]
    xs: list = [*volume_loading(keys, ("bilinear", "nearest"), pixdim=pixdim, intensity=intensity,
                                hu_window=hu_window, percentiles=percentiles)]
    if train:
        xs += [mt.SpatialPadd(keys, spatial_size=tuple(roi_size), method=CT_PAD["method"], mode=CT_PAD["mode"]),
               mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(roi_size), pos=pos, neg=neg,
                                         num_samples=num_samples),
               mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
               mt.RandShiftIntensityd("image", offsets=0.05, prob=0.5)]
    xs.append(mt.EnsureTyped(keys, track_meta=False))
    return mt.Compose(xs)
