"""From a folder on disk to checked, split, transformed batches — the steps every training run starts with.

- :func:`load_checked`: read a source and open every file (strict: one error listing all bad files, before
  any training; lenient: skip them, write a report, continue).
- :func:`make_split`: that, then a group-aware split saved as a datalist JSON.
- :func:`prepare`: that, then one batch through the source's MONAI pipeline and a preview picture; with no
  source it does all of this on the embedded sample (dermoscopy-like, DICOM X-ray, CT volume).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from medsim.data.sources import Source, open_source
from medsim.data.splits import grouping_key, save_split, split_items, split_summary
from medsim.data.validate import ValidationResult, validate_source
from medsim.errors import MedsimError

__all__ = ["load_checked", "make_split", "prepare"]

logger = logging.getLogger(__name__)


def _default_report_path(source: str | os.PathLike) -> Path:
    stem = re.sub(r"[^\w.-]+", "_", Path(source).resolve().name) or "source"
    return Path(f"{stem}-skipped.json")


def load_checked(source: str | os.PathLike, *, layout: str = "auto", lenient: bool = False,
                 report_path: str | os.PathLike | None = None, decode: bool = True, progress: bool = True,
                 **options: Any) -> tuple[Source, ValidationResult]:
    """Read ``source`` and open every file. In lenient mode the skip report is written to ``report_path``
    (default ``<source name>-skipped.json`` in the working directory) and its path set on the result."""
    # strict mode still reads the table leniently when images are decoded next, so that one error lists every
    # bad row *and* every bad file (validate_source raises with both)
    src = open_source(source, layout=layout, lenient=lenient or decode, **options)
    report_path = Path(report_path) if report_path is not None else _default_report_path(source)
    if decode:
        result = validate_source(src, lenient=lenient, progress=progress, report_path=report_path)
    else:
        from medsim.errors import BadInputReport

        result = ValidationResult(BadInputReport(src.root, total=len(src.items) + len(src.bad), skipped=src.bad))
        if src.bad:
            result.report.write(report_path)
    result.report_path = report_path if result.report.skipped else None  # type: ignore[attr-defined]
    return src, result


def make_split(source: str | os.PathLike, out: str | os.PathLike, *, by: str = "lesion_id",
               fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, layout: str = "auto",
               lenient: bool = False, decode: bool = True, progress: bool = True,
               **options: Any) -> dict[str, Any]:
    """Check ``source``, split it by ``by`` and save the datalist JSON to ``out``; return per-split counts."""
    report = Path(out).with_suffix(".skipped.json")
    src, result = load_checked(source, layout=layout, lenient=lenient, report_path=report, decode=decode,
                               progress=progress, **options)
    grouped_by = grouping_key(src.items, by)  # "image" when the layout has no lesion/patient column (warned)
    splits = split_items(src.items, by=grouped_by, fractions=fractions, seed=seed)
    summary = split_summary(splits, grouped_by)
    from medsim import __version__

    save_split(splits, out, dataset_dir=src.root if Path(src.root).is_dir() else Path(src.root).parent, meta={
        "source": str(Path(source).resolve()), "layout": src.layout, "kind": src.kind, "by": by,
        "grouped_by": grouped_by, "fractions": list(fractions), "seed": seed, "classes": src.classes,
        "medsim_version": __version__, "skipped": len(result.report.skipped)})
    if result.report.skipped:
        logger.warning("%d item(s) skipped; see %s", len(result.report.skipped), report)
    return summary


def _first_batch(items: list[dict], kind: str, size: int, n: int = 8) -> tuple[Any, Any]:
    import torch
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.data.transforms import make_transforms

    with_mask = all("mask" in it for it in items[:n])
    kw: dict[str, Any] = {"with_mask": with_mask}
    if items and "location" in items[0]:  # histology patches arrive decoded from the slide
        kw["load"] = False
    if kind == "ct3d":
        kw["roi_size"] = (size, size, size)
    else:
        kw["spatial_size"] = (size, size)
    xf = make_transforms(kind, train=False, **kw)
    loader = DataLoader(make_dataset(items[:n], xf), batch_size=n, num_workers=0)
    batch = next(iter(loader))
    return torch.as_tensor(batch["image"]), (torch.as_tensor(batch["mask"]) if with_mask else None)


def _preview_items(items: list[dict], n: int = 8) -> list[dict]:
    """The items a preview shows: every class at least once (round robin over classes in order of first
    appearance), ``n`` in all — more when there are more classes than ``n``."""
    by_class: dict[Any, list[dict]] = {}
    for it in items:
        by_class.setdefault(it.get("label", it.get("label_name")), []).append(it)
    queues = list(by_class.values())
    shown: list[dict] = []
    for depth in range(max(map(len, queues), default=0)):
        shown += [q[depth] for q in queues if depth < len(q)]
        if len(shown) >= max(n, len(queues)):
            break
    return shown[: max(n, len(queues))]


def _preview(images, masks, kind: str, path: Path, captions: list[str]) -> Path:
    from medsim.viz.contact_sheet import contact_sheet

    imgs = images.numpy()
    ms = masks.numpy() if masks is not None else None
    if kind == "ct3d":  # middle axial slice of each volume
        z = imgs.shape[-1] // 2
        imgs = imgs[..., z]
        ms = ms[..., z] if ms is not None else None
    elif kind == "rgb2d":
        from medsim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        import numpy as np

        imgs = imgs * np.asarray(IMAGENET_STD)[:, None, None] + np.asarray(IMAGENET_MEAN)[:, None, None]
    return contact_sheet(list(imgs), path, masks=list(ms[:, 0]) if ms is not None else None, captions=captions)


def _prepare_one(source: Path, out: Path, name: str, *, by: str | None, size: int, lenient: bool, seed: int,
                 layout: str = "auto", **options: Any) -> list[str]:
    src, result = load_checked(source, layout=layout, lenient=lenient, report_path=out / f"{name}.skipped.json",
                               **options)
    lines = [f"[{name}] {src.layout} ({src.kind}): {len(src.items)} usable item(s)"
             + (f", {len(result.report.skipped)} skipped (report: {out / f'{name}.skipped.json'})"
                if result.report.skipped else "")]
    if src.classes:
        lines.append(f"[{name}] classes: " + ", ".join(f"{c} {n}" for c, n in src.class_counts().items()))
    if by is not None and len(src.items) >= 10:
        grouped_by = grouping_key(src.items, by)
        splits = split_items(src.items, by=grouped_by, seed=seed)
        save_split(splits, out / f"{name}_split.json", dataset_dir=src.root, meta={
            "source": str(source.resolve()), "layout": src.layout, "kind": src.kind, "by": by,
            "grouped_by": grouped_by, "seed": seed, "classes": src.classes})
        s = split_summary(splits, grouped_by)
        lines.append(f"[{name}] split by {grouped_by}: " + ", ".join(f"{k} {v['items']} ({v['groups']} groups)"
                                                             for k, v in s.items()))
    shown = _preview_items(src.items)
    images, masks = _first_batch(shown, src.kind, size, n=len(shown))
    captions = [str(it.get("label_name", it.get("view", "")) or "") for it in shown]
    pic = _preview(images, masks, src.kind, out / f"{name}_preview.png", captions)
    lines.append(f"[{name}] batch {tuple(images.shape)} {images.dtype}, range [{float(images.min()):.2f}, "
                 f"{float(images.max()):.2f}]" + (f", masks {tuple(masks.shape)}" if masks is not None else "")
                 + f"; preview: {pic}")
    return lines


def prepare(source: str | os.PathLike | None, out: str | os.PathLike, *, by: str = "lesion_id", size: int = 64,
            lenient: bool = False, seed: int = 0, layout: str = "auto", **options: Any) -> dict[str, Any]:
    """Check, split and batch ``source`` (or the embedded sample); returns ``{"lines": [...]}`` to print."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        return {"lines": _prepare_one(Path(source), out, Path(source).stem or "source", by=by, size=size,
                                      lenient=lenient, seed=seed, layout=layout, **options)}
    from medsim.data.sample import ensure_sample

    root = ensure_sample(seed=0)
    lines = [f"embedded sample: {root}"]
    lines += _prepare_one(root / "derm", out, "derm", by=by, size=size, lenient=lenient, seed=seed)
    lines += _prepare_one(root / "dicom", out, "dicom", by=None, size=size, lenient=lenient, seed=seed)
    lines += _prepare_one(root / "ct", out, "ct", by=None, size=min(size, 32), lenient=lenient, seed=seed)
    if not lines:
        raise MedsimError("nothing prepared")
    return {"lines": lines}
