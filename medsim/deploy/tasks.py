"""What ``medsim index build``, ``medsim search`` and ``medsim localize`` do, on the torch-free runtime.

- :func:`build_index`: embed a split of a run's ``split.json`` (or every image under a folder) with an exported
  model and store it in a :class:`~medsim.deploy.index.CaseIndex` next to the model's id.
- :func:`search_images`: embed query images, return their nearest cases; a terminal table and an HTML page.
- :func:`localize_images`: attention → heatmap → mask → boxes; mask/boxes/overlay files per image, and a
  Dice/IoU/pointing/box-hit table when ground-truth masks are given.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.deploy import DeployError
from medsim.errors import atomic_write_text

__all__ = ["read_cases", "build_index", "search_images", "localize_images", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
INDEX_MODEL_FILE = "model_dir.txt"


def read_cases(data: str | os.PathLike, *, split: str = "training") -> list[dict[str, Any]]:
    """Case records to index: the items of one split of a ``split.json`` (``uri``, ``label``, hashed ``group``/
    ``patient``, ``split``), or every image under a folder (label = its parent folder's name)."""
    p = Path(data)
    if p.is_file() and p.suffix == ".json":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DeployError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from e
        if split not in doc:
            raise DeployError(f"{p}: no split '{split}' (has: {', '.join(k for k in doc if k != 'meta')})")
        root = Path(doc.get("meta", {}).get("dataset_dir", p.parent))
        out = []
        for it in doc[split]:
            image = it["image"]
            if isinstance(image, list):  # a DICOM series as its slice files: the case is the series folder
                folders = {str(Path(f).parent) for f in image}
                if len(folders) != 1:
                    raise DeployError(f"{p}: a {split} item's series spans {len(folders)} folders; one series "
                                      "per folder is needed to index it")
                image = folders.pop()
            rec = {"uri": str(root / image), "label": it.get("label_name"), "split": split}
            rec.update({k: it[k] for k in ("group", "patient", "study") if k in it})  # already hashed tokens
            out.append(rec)
        return out
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.lower().endswith(IMAGE_SUFFIXES) and f.is_file())
        if not files:
            raise DeployError(f"{p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        return [{"uri": str(f), "label": f.parent.name if f.parent != p else None} for f in files]
    raise DeployError(f"{p}: expected a split JSON (from `medsim train` / `medsim data split`) or a folder of images")


def _model_id(model_dir: Path) -> str:
    from medsim.deploy.preprocess import load_manifest

    man = load_manifest(model_dir)
    sha = man.get("source", {}).get("sha256")
    if not sha:
        raise DeployError(f"{model_dir}: manifest has no source checksum; re-export with `medsim export`")
    return f"{man.get('network', {}).get('class', 'model')}:{sha[:16]}"


def build_index(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                split: str = "training", kind: str = "flat", backend: str = "auto", batch_size: int = 32,
                progress: bool = True, **index_kwargs: Any) -> dict[str, Any]:
    """Embed the cases of ``data`` with the exported model in ``model_dir`` and save a CaseIndex to ``out``
    (``index_kwargs``: :class:`~medsim.deploy.index.CaseIndex` parameters, e.g. ``refine=4`` for ``ivfpq``)."""
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.index import CaseIndex

    model_dir = Path(model_dir)
    cases = read_cases(data, split=split)
    with EmbeddingEngine(model_dir, backend=backend, batch_size=batch_size) as engine:
        emb = _embed(engine, [c["uri"] for c in cases], batch_size, progress)["embedding"]
        try:
            index = CaseIndex(emb.shape[1], kind=kind, model_id=_model_id(model_dir), **index_kwargs)
        except ValueError as e:
            raise DeployError(str(e)) from e
        index.add(emb, cases)
        used = engine.backend
    path = index.save(out)
    atomic_write_text(Path(out) / INDEX_MODEL_FILE, str(model_dir.resolve()) + "\n")
    return {"index": str(path), "cases": len(cases), "kind": kind, "backend": used}


def _embed(engine: Any, uris: Sequence[str], batch_size: int, progress: bool, sizes: bool = False
           ) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    parts: list[dict[str, np.ndarray]] = []
    for i in tqdm(range(0, len(uris), batch_size), desc="embedding", unit="batch", disable=not progress,
                  leave=False):
        parts.append(engine.embed(list(uris[i:i + batch_size]), return_sizes=sizes))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _index_model_dir(index_dir: Path, model_dir: str | os.PathLike | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    f = index_dir / INDEX_MODEL_FILE
    if not f.is_file():
        raise DeployError(f"{index_dir}: does not say which model built it; pass --model DIR")
    return Path(f.read_text(encoding="utf-8").strip())


def search_images(index_dir: str | os.PathLike, images: Sequence[str | os.PathLike], *, k: int = 5,
                  model_dir: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
                  labels: Sequence[str | None] | None = None, backend: str = "auto") -> list[list[Any]]:
    """Nearest cases of each query image: ``[[Hit, ...], ...]`` (best first). ``html`` writes a picture page."""
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.index import CaseIndex

    index_dir = Path(index_dir)
    mdir = _index_model_dir(index_dir, model_dir)
    index = CaseIndex.load(index_dir, expected_model_id=_model_id(mdir))
    with EmbeddingEngine(mdir, backend=backend) as engine:
        emb = engine.embed([str(i) for i in images])["embedding"]
    hits = index.search(emb, k)
    if html is not None:
        from medsim.viz.search_report import Case, search_html

        labels = list(labels) if labels is not None else [None] * len(images)
        search_html([Case(str(q), lab) for q, lab in zip(images, labels)],
                    [[Case(h.record.get("uri", "?"), h.record.get("label"), h.score) for h in row] for row in hits],
                    html)
    return hits


def localize_images(model_dir: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                    masks: Sequence[str | os.PathLike | None] | None = None, threshold: str | float = "otsu",
                    backend: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Localize lesions in ``images`` from the model's attention; writes ``<stem>_mask.png``,
    ``<stem>_boxes.json``, ``<stem>_overlay.png`` under ``out``. With ground-truth ``masks`` also
    ``localization.json`` / ``localization.md`` (mean Dice, IoU, pointing game, box hit rate)."""
    from PIL import Image

    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.localizer import Localizer, box_hit, dice, iou, pointing_game

    out = Path(out)
    loc = Localizer(threshold=threshold)
    with EmbeddingEngine(Path(model_dir), backend=backend) as engine:
        res = _embed(engine, [str(i) for i in images], 32, progress, sizes=True)
    rows = []
    for i, img in enumerate(images):
        size = tuple(int(v) for v in res["image_size"][i])
        result = loc.localize(res["attention"][i], size)
        stem = Path(img).stem
        with Image.open(img) as im:
            loc.save(result, out, stem, image=np.asarray(im.convert("RGB")))
        row: dict[str, Any] = {"image": str(img), "boxes": len(result.boxes)}
        if masks is not None and masks[i] is not None:
            with Image.open(masks[i]) as m:
                gt = np.asarray(m.convert("L")) > 127
            if gt.shape != size:
                raise DeployError(f"{masks[i]}: mask is {gt.shape[1]}x{gt.shape[0]}, image {img} is "
                                  f"{size[1]}x{size[0]}")
            row.update(dice=dice(result.mask, gt), iou=iou(result.mask, gt),
                       pointing=float(pointing_game(result.heatmap, gt)), box_hit=float(box_hit(result.boxes, gt)))
        rows.append(row)
    summary: dict[str, Any] = {"images": len(rows), "out": str(out)}
    scored = [r for r in rows if "dice" in r]
    if scored:
        summary.update({m: float(np.mean([r[m] for r in scored])) for m in ("dice", "iou", "pointing", "box_hit")})
        atomic_write_text(out / "localization.json", json.dumps({"summary": summary, "images": rows}, indent=1))
        atomic_write_text(out / "localization.md", "| images | Dice | IoU | pointing game | box hit |\n"
                          "|---|---|---|---|---|\n"
                          f"| {len(scored)} | {summary['dice']:.3f} | {summary['iou']:.3f} | "
                          f"{summary['pointing']:.3f} | {summary['box_hit']:.3f} |\n")
    return summary
