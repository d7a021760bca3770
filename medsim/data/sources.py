"""Data sources: read a dataset on disk into a MONAI datalist (a list of dicts) with checks.

Layouts (``open_source(path)`` detects them):

================  ==========================================================================================
``ham10000``      images/ + ``HAM10000_metadata.csv`` (image_id, dx, lesion_id); masks/ optional
``isic2019``      images + ``ISIC_2019_Training_GroundTruth.csv`` (one-hot); ``..._Metadata.csv`` lesion_id
``folder``        one sub-folder per class holding images
``csv``           a CSV datalist: image column plus label / group / patient / study / view / mask / id
``dicom``         DICOM files or series (grouped by SeriesInstanceUID, sorted by position)
``nifti``         NIfTI volumes with optional label maps (``ct.nii.gz`` + ``labels.nii.gz`` per folder,
                  or ``imagesTr/`` + ``labelsTr/``)
``tiff``          large TIFF histology images cut into patches with their coordinates
``image``         one 2D image file (PNG, JPEG, BMP, a TIFF smaller than one patch), known by its content
================  ==========================================================================================

A single file is recognised by its content (:func:`medsim.files.file_format`), not its name. Folder scans skip
hidden files and folders (``.DS_Store``, AppleDouble ``._*``, ``.git/``) and count them in ``Source.info["hidden"]``.

Each item carries ``image`` (path), ``label`` (int) and ``label_name`` when labelled, ``id``, and metadata for
pair sampling (``group`` = lesion, ``patient``, ``study``, ``series``, ``view``, ``laterality``). Identifiers are
hashed with the project salt before they leave the reader (:mod:`medsim.data.phi`).

Table-level problems (missing column, row pointing at a missing file, empty or unknown label, duplicate id) are
collected per row; in strict mode they raise one :class:`~medsim.errors.DataError` listing all of them, in
lenient mode the rows are skipped and listed in ``Source.bad``.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medsim.data.phi import Anonymizer
from medsim.errors import BadItem, DataError
from medsim.files import FORMAT_NAMES, file_format, visible_files

__all__ = ["Source", "read_csv_rows", "LAYOUTS", "IMAGE_SUFFIXES", "open_source", "detect_layout", "HAM10000_CLASSES",
           "ISIC2019_CLASSES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
LAYOUTS = ("ham10000", "isic2019", "folder", "csv", "dicom", "nifti", "tiff", "image")

#: column aliases for the generic CSV datalist: canonical key -> accepted header names (case-insensitive)
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "path", "filename", "file", "image_id"),
    "label": ("label", "class", "dx", "diagnosis", "target"),
    "group": ("group", "lesion_id", "lesion"),
    "patient": ("patient", "patient_id", "patientid", "subject", "subject_id"),
    "study": ("study", "study_id", "study_uid", "follow_up_study"),
    "view": ("view", "view_position", "viewposition"),
    "laterality": ("laterality", "side"),
    "mask": ("mask", "mask_path", "segmentation", "seg"),
    "id": ("id", "case_id", "uid"),
    "follow_up": ("follow_up", "followup"),
}


@dataclass
class Source:
    """A dataset read from disk: its datalist and what could not be used.

    ``kind`` says which MONAI pipeline fits: ``rgb2d`` (dermoscopy, histology), ``gray2d`` (X-ray) or ``ct3d``.
    """

    root: str
    layout: str
    kind: str
    items: list[dict[str, Any]]
    classes: list[str] = field(default_factory=list)
    bad: list[BadItem] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(it.get("label_name") for it in self.items if it.get("label_name") is not None)
        return {c: counts.get(c, 0) for c in self.classes}


class _Rows:
    """Collects per-row problems while a table is read."""

    def __init__(self, path: Path):
        self.path = path
        self.bad: list[BadItem] = []

    def fail(self, row: int | None, reason: str, field_: str | None = None, file: str | None = None) -> None:
        self.bad.append(BadItem(file or str(self.path), reason, row=row, field=field_))


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV table (UTF-8, BOM allowed); a missing file or bad encoding is a DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"not a readable CSV file ({e})") from e
    if not header:
        raise DataError(path, "empty CSV file (no header row)")
    return header, [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def _find_column(header: Sequence[str], key: str, path: Path, *, required: bool = False,
                 explicit: str | None = None) -> str | None:
    lower = {h.lower(): h for h in header}
    if explicit is not None:
        if explicit.lower() not in lower:
            raise DataError(path, f"column '{explicit}' not found; columns are: {', '.join(header)}",
                            field=explicit)
        return lower[explicit.lower()]
    for name in CSV_COLUMNS.get(key, (key,)):
        if name in lower:
            return lower[name]
    if required:
        raise DataError(path, f"missing the {key} column (one of: {', '.join(CSV_COLUMNS[key])}); "
                              f"columns are: {', '.join(header)}", field=key)
    return None


def _resolve_image(value: str, bases: Sequence[Path], suffixes: Sequence[str] = ("",)) -> Path | None:
    for base in bases:
        for suf in suffixes:
            p = base / (value + suf)
            if p.is_file():
                return p
    return None


def _finish(root: Path, layout: str, kind: str, items: list[dict], bad: list[BadItem], classes: list[str],
            lenient: bool, info: dict | None = None) -> Source:
    if bad and not lenient:
        raise DataError(items=bad, header=f"{len(bad)} problem(s) in {root} ({layout} layout); fix them or "
                                          f"use lenient mode to skip and report them:")
    if not items:
        if bad:  # say why each was unusable: "no usable items" alone names no file and no reason
            raise DataError(items=bad, header=f"no usable items in {root} ({layout} layout); {len(bad)} "
                                              "unusable:")
        raise DataError(root, f"no usable items found ({layout} layout)")
    if bad:
        logger.warning("%s: skipped %d bad item(s); first: %s", root, len(bad), bad[0].line())
    info = info or {}
    if info.get("hidden"):
        logger.info("%s: skipped %d hidden file(s)/folder(s)", root, info["hidden"])
    return Source(str(root), layout, kind, items, classes, bad, info)


def _check_duplicates(items: list[dict], rows: _Rows, key: str = "id") -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        k = it.get(key)
        if k in seen:
            rows.fail(it.get("_row"), f"duplicate {key} '{k}' (first at row {seen[k]})", key)
            continue
        seen[k] = it.get("_row")
        out.append(it)
    return out


def _labelled(items: list[dict], classes: Sequence[str]) -> list[dict]:
    index = {c: i for i, c in enumerate(classes)}
    for it in items:
        if it.get("label_name") is not None:
            it["label"] = index[it["label_name"]]
    return items


def _clean(items: list[dict], anon: Anonymizer) -> list[dict]:
    return [anon.item(it) for it in items]


def _class_vocabulary(root: Path) -> list[str] | None:
    """Class names from ``root/classes.txt`` (one per line, in label order), when a dataset ships one."""
    f = root / "classes.txt"
    if not f.is_file():
        return None
    names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise DataError(f, "duplicate class names")
    return names


# --------------------------------------------------------------------------------------------------- layouts
def read_ham10000(root: Path, anon: Anonymizer, *, lenient: bool = False,
                  metadata: str = "HAM10000_metadata.csv") -> Source:
    """HAM10000: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx) + ``images/<image_id>.jpg|png`` and
    optional ``masks/<image_id>_segmentation.png``. ``group`` = lesion_id. The label vocabulary is HAM10000's
    seven classes, or ``classes.txt`` beside the table when the dataset ships one."""
    table = root / metadata
    header, data = read_csv_rows(table)
    rows = _Rows(table)
    for col in ("image_id", "dx", "lesion_id"):
        _find_column(header, col, table, required=True, explicit=col)
    bases = [root / "images", root / "HAM10000_images", root]
    vocab = _class_vocabulary(root) or list(HAM10000_CLASSES)
    known = set(vocab)
    extra = sorted({r["dx"] for r in data if r["dx"] and r["dx"] not in known})
    items = []
    for i, r in enumerate(data, start=2):  # row numbers as a spreadsheet shows them (header = row 1)
        if not r["image_id"]:
            rows.fail(i, "empty image_id", "image_id")
            continue
        if not r["dx"]:
            rows.fail(i, "empty label", "dx")
            continue
        if r["dx"] not in known:
            rows.fail(i, f"unknown label '{r['dx']}' (known: {', '.join(vocab)})", "dx")
            continue
        img = _resolve_image(r["image_id"], bases, (".jpg", ".png", ".jpeg", ""))
        if img is None:
            rows.fail(i, f"image '{r['image_id']}' not found in {bases[0]}", "image_id")
            continue
        mask = _resolve_image(r["image_id"] + "_segmentation", [root / "masks"], (".png",))
        items.append({"_row": i, "id": r["image_id"], "image": str(img), "label_name": r["dx"],
                      "group": r["lesion_id"] or r["image_id"], **({"mask": str(mask)} if mask else {})})
    items = _check_duplicates(items, rows)
    if extra:
        logger.info("unknown dx values in %s: %s", table, extra)
    return _finish(root, "ham10000", "rgb2d", _clean(_labelled(items, vocab), anon), rows.bad, vocab, lenient,
                   {"table": str(table)})


def read_isic2019(root: Path, anon: Anonymizer, *, lenient: bool = False) -> Source:
    """ISIC 2019: ``ISIC_2019_Training_GroundTruth.csv`` (image + one-hot MEL…UNK) with images in
    ``ISIC_2019_Training_Input/`` (or ``images/``); ``ISIC_2019_Training_Metadata.csv`` gives lesion_id."""
    table = root / "ISIC_2019_Training_GroundTruth.csv"
    header, data = read_csv_rows(table)
    rows = _Rows(table)
    _find_column(header, "image", table, required=True, explicit="image")
    classes = [c for c in ISIC2019_CLASSES if c in header]
    if not classes:
        raise DataError(table, f"no class columns found (expected some of {', '.join(ISIC2019_CLASSES)})")
    lesion: dict[str, str] = {}
    meta = root / "ISIC_2019_Training_Metadata.csv"
    if meta.is_file():
        _, mrows = read_csv_rows(meta)
        lesion = {r.get("image", ""): r.get("lesion_id", "") for r in mrows if r.get("lesion_id")}
    bases = [root / "ISIC_2019_Training_Input", root / "images", root]
    items = []
    for i, r in enumerate(data, start=2):
        try:
            hot = [float(r[c] or 0) for c in classes]
        except ValueError:
            rows.fail(i, "non-numeric one-hot value", ",".join(classes))
            continue
        if sum(1 for h in hot if h > 0.5) != 1:
            rows.fail(i, f"expected exactly one class set to 1, got {sum(1 for h in hot if h > 0.5)}",
                      ",".join(classes))
            continue
        img = _resolve_image(r["image"], bases, (".jpg", ".png", ""))
        if img is None:
            rows.fail(i, f"image '{r['image']}' not found in {bases[0]}", "image")
            continue
        name = classes[max(range(len(hot)), key=hot.__getitem__)]
        items.append({"_row": i, "id": r["image"], "image": str(img), "label_name": name,
                      "group": lesion.get(r["image"]) or r["image"]})
    items = _check_duplicates(items, rows)
    return _finish(root, "isic2019", "rgb2d", _clean(_labelled(items, classes), anon), rows.bad, classes,
                   lenient, {"table": str(table)})


def read_folder(root: Path, anon: Anonymizer, *, lenient: bool = False) -> Source:
    """One sub-folder per class, images inside (any depth). Classes sorted by name."""
    entries = list(root.iterdir())
    classes = sorted(d.name for d in entries if d.is_dir() and not d.name.startswith("."))
    hidden = sum(1 for e in entries if e.name.startswith("."))
    items, bad = [], []
    for c in classes:
        found = visible_files(root / c)
        hidden += found.hidden
        for p in found.files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                bad.append(BadItem(str(p), f"not an image file (suffix '{p.suffix}'; expected "
                                           f"{', '.join(IMAGE_SUFFIXES)})"))
                continue
            items.append({"id": str(p.relative_to(root)), "image": str(p), "label_name": c})
    return _finish(root, "folder", "rgb2d", _clean(_labelled(items, classes), anon), bad, classes, lenient,
                   {"hidden": hidden})


def read_csv_datalist(table: Path, anon: Anonymizer, *, lenient: bool = False, image_column: str | None = None,
                      label_column: str | None = None, classes: Sequence[str] | None = None,
                      kind: str | None = None) -> Source:
    """A generic CSV datalist. Image paths are relative to the CSV's folder (or its ``images/``).

    ``classes`` fixes the label vocabulary (labels outside it are errors); otherwise the sorted distinct labels.
    """
    header, data = read_csv_rows(table)
    rows = _Rows(table)
    cols = {"image": _find_column(header, "image", table, required=True, explicit=image_column),
            "label": _find_column(header, "label", table, explicit=label_column)}
    for key in ("group", "patient", "study", "view", "laterality", "mask", "id", "follow_up"):
        cols[key] = _find_column(header, key, table)
    bases = [table.parent, table.parent / "images"]
    known = set(classes) if classes is not None else None
    items = []
    for i, r in enumerate(data, start=2):
        value = r.get(cols["image"], "")
        if not value:
            rows.fail(i, "empty image path", cols["image"])
            continue
        img = Path(value) if Path(value).is_absolute() and Path(value).exists() else _resolve_image(value, bases)
        if img is None:
            rows.fail(i, f"image '{value}' not found (looked in {', '.join(str(b) for b in bases)})",
                      cols["image"])
            continue
        it: dict[str, Any] = {"_row": i, "image": str(img), "id": r.get(cols["id"]) if cols["id"] else value}
        if cols["label"]:
            lab = r.get(cols["label"], "")
            if not lab:
                rows.fail(i, "empty label", cols["label"])
                continue
            if known is not None and lab not in known:
                rows.fail(i, f"unknown label '{lab}' (known: {', '.join(classes or [])})", cols["label"])
                continue
            it["label_name"] = lab
        for key in ("group", "patient", "study", "view", "laterality", "follow_up"):
            if cols[key] and r.get(cols[key]):
                it[key] = r[cols[key]]
        if cols["mask"] and r.get(cols["mask"]):
            m = _resolve_image(r[cols["mask"]], bases)
            if m is None:
                rows.fail(i, f"mask '{r[cols['mask']]}' not found", cols["mask"])
                continue
            it["mask"] = str(m)
        items.append(it)
    items = _check_duplicates(items, rows)
    names = list(classes) if classes is not None else sorted({it["label_name"] for it in items
                                                              if "label_name" in it})
    if kind is None:
        kind = _guess_kind(items)
    return _finish(table.parent, "csv", kind, _clean(_labelled(items, names), anon), rows.bad, names, lenient,
                   {"table": str(table), "columns": {k: v for k, v in cols.items() if v}})


def _guess_kind(items: list[dict]) -> str:
    """ct3d for NIfTI/series, gray2d when the first 2D image is single-channel (or DICOM), else rgb2d."""
    if not items:
        return "rgb2d"
    first = items[0]["image"]
    if isinstance(first, list) or str(first).endswith(NIFTI_SUFFIXES):
        return "ct3d"
    if Path(first).suffix.lower() in (".dcm", ".dicom"):
        return "gray2d"
    try:
        from PIL import Image

        with Image.open(first) as im:
            if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                return "gray2d"
            if im.mode == "RGB":  # grayscale saved as RGB (e.g. the NIH chest X-ray PNGs)
                import numpy as np

                a = np.asarray(im)
                return "gray2d" if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]) \
                    else "rgb2d"
            return "rgb2d"
    except Exception:  # unreadable: validation reports it; assume colour
        return "rgb2d"


def read_dicom_source(root: Path, anon: Anonymizer, *, lenient: bool = False) -> Source:
    """DICOM files or series. Multi-slice series become one 3D item (``image`` = its files in slice order; ``mask``
    = the NIfTI label map beside it, ``labels.nii.gz`` in its folder or the folder above, when there is one);
    single images (X-ray) one 2D item each."""
    from medsim.data.dicom import scan_dicom

    scan = scan_dicom(root)
    items = []
    volumes = [s for s in scan.series if s.n_slices > 1]
    for n, s in enumerate(scan.series):
        first = Path(s.files[0])
        rel = first.relative_to(root) if root.is_dir() else Path(first.name)
        it: dict[str, Any] = {
            # a single image is named by its file; a series by its folder (and its position, for folders with several)
            "id": rel.as_posix() if s.n_slices == 1 else f"{rel.parent.as_posix()}#{n}",
            "image": s.files[0] if s.n_slices == 1 else list(s.files),
            "patient": s.patient_id, "study": s.study_uid, "series": s.series_uid, "view": s.view,
            "laterality": s.laterality}
        if s.n_slices > 1 and root.is_dir():
            label = _series_label_map(first.parent, root)
            if label is not None:
                it["mask"] = label
        items.append(it)
    info = {"n_files": scan.n_files, "hidden": scan.hidden, "series": [
        {"files": s.n_slices, "shape": list(s.shape), "spacing": [round(v, 4) for v in s.spacing],
         "modality": s.modality} for s in scan.series]}
    kind = "ct3d" if volumes and len(volumes) == len(scan.series) else "gray2d"
    return _finish(root, "dicom", kind, _clean(items, anon), scan.bad, [], lenient, info)


def read_nifti(root: Path, anon: Anonymizer, *, lenient: bool = False) -> Source:
    """NIfTI volumes and label maps: a single file, ``imagesTr/`` + ``labelsTr/`` (Decathlon), or folders each
    holding an image (``ct|mr|image*.nii.gz``) and ``labels.nii.gz`` / ``label*.nii.gz``."""
    items, bad, hidden = [], [], 0
    if root.is_file():
        items.append({"id": root.name, "image": str(root)})
    elif (root / "imagesTr").is_dir():
        found = visible_files(root, NIFTI_SUFFIXES)
        hidden = found.hidden
        for img in (p for p in found.files if p.parent == root / "imagesTr"):
            lab = root / "labelsTr" / img.name
            items.append({"id": img.name, "image": str(img), **({"mask": str(lab)} if lab.is_file() else {})})
    else:
        found = visible_files(root, NIFTI_SUFFIXES)
        hidden = found.hidden
        for folder in sorted({p.parent for p in found.files}):
            niis = [p for p in found.files if p.parent == folder]
            labels = [p for p in niis if _is_label_map(p)]
            images = [p for p in niis if p not in labels]
            if folder.name in ("masks", "labels"):
                continue
            if not images:
                bad.append(BadItem(str(folder), "label map(s) but no image volume"))
                continue
            for img in images:
                it = {"id": str(img.relative_to(root)), "image": str(img)}
                if len(labels) == 1:
                    it["mask"] = str(labels[0])
                items.append(it)
    return _finish(root, "nifti", "ct3d", _clean(items, anon), bad, [], lenient, {"hidden": hidden})


def read_tiff(root: Path, anon: Anonymizer, *, lenient: bool = False, patch_size: int = 256,
              tissue_threshold: float = 0.1) -> Source:
    """Large TIFF histology images cut into ``patch_size`` patches (see :mod:`medsim.data.histology`)."""
    from medsim.data.histology import patch_grid

    found = visible_files(root, (".tif", ".tiff", ".svs")) if root.is_dir() else None
    files = [root] if found is None else found.files
    items, bad = [], []
    for f in files:
        try:
            items.extend(patch_grid(f, (patch_size, patch_size), tissue_threshold=tissue_threshold))
        except DataError as e:
            bad.extend(e.items)
    return _finish(root, "tiff", "rgb2d", _clean(items, anon), bad, [], lenient,
                   {"slides": len(files), "patch_size": patch_size, "hidden": found.hidden if found else 0})


def read_image_file(path: Path, anon: Anonymizer, *, lenient: bool = False) -> Source:
    """One 2D image file (PNG, JPEG, BMP, TIFF, …) as a one-item source; ``kind`` from its mode (gray2d for
    single-channel images and grayscale saved as RGB, else rgb2d). Decoding problems are found by validation."""
    if not path.is_file():
        raise DataError(path, "the image layout reads one image file; for a folder use --layout folder or auto")
    items = [{"id": path.name, "image": str(path)}]
    return _finish(path, "image", _guess_kind(items), _clean(items, anon), [], [], lenient)


# --------------------------------------------------------------------------------------------------- entry
_READERS: dict[str, Callable[..., Source]] = {
    "ham10000": read_ham10000, "isic2019": read_isic2019, "folder": read_folder, "csv": read_csv_datalist,
    "dicom": read_dicom_source, "nifti": read_nifti, "tiff": read_tiff, "image": read_image_file}

#: a single TIFF at least this wide and high is a slide cut into patches (tiff layout), a smaller one an image
_SLIDE_MIN_SIDE = 256


def _is_label_map(p: Path) -> bool:
    return p.name.lower().startswith(("label", "seg", "mask")) or p.parent.name in ("masks", "labels", "labelsTr")


def _series_label_map(series_folder: Path, root: Path) -> str | None:
    """The one NIfTI label map beside a DICOM series: in its folder, else in its parent while still under
    ``root`` (``case/slices/*.dcm`` + ``case/labels.nii.gz``)."""
    for folder in (series_folder, series_folder.parent):
        if folder != series_folder and root.resolve() not in (folder.resolve(), *folder.resolve().parents):
            break
        maps = [p for p in folder.glob("*.nii*") if _is_label_map(p)]
        if len(maps) == 1:
            return str(maps[0])
    return None


def _single_file_layout(path: Path) -> str:
    """csv for a ``.csv`` name; otherwise what the content is (:func:`medsim.files.file_format`): nifti, dicom,
    tiff for a slide (``.svs``, or a TIFF of at least one patch a side), image for any other 2D image."""
    if path.name.lower().endswith(".csv"):
        return "csv"
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    fmt = file_format(path)
    if fmt in ("nifti", "dicom"):
        return fmt
    if path.suffix.lower() == ".svs" or (fmt == "tiff" and _is_slide_sized(path)):
        return "tiff"
    if fmt in FORMAT_NAMES:
        return "image"
    raise DataError(path, "cannot tell what this file is: its content is no PNG, JPEG, TIFF, BMP, NIfTI or "
                          "DICOM file and its name is not a .csv datalist (or pass --layout)")


def _is_slide_sized(path: Path) -> bool:
    try:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # the header only: the size, no pixels
                return min(im.size) >= _SLIDE_MIN_SIDE
    except Exception:  # noqa: BLE001 - a TIFF PIL cannot open (e.g. a BigTIFF slide): the slide reader decides
        return True


def detect_layout(path: Path) -> str:
    """Guess the layout of ``path`` from the files it holds; raise a DataError saying what was looked for."""
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_file():
        return _single_file_layout(path)
    if (path / "HAM10000_metadata.csv").is_file():
        return "ham10000"
    if (path / "ISIC_2019_Training_GroundTruth.csv").is_file():
        return "isic2019"
    niis = [p for p in (*path.glob("*.nii*"), *path.glob("*/*.nii*")) if not p.name.startswith(".")
            and not p.parent.name.startswith(".")]

    def has_dicom() -> bool:  # hidden files (AppleDouble ._x.dcm) are no evidence
        return any(p.suffix.lower() in (".dcm", ".dicom", ".ima") for p in visible_files(path).files)

    if niis and all(_is_label_map(p) for p in niis) and has_dicom():
        return "dicom"  # a DICOM series with its label map as NIfTI (e.g. slices/ + labels.nii.gz)
    if (path / "imagesTr").is_dir() or niis:
        return "nifti"
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    csvs = [p for p in files if p.suffix.lower() == ".csv"]
    if len(csvs) == 1:
        return "csv"
    if has_dicom():
        return "dicom"
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for d in subdirs
                       for p in d.iterdir()):
        return "folder"
    if any(p.suffix.lower() in (".tif", ".tiff", ".svs") for p in files):
        return "tiff"
    raise DataError(path, "cannot tell the dataset layout: expected HAM10000_metadata.csv, "
                          "ISIC_2019_Training_GroundTruth.csv, one CSV datalist, class sub-folders of images, "
                          "DICOM files, NIfTI volumes or TIFF slides (or pass --layout)")


