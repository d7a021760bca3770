"""Unlabelled 3-D volumes for self-supervised pretraining (SAM): find them in a folder and split them by volume.

A dataset folder holds CT or MR volumes as NIfTI files or DICOM series. :func:`find_volumes` lists them:

- a MONAI/Decathlon layout (``imagesTr/`` beside ``labelsTr/``, e.g. ``mr_chaos``): the files of ``imagesTr/``;
- otherwise every ``*.nii`` / ``*.nii.gz`` under the folder that is not a label map or mask (files named
  ``label*`` / ``mask*``, and anything inside ``labels*`` / ``masks*`` folders), plus every folder of ``*.dcm`` files
  (one DICOM series each).

:func:`volume_datalists` splits them by volume (each volume is one patient in these sets) and records the split
like every medsim run (``split.json`` with opaque ids, the paths in ``split.local.json``:
:func:`medsim.data.splits.save_split`); a run folder that already has a split reuses it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import MedsimError

__all__ = ["find_volumes", "volume_datalists", "split_lists"]

logger = logging.getLogger(__name__)

_NIFTI = (".nii", ".nii.gz")
_LABEL_WORDS = ("label", "mask", "seg")


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(_NIFTI)


def _is_label(p: Path, root: Path) -> bool:
    parts = [q.lower() for q in p.relative_to(root).parts]
    return any(part.startswith(_LABEL_WORDS) for part in parts[:-1]) or parts[-1].startswith(_LABEL_WORDS)


def find_volumes(dataset_dir: str | os.PathLike) -> list[Path]:
    """The volumes of ``dataset_dir`` (module docstring), sorted: NIfTI files and DICOM series folders.

    Raises:
        MedsimError: the folder does not exist or holds no volume (naming what was looked for).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise MedsimError(f"{root}: not a folder of volumes (NIfTI files or DICOM series folders)")
    if (root / "imagesTr").is_dir():
        found = sorted(p for p in (root / "imagesTr").iterdir() if _is_nifti(p))
    else:
        found = sorted(p for p in root.rglob("*") if _is_nifti(p) and not _is_label(p, root))
        series = sorted({p.parent for p in root.rglob("*.dcm") if not _is_label(p, root)})
        found += series
    if not found:
        raise MedsimError(f"{root}: no volume found (looked for imagesTr/*.nii[.gz], else *.nii / *.nii.gz files "
                          "that are not label maps or masks, and folders of *.dcm files)")
    return found


def volume_datalists(dataset_dir: str | os.PathLike | None, output_dir: str | os.PathLike, *,
                     fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict[str, Any]:
    """Split the volumes of ``dataset_dir`` (default: the embedded sample's ``ct/`` volume) by volume and save the
    split to ``output_dir/split.json`` (reused when it is already there and made from the same volumes: another
    folder, or volumes removed or added since, is refused — :func:`medsim.data.splits.check_reused_split`).

    With fewer than three volumes every volume trains and the validation and test lists are the training list
    (``meta["held_out"] = False`` in the split file): a smoke run, not a measurement.

    Returns ``{"training", "validation", "test": [{"image": path, "label": -1, "index": i}], "held_out": bool}``
    (label -1: unlabelled).
    """
    from medsim.data.splits import check_reused_split, load_split, save_split

    out = Path(output_dir)
    split_file = out / "split.json"
    if not dataset_dir:
        from medsim.data.sample import ensure_sample

        dataset_dir = ensure_sample() / "ct"
    volumes = find_volumes(dataset_dir)
    if not split_file.is_file():
        order = np.random.default_rng(seed).permutation(len(volumes))
        held_out = len(volumes) >= 3
        if held_out:
            n_val = max(1, int(round(fractions[1] * len(volumes))))
            n_test = max(1, int(round(fractions[2] * len(volumes))))
            n_train = len(volumes) - n_val - n_test
            parts = {"training": order[:n_train], "validation": order[n_train:n_train + n_val],
                     "test": order[n_train + n_val:]}
        else:
            logger.warning("%s: %d volume(s), too few to hold any out; validation and test reuse the training "
                           "volumes (a smoke run)", dataset_dir, len(volumes))
            parts = {"training": order, "validation": np.array([], dtype=int), "test": np.array([], dtype=int)}
        # label -1: unlabelled (a run folder's split is read by export and evaluation, which expect the key)
        splits = {k: [{"image": str(volumes[i]), "label": -1} for i in idx] for k, idx in parts.items()}
        out.mkdir(parents=True, exist_ok=True)
        save_split(splits, split_file, dataset_dir=dataset_dir,
                   meta={"source": str(Path(dataset_dir).resolve()), "kind": "volume", "by": "volume",
                         "fractions": list(fractions), "seed": seed, "held_out": held_out})
        return split_lists(load_split(split_file))
    doc = load_split(split_file)
    check_reused_split(split_file, doc, source=dataset_dir, by="volume", found=volumes)
    return split_lists(doc)


def split_lists(doc: dict[str, Any]) -> dict[str, Any]:
    """The datalists of a volume split (:func:`medsim.data.splits.load_split`'s document): ``{"training",
    "validation", "test": [{"image", "label": -1, "index"}], "held_out"}``; a split that held nothing out
    (``meta["held_out"] = False``) validates and tests on its training volumes."""
    held_out = bool(doc["meta"].get("held_out", True))
    lists = {k: [{"image": it["image"], "label": -1, "index": i} for i, it in enumerate(doc.get(k, []))]
             for k in ("training", "validation", "test")}
    if not held_out:
        lists["validation"] = lists["test"] = list(lists["training"])
    return {**lists, "held_out": held_out}
