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
from typing import Any, Iterable, Sequence

import numpy as np

from medsim.deploy.engine import open_engine
from medsim.errors import atomic_write_text
from medsim.runtime.errors import DeployError
from medsim.runtime.manifest import manifest_embedding_dim

__all__ = ["read_cases", "build_index", "search_images", "SearchHits", "search_embeddings", "localize_images",
           "recall_from_hits", "case_names", "local_case_paths", "LOCAL_CASES"]

logger = logging.getLogger(__name__)

LEGACY_MODEL_FILE = "model_dir.txt"
#: beside an index: each case token's image path on the machine that built it (never inside the index itself)
LOCAL_CASES = "cases.local.json"


def read_cases(data: str | os.PathLike, *, split: str = "training") -> list[dict[str, Any]]:
    """The cases of ``data`` — what ``medsim train`` reads: one split of a ``split.json``, a dataset folder or
    CSV datalist in any layout medsim reads (HAM10000, ISIC 2019, class folders, CSV, DICOM, NIfTI), or any other
    folder of images (label = the parent folder's name).

    Each case: ``{"id": token, "uri": local path, "label", "split"?, "group"/"patient"/"study"?}``. ``id`` is an
    opaque case token (``c-<16 hex>``, keyed with the project salt); group/patient/study are hashed tokens too.
    ``uri`` is only for opening the image on this machine: :func:`build_index` keeps it out of the index.
    """
    from medsim.data.phi import project_anonymizer
    from medsim.data.splits import case_items
    from medsim.errors import MedsimError

    p = Path(data)
    anon = project_anonymizer()
    root = p if p.is_dir() else p.parent
    try:
        items = _dataset_items(p) if (p.is_dir() or p.suffix.lower() == ".csv") else None
        if items is None:
            items = case_items(p, split=split)
    except MedsimError as e:
        raise DeployError(str(e)) from e
    out = []
    for i, it in enumerate(items):
        image = it["image"]
        if isinstance(image, list):  # a DICOM series as its slice files: the case is the series folder
            folders = {str(Path(f).parent) for f in image}
            if len(folders) != 1:
                raise DeployError(f"{p}: {split} item {i}: its series spans {len(folders)} folders; one series "
                                  "per folder is needed to index it")
            image = folders.pop()
        key = it.get("id") if it.get("id") is not None else os.path.relpath(str(image), root)
        rec = {"id": anon.case_token(key), "uri": str(image), "label": it.get("label_name")}
        if p.is_file() and p.suffix.lower() == ".json":
            rec["split"] = split
        rec.update({k: it[k] for k in ("group", "patient", "study") if k in it})  # already hashed tokens
        out.append(rec)
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise DeployError(f"{p}: two cases share a case id; ids must be unique")
    return out


def _dataset_items(p: Path) -> list[dict[str, Any]] | None:
    """The items of a dataset in a layout medsim detects (as ``medsim train --dataset-dir`` reads it), or None
    for a plain folder of images no layout claims."""
    from medsim.data.sources import detect_layout, open_source
    from medsim.errors import DataError

    try:
        layout = detect_layout(p)
    except DataError:
        if p.is_dir():
            return None
        raise
    if layout == "folder" or (layout == "image" and p.is_dir()):
        return None  # class sub-folders: the folder scan below reads them the same way, any image suffix
    return open_source(p, layout=layout).items


def export_model_id(model_dir: Path) -> str:
    from medsim.deploy.preprocess import load_manifest

    man = load_manifest(model_dir)
    sha = man.get("source", {}).get("sha256")
    if not sha:
        raise DeployError(f"{model_dir}: manifest has no source checksum; re-export with `medsim export`")
    return f"{man.get('network', {}).get('class', 'model')}:{sha[:16]}"