def open_source(path: str | os.PathLike, *, layout: str = "auto", lenient: bool = False,
                anonymizer: Anonymizer | None = None, salt_file: str | os.PathLike | None = None,
                **options: Any) -> Source:
    """Read a dataset into a checked datalist.

    Args:
        path: dataset folder, CSV datalist, DICOM file/folder, NIfTI file/folder or TIFF slide(s).
        layout: one of :data:`LAYOUTS` or ``"auto"``.
        lenient: skip bad rows/files and list them in ``Source.bad`` instead of raising.
        anonymizer: hashes identifiers; by default one keyed with the project salt (``$MEDSIM_SALT`` or
            ``salt_file``, default :func:`medsim.data.phi.salt_path`).
        options: layout-specific (``image_column``, ``label_column``, ``classes`` for CSV; ``patch_size``,
            ``tissue_threshold`` for TIFF).
    """
    from medsim.data.phi import load_or_create_salt

    p = Path(path)
    if layout == "auto":
        layout = detect_layout(p)
    if layout not in _READERS:
        import difflib

        close = difflib.get_close_matches(layout, LAYOUTS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DataError(p, f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}.{hint}")
    if layout == "csv" and p.is_dir():
        csvs = sorted(p.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(p, f"expected one CSV datalist in the folder, found {len(csvs)}; pass the CSV file")
        p = csvs[0]
    anon = anonymizer or Anonymizer(load_or_create_salt(salt_file))
    return _READERS[layout](p, anon, lenient=lenient, **options)


def iter_images(source: Source) -> Iterable[tuple[dict, str]]:
    """(item, path) for every image file of the source (a series yields each slice)."""
    for it in source.items:
        img = it["image"]
        for p in (img if isinstance(img, list) else [img]):
            yield it, p