def build_index(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                split: str = "training", kind: str = "flat", backend: str = "auto", batch_size: int = 32,
                progress: bool = True, precision: str = "fp32", local_paths: bool = True,
                **index_kwargs: Any) -> dict[str, Any]:
    """Embed the cases of ``data`` (see :func:`read_cases`) with the exported model in ``model_dir`` and save a
    CaseIndex to ``out`` (``index_kwargs``: :class:`~medsim.deploy.index.CaseIndex` parameters, e.g. ``refine=4``
    for ``ivfpq``). Options and case count are checked before any image is embedded; the index records
    ``model_dir`` in its ``info`` so ``medsim search`` finds the model.

    The index holds case tokens, labels and hashed groups — never a file name. With ``local_paths`` the image
    path of each case goes to ``out/cases.local.json`` (:data:`LOCAL_CASES`), which ``search`` uses to show the
    pictures on this machine; ``local_paths=False`` (``--shareable``) builds an index to hand to someone else."""
    from medsim.deploy.index import CaseIndex
    from medsim.deploy.preprocess import load_manifest

    model_dir = Path(model_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeployError(f"{out}: is a file; --out names the index folder")
    cases = read_cases(data, split=split)
    dim = manifest_embedding_dim(load_manifest(model_dir))
    try:
        index = CaseIndex(dim, kind=kind, model_id=export_model_id(model_dir), **index_kwargs)
    except ValueError as e:
        raise DeployError(f"index options: {e}") from e
    if len(cases) < index.min_train_size:
        raise DeployError(f"{data}: {len(cases)} case(s) in '{split}', but a {kind} index needs at least "
                          f"{index.min_train_size} to train its quantizers (2**nbits codes); use --kind flat "
                          "(exact, and fast for collections this small) or hnsw")
    index.info["model_dir"] = str(model_dir.resolve())
    index.info["precision"] = precision
    with open_engine(model_dir, backend, precision, batch_size=batch_size) as engine:
        emb = _embed(engine, [c["uri"] for c in cases], batch_size, progress)["embedding"]
        used = engine.backend
    try:
        index.add(emb, [{k: v for k, v in c.items() if k != "uri"} for c in cases])
    except ValueError as e:
        raise DeployError(f"{data}: {e}") from e
    path = index.save(out)
    local = Path(out) / LOCAL_CASES
    if local_paths:
        atomic_write_text(local, json.dumps({"cases": {c["id"]: c["uri"] for c in cases}}, indent=1))
    else:
        local.unlink(missing_ok=True)  # an earlier build's paths belong to other cases
    return {"index": str(path), "cases": len(cases), "kind": kind, "backend": used,
            "local_paths": str(local) if local_paths else None}


def local_case_paths(index_dir: str | os.PathLike) -> dict[str, str]:
    """``{case token: image path}`` from an index's ``cases.local.json`` ({} when it has none: a shareable
    index, or one from another machine)."""
    f = Path(index_dir) / LOCAL_CASES
    if not f.is_file():
        return {}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        cases = doc.get("cases") if isinstance(doc, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeployError(f"{f}: cannot be read ({e})") from e
    if not isinstance(cases, dict):
        raise DeployError(f"{f}: not a local paths file (an object with a 'cases' mapping)")
    return {str(k): str(v) for k, v in cases.items()}


def _embed(engine: Any, uris: Sequence[str], batch_size: int, progress: bool, sizes: bool = False
           ) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    parts: list[dict[str, np.ndarray]] = []
    for i in tqdm(range(0, len(uris), batch_size), desc="embedding", unit="batch", disable=not progress,
                  leave=False):
        parts.append(engine.embed(list(uris[i:i + batch_size]), return_sizes=sizes))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _index_model_dir(index_dir: Path, model_dir: str | os.PathLike | None) -> Path:
    """The export folder to embed queries with: ``model_dir`` when given, else the one the index records."""
    if model_dir is not None:
        return Path(model_dir)
    from medsim.deploy.index import META_FILE

    meta_path = index_dir / META_FILE
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8")).get("info") or {}
        recorded = info.get("model_dir") if isinstance(info, dict) else None
    except (OSError, ValueError, AttributeError):
        recorded = None  # CaseIndex.load reports what is wrong with the file
    legacy = index_dir / LEGACY_MODEL_FILE  # indexes built before the folder was kept in case_index.json
    if not recorded and legacy.is_file():
        recorded = legacy.read_text(encoding="utf-8").strip()
    if not recorded:
        raise DeployError(f"{index_dir}: the index does not record which model built it; pass --model DIR")
    if not Path(recorded).is_dir():
        raise DeployError(f"{index_dir}: built with the model in {recorded}, which is not there any more; "
                          "pass --model DIR (the same export) or rebuild the index")
    return Path(recorded)


def search_images(index_dir: str | os.PathLike, images: Sequence[str | os.PathLike], *, k: int = 5,
                  model_dir: str | os.PathLike | None = None, html: str | os.PathLike | None = None,
                  labels: Sequence[str | None] | None = None, backend: str = "auto",
                  precision: str | None = None, query_ids: Sequence[str | None] | None = None,
                  exclude_self: bool = False, recheck: bool = True) -> SearchHits:
    """Nearest cases of each query image: ``[[Hit, ...], ...]`` (best first). ``html`` writes a picture page
    (a ``.png`` name: one grid image instead); ``labels`` (one per query) colour the frames of matching hits.

    ``exclude_self`` (leave-one-out, needs ``query_ids``: the queries' case tokens) drops a hit that is the query's
    own case, so a query taken from the indexed cases is not counted as its own top hit.

    ``recheck``: queries embedded at bf16/INT8 (``precision``) against an index of fp32 embeddings (cosine) are
    embedded again in fp32 where their k-th and (k+1)-th hits are closer than the export's calibrated margin
    (:mod:`medsim.runtime.ties`), so the top-k is fp32's for all but a calibrated share of queries; the result's
    ``rechecked`` lists those queries, and ``recheck_note`` says why none were when the recheck could not apply."""
    from medsim.deploy.index import CaseIndex

    index_dir = Path(index_dir)
    if index_dir.is_file():  # the case_index.json itself
        index_dir = index_dir.parent
    if exclude_self and (query_ids is None or len(query_ids) != len(images)):
        raise DeployError("exclude_self needs the case id of every query (queries from a split or dataset)")
    mdir = _index_model_dir(index_dir, model_dir)
    index = CaseIndex.load(index_dir, expected_model_id=export_model_id(mdir))
    if precision is None:  # queries are embedded like the cases were
        precision = str(index.info.get("precision", "fp32"))
    query_paths = [str(i) for i in images]
    with open_engine(mdir, backend, precision) as engine:
        emb = engine.embed(query_paths)["embedding"]
        margin, note = _recheck_margin(engine, index, recheck)
        fp32_backend = engine.backend if engine.backend in ("openvino", "ort-cpu") else "auto"
    if margin is None:
        hits = SearchHits(search_embeddings(index, emb, k, query_ids=query_ids, exclude_self=exclude_self))
        hits.recheck_note = note
    else:
        hits = _search_rechecked(index, emb, query_paths, k, margin, mdir, fp32_backend, query_ids, exclude_self)
    if html is not None:
        from medsim.viz.search_report import Case, search_html, search_png

        paths = local_case_paths(index_dir)
        labels = list(labels) if labels is not None else [None] * len(images)
        names = list(query_ids) if query_ids is not None else [None] * len(images)
        write = search_png if str(html).lower().endswith(".png") else search_html
        write([Case(str(q), None if lab is None else str(lab), name=name or f"#{i + 1}")
               for i, (q, lab, name) in enumerate(zip(images, labels, names))],
              [[Case(paths.get(str(h.record.get("id"))) or h.record.get("uri"), None if h.record.get("label") is None else
                     str(h.record["label"]), h.score, name=str(h.record.get("id", h.id))) for h in row]
               for row in hits], html)
    return hits


class SearchHits(list):
    """What :func:`search_images` returns: one list of hits per query (best first), and which queries the fp32
    recheck embedded again (``rechecked``: query positions; ``margin``: the score gap below which it did) or, when
    it did not apply, why (``recheck_note``; ``None`` when it was not asked for or not needed)."""

    rechecked: list[int]
    margin: float | None = None
    recheck_note: str | None = None

    def __init__(self, rows: Iterable[list[Any]] = ()):
        super().__init__(rows)
        self.rechecked = []


def _recheck_margin(engine: Any, index: Any, wanted: bool) -> tuple[float | None, str | None]:
    """The fp32-recheck margin a search with ``engine`` against ``index`` uses, or ``(None, why not)``."""
    if not wanted or engine.precision == "fp32":
        return None, None
    built = str(index.info.get("precision", "fp32"))
    if built != "fp32":
        return None, (f"no fp32 recheck: the index holds {built} embeddings (build it at fp32 for a top-k equal "
                      "to fp32's)")
    if index.metric != "ip":
        return None, "no fp32 recheck: it is calibrated for cosine indexes (metric ip), this one is l2"
    margin = engine.recheck_margin
    if margin is None:
        return None, (f"no fp32 recheck: the export records no {engine.precision} recheck margin for the "
                      f"{engine.backend} backend (re-export with this medsim)")
    return margin, None


def _search_rechecked(index: Any, emb: np.ndarray, paths: list[str], k: int, margin: float, model_dir: Path,
                      backend: str, query_ids: Sequence[str | None] | None, exclude_self: bool) -> SearchHits:
    """Search with one more hit than asked, re-embed in fp32 (``backend``) the queries whose k-th and (k+1)-th
    hits are within ``margin`` (:func:`medsim.runtime.ties.near_ties`) and search those again."""
    from medsim.runtime.ties import near_ties

    rows = search_embeddings(index, emb, k + 1, query_ids=query_ids, exclude_self=exclude_self)
    ties = np.flatnonzero(near_ties([[h.score for h in row] for row in rows], k, margin))
    if len(ties):
        with open_engine(model_dir, backend, "fp32") as fp32:
            e32 = fp32.embed([paths[i] for i in ties])["embedding"]
        again = search_embeddings(index, e32, k, exclude_self=exclude_self,
                                  query_ids=None if query_ids is None else [query_ids[i] for i in ties])
        for i, row in zip(ties.tolist(), again):
            rows[i] = row
        logger.debug("fp32 recheck: %d of %d queries had hits within %.2g of a tie", len(ties), len(rows), margin)
    hits = SearchHits(row[:k] for row in rows)
    hits.rechecked, hits.margin = ties.tolist(), margin
    return hits


def search_embeddings(index: Any, emb: np.ndarray, k: int, *, query_ids: Sequence[str | None] | None = None,
                      exclude_self: bool = False) -> list[list[Any]]:
    """The ``k`` nearest cases of each query embedding (N, D) in a loaded :class:`~medsim.deploy.index.CaseIndex`:
    what :func:`search_images` (``medsim search``) and the MONAI Label app's ``similar_cases`` both return.
    ``exclude_self`` drops a hit whose case id is the query's own (``query_ids[i]``)."""
    if exclude_self:
        if query_ids is None or len(query_ids) != len(emb):
            raise DeployError("exclude_self needs the case id of every query")
        return [[h for h in row if h.record.get("id") != qid][:k]
                for row, qid in zip(index.search(emb, min(k + 1, len(index))), query_ids)]
    return index.search(emb, k)


def recall_from_hits(labels: Sequence[Any], hits: Sequence[Sequence[Any]], ks: Sequence[int]) -> dict[str, float]:
    """Recall@K of a search: the share of labelled queries with a same-label case among their first K hits
    (``labels[i]`` is query i's label, None = unlabelled and skipped; hits from :meth:`CaseIndex.search`)."""
    scored = [(lab, row) for lab, row in zip(labels, hits) if lab is not None]
    if not scored:
        return {}
    return {f"R@{k}": float(np.mean([any(h.record.get("label") == lab for h in row[:k]) for lab, row in scored]))
            for k in ks}


def _read_mask(path: str | os.PathLike, image: str | os.PathLike) -> np.ndarray:
    """A ground-truth mask file → (H, W) array as stored (0/1 or 0/255 both work downstream)."""
    from medsim.errors import DataError
    from medsim.files import open_image

    try:
        m = open_image(path)  # the data layer's pixel limit: a mask can be a decompression bomb too
    except DataError as e:
        raise DeployError(f"{path}: ground-truth mask for {image} cannot be read ({e.reason})") from None
    with m:
        return np.asarray(m.convert("L"))


def display_image(path: str | os.PathLike, kind: str) -> np.ndarray:
    """(H, W, 3) uint8 background for an overlay: PIL for ordinary images; DICOM / NIfTI (gray2d) through the
    runtime's reader, min–max scaled to 0..255."""
    from medsim.deploy.preprocess import read_image

    img = read_image(path, kind)  # (C, x, y), source units
    arr = np.transpose(img, (2, 1, 0)).astype(np.float64)  # (H, W, C)
    if img.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= 0.0 and hi <= 255.0 and str(path).lower().endswith(_PIL_SUFFIXES)):
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return arr[..., :3].round().clip(0, 255).astype(np.uint8)


_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def localize_images(model_dir: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                    masks: Sequence[str | os.PathLike | None] | None = None, threshold: str | float = "otsu",
                    backend: str = "auto", progress: bool = True, precision: str = "fp32",
                    local_paths: bool = True, engine: Any = None) -> dict[str, Any]:
    """Localize lesions in ``images`` from the model's attention; writes ``<stem>_mask.png``,
    ``<stem>_boxes.json``, ``<stem>_overlay.png`` under ``out``, where ``<stem>`` is the image's opaque case
    token (:func:`case_names`: file names can carry patient names), and with ``local_paths`` an
    ``out/cases.local.json`` saying which input each token is (3D models: ``<stem>_mask.nii.gz``,
    ``<stem>_heatmap.nii.gz``, boxes and a peak-slice overlay, see :func:`medsim.deploy.volume.localize_volumes`).
    With ground-truth ``masks`` also ``localization.json`` / ``localization.md`` (mean Dice, IoU, pointing game,
    box hit rate over the images whose mask is not empty). ``engine``: an open
    :class:`~medsim.deploy.EmbeddingEngine` of ``model_dir`` to use (and leave open) instead of opening one."""
    from medsim.deploy.localizer import Localizer, box_hit, dice, iou, pointing_game
    from medsim.deploy.preprocess import load_manifest

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeployError(f"{out}: is a file; --out names a folder for masks, boxes and overlays")
    images = [Path(i) for i in images]
    if masks is not None and len(masks) != len(images):
        raise DeployError(f"{len(masks)} ground-truth masks for {len(images)} images; give one per image")
    loc = Localizer(threshold=threshold)
    manifest = load_manifest(Path(model_dir))
    kind = str(manifest["preprocessing"].get("kind", "rgb2d"))
    names = case_names(images)

    def finish(summary: dict[str, Any]) -> dict[str, Any]:
        if local_paths:  # which input each output name is — for this machine only
            atomic_write_text(out / LOCAL_CASES, json.dumps({"cases": dict(zip(names, map(str, images)))}, indent=1))
        return {**summary, "names": names}

    if kind == "ct3d":
        from medsim.deploy.volume import localize_volumes

        with _engine(engine, model_dir, backend, precision, batch_size=1) as eng:
            rows = localize_volumes(eng, images, out, loc, names=names, masks=masks, progress=progress)
        return finish(_localization_summary(rows, out))
    from medsim.runtime.geometry import geometry_from_manifest

    geometry = geometry_from_manifest(manifest, where=str(model_dir))  # None (stretch, warned) for old exports
    with _engine(engine, model_dir, backend, precision) as eng:
        res = _embed(eng, [str(i) for i in images], 32, progress, sizes=True)
    rows = []
    for i, img in enumerate(images):
        size = tuple(int(v) for v in res["image_size"][i])
        result = loc.localize(res["attention"][i], size, geometry)
        loc.save(result, out, names[i], image=display_image(img, kind))
        row: dict[str, Any] = {"image": names[i], "boxes": len(result.boxes)}
        if masks is not None and masks[i] is not None:
            gt = _read_mask(masks[i], img)
            if gt.shape != size:
                raise DeployError(f"{masks[i]}: mask is {gt.shape[1]}x{gt.shape[0]}, image {img} is "
                                  f"{size[1]}x{size[0]}")
            if not gt.any():
                row["empty_mask"] = True  # no lesion to find: not scored (pointing/box hit are undefined)
            else:
                row.update(dice=dice(result.mask, gt), iou=iou(result.mask, gt),
                           pointing=float(pointing_game(result.heatmap, gt)),
                           box_hit=float(box_hit(result.boxes, gt)))
        rows.append(row)
    return finish(_localization_summary(rows, out))


def _engine(engine: Any, model_dir: str | os.PathLike, backend: str, precision: str, **kwargs: Any) -> Any:
    """``engine`` itself (left open: its owner closes it) or a new engine of ``model_dir`` closed on exit."""
    import contextlib

    return contextlib.nullcontext(engine) if engine is not None else open_engine(Path(model_dir), backend,
                                                                                 precision, **kwargs)


def case_names(images: Sequence[str | os.PathLike]) -> list[str]:
    """Opaque output names for input images: the case token of each absolute path (``c-<16 hex>``, keyed with
    the project salt), so output file names never repeat a file name that may carry a patient's name or MRN."""
    from medsim.data.phi import project_anonymizer

    anon = project_anonymizer()
    return [anon.case_token(str(Path(p).resolve())) for p in images]


def file_stem(path: Path) -> str:
    """A file name without its image suffix (``.nii.gz`` counted as one): ``ct.nii.gz`` → ``ct``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _localization_summary(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Mean metrics over the scored rows; ``localization.json`` / ``.md`` when any row has a mask."""
    summary: dict[str, Any] = {"images": len(rows), "out": str(out)}
    scored = [r for r in rows if "dice" in r]
    empty = sum(1 for r in rows if r.get("empty_mask"))
    if empty:
        summary["empty_masks"] = empty
    if scored:
        summary["scored"] = len(scored)
        summary.update({m: float(np.mean([r[m] for r in scored])) for m in ("dice", "iou", "pointing", "box_hit")})
    if scored or empty:
        atomic_write_text(out / "localization.json", json.dumps({"summary": summary, "images": rows}, indent=1))
        md = "| images scored | Dice | IoU | pointing game | box hit |\n|---|---|---|---|---|\n"
        md += (f"| {len(scored)} | {summary['dice']:.3f} | {summary['iou']:.3f} | {summary['pointing']:.3f} | "
               f"{summary['box_hit']:.3f} |\n" if scored else "| 0 | – | – | – | – |\n")
        if empty:
            md += f"\n{empty} image(s) with an empty ground-truth mask were not scored.\n"
        atomic_write_text(out / "localization.md", md)
    return summary
