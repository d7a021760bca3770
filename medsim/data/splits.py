"""Group-aware, stratified train/validation/test splits saved as a datalist JSON.

All images of one lesion (``group``) or one patient (``patient``) land in one split, so retrieval is never
scored on near-duplicates of training images; class proportions are kept as far as the groups allow
(scikit-learn's ``StratifiedGroupKFold``). The JSON follows MONAI's datalist format (``training``,
``validation``, ``test`` lists, read by ``monai.data.load_decathlon_datalist``) with paths relative to the
dataset folder and a ``meta`` block recording how it was made, so a run can be reproduced exactly.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import DataError, MedsimError, atomic_write_text

__all__ = ["split_items", "save_split", "load_split", "copy_split", "local_paths_file", "LOCAL_SUFFIX", "grouping_key",
           "check_reused_split", "SPLIT_KEYS", "GROUP_ALIASES"]

logger = logging.getLogger(__name__)

SPLIT_KEYS = ("training", "validation", "test")
#: names a user may give for ``--by`` -> the item key holding that grouping
GROUP_ALIASES = {"lesion_id": "group", "lesion": "group", "group": "group", "patient_id": "patient",
                 "patient": "patient", "study": "study", "series": "series", "image": "id", "none": "id"}


def _fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with ≈ ``fraction`` held out, whole groups only, stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise MedsimError(f"only {n_groups} distinct groups: too few to hold out {fraction:.0%} of them "
                          f"(needs at least {n_splits}); use larger fractions or more data")
    if np.unique(labels, return_counts=True)[1].max() < n_splits:
        # sklearn refuses when every class has fewer members than folds (a handful of images per class): split
        # by group without stratifying rather than stop
        logger.warning("every class has fewer than %d items: holding out %.0f%% without keeping class proportions",
                       n_splits, 100 * fraction)
        labels = np.zeros_like(labels)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class smaller than n_splits is only kept roughly in proportion: expected
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest, held = next(iter(cv.split(np.zeros(len(labels)), labels, groups)))
    return rest, held


#: groupings a layout may simply not have (a folder of class sub-folders, a CSV without a lesion/patient column):
#: splitting falls back to one group per image, with a warning, instead of stopping
FALLBACK_GROUPINGS = ("group", "patient")


def grouping_key(items: Sequence[dict], by: str) -> str:
    """The grouping ``split_items`` will use for ``by``: ``by`` itself, or ``"image"`` (one group per image, logged
    as a warning) when no item carries a lesion/patient grouping — the layout has no such column.

    Raises:
        MedsimError: no item has ``by`` and it is not a lesion/patient grouping (e.g. ``study`` on 2D images).
    """
    key = GROUP_ALIASES.get(by, by)
    if key == "id" or any(it.get(key) is not None for it in items):
        return by if by in GROUP_ALIASES else key
    if key in FALLBACK_GROUPINGS:
        logger.warning("no item has a '%s' grouping (this layout has no %s column): splitting per image, so images "
                       "of one %s may land in different splits", by, by, "lesion" if key == "group" else "patient")
        return "image"
    raise MedsimError(f"no item has '{by}' (item key '{key}'); available keys: "
                      f"{', '.join(sorted(set().union(*items)))}")


def split_items(items: Sequence[dict], *, by: str = "group", fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> dict[str, list[dict]]:
    """Split ``items`` into training / validation / test by whole groups.

    Args:
        items: datalist items (with ``label`` for stratification when present).
        by: the grouping: an item key or alias (``lesion_id`` → ``group``, ``patient_id`` → ``patient``).
            Items lacking it form a group of their own; when no item has a lesion/patient grouping the split is
            per image (see :func:`grouping_key`, which tells the grouping actually used).
        fractions: (train, val, test), summing to 1; a 0 skips that split.
        seed: fixes the assignment.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise MedsimError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if not items:
        raise MedsimError("no items to split")
    used = grouping_key(items, by)
    key = GROUP_ALIASES.get(used, used)
    groups = np.array([str(it.get(key) if it.get(key) is not None else f"__item{i}") for i, it in
                       enumerate(items)])
    labels = np.array([it.get("label", 0) for it in items])
    idx = np.arange(len(items))
    out: dict[str, np.ndarray] = {}
    rest = idx
    if fr[2] > 0:
        r, h = _fold(labels[rest], groups[rest], fr[2], seed)
        out["test"], rest = rest[h], rest[r]
    if fr[1] > 0:
        r, h = _fold(labels[rest], groups[rest], fr[1] / (fr[0] + fr[1]), seed + 1)
        out["validation"], rest = rest[h], rest[r]
    out["training"] = rest
    return {k: [dict(items[i]) for i in sorted(out[k])] for k in SPLIT_KEYS if k in out}


def _relative(value: Any, root: Path) -> Any:
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    try:
        return Path(os.path.relpath(value, root)).as_posix()
    except ValueError:  # another drive
        return value


LOCAL_SUFFIX = ".local.json"


def local_paths_file(split_file: str | os.PathLike) -> Path:
    """Where a split's image paths live on the machine that made it: ``split.json`` → ``split.local.json``."""
    p = Path(split_file)
    return p.with_name((p.name[:-5] if p.name.endswith(".json") else p.name) + LOCAL_SUFFIX)


def save_split(splits: dict[str, list[dict]], path: str | os.PathLike, *, dataset_dir: str | os.PathLike,
               meta: dict[str, Any] | None = None) -> Path:
    """Write the split (atomically) as a MONAI-style datalist JSON that holds no file name in clear.

    ``path`` gets each case's opaque token (``id``), label and hashed groups — shareable, reproducible. The image
    and mask paths (relative to ``dataset_dir``) and the dataset folder go to ``local_paths_file(path)``
    (``split.local.json``) beside it: file names and folders can carry patient names or MRNs, so they stay on the
    machine that reads the images. :func:`load_split` joins the two. The local file is itself a MONAI datalist
    (``training``/``validation``/``test`` lists of ``{"id", "image", "mask"?, "label"?}``, paths relative to its
    ``dataset_dir``), so ``monai.data.load_decathlon_datalist(local, base_dir=dataset_dir)`` reads it.
    """
    from medsim.data.phi import project_anonymizer

    root = Path(dataset_dir).resolve()
    anon = project_anonymizer()
    meta = dict(meta or {})
    source = meta.pop("source", str(root))
    meta["source_token"] = anon(str(Path(source).resolve()), "d")
    doc: dict[str, Any] = {"meta": {**meta, "counts": {k: len(v) for k, v in splits.items()}}}
    local: dict[str, Any] = {"dataset_dir": str(root), "source": str(source)}
    seen: set[str] = set()
    for k, v in splits.items():
        doc[k], local[k] = [], []
        for it in v:
            token = anon.case_token(it.get("id") if it.get("id") is not None else _relative(it["image"], root))
            if token in seen:
                raise MedsimError(f"two cases share the id token {token} (ids must be unique within a dataset)")
            seen.add(token)
            local[k].append({"id": token, **{f: _relative(it[f], root) for f in ("image", "mask") if f in it},
                             **({"label": it["label"]} if "label" in it else {})})
            doc[k].append({**{f: x for f, x in it.items() if f not in ("image", "mask")}, "id": token})
    atomic_write_text(local_paths_file(path), json.dumps(local, indent=1))
    return atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False))


def copy_split(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a split JSON and its ``split.local.json`` (when there) to ``dst`` — a run folder reusing a shared
    split needs both to open the images."""
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    if local_paths_file(src).is_file():
        shutil.copy(local_paths_file(src), local_paths_file(dst))
    return dst


def load_split(path: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None,
               require_paths: bool = True) -> dict[str, Any]:
    """Read a split JSON and join the image/mask paths of its ``split.local.json`` (absolute, against
    ``dataset_dir``, default: the one recorded there). The returned ``meta`` has ``dataset_dir`` and ``source``
    from the local file when it is there.

    Raises:
        DataError: the file is missing or not JSON, is not an object, a split is not a list, an item is not an
            object with an ``id`` (or a legacy ``image``), or (``require_paths``) the local paths file that holds
            the images is not on this machine (the message names the split and item index).
    """
    p = Path(path)
    doc = _read_json(p, "split file not found (make one with `medsim data split`)")
    if not isinstance(doc, dict):
        raise DataError(p, f"a split JSON is an object with {', '.join(SPLIT_KEYS)} lists, got a "
                           f"{type(doc).__name__}")
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    doc["meta"] = meta
    lp = local_paths_file(p)
    local = _read_json(lp, "") if lp.is_file() else {}
    if not isinstance(local, dict) or not all(isinstance(local.get(k, []), list) for k in SPLIT_KEYS):
        raise DataError(lp, "not a split's local paths file (an object with 'dataset_dir' and split lists)")
    for key in ("dataset_dir", "source"):
        if isinstance(local.get(key), str):
            meta[key] = local[key]
    cases = {str(c.get("id")): c for k in SPLIT_KEYS for c in local.get(k, []) if isinstance(c, dict)}
    root = Path(dataset_dir or meta.get("dataset_dir", p.parent))

    def absolute(v: Any) -> Any:
        return [absolute(x) for x in v] if isinstance(v, list) else str(root / v)

    for k in SPLIT_KEYS:
        items = doc.get(k, [])
        if not isinstance(items, list):
            raise DataError(p, f"'{k}' must be a list of items, got a {type(items).__name__}", field=k)
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not (isinstance(it.get("id"), str) or it.get("image")):
                raise DataError(p, "each item must be an object with an 'id' (or an 'image' path), got "
                                   f"{json.dumps(it)[:80]}", row=i, field=k)
            if "image" not in it and isinstance(cases.get(it.get("id")), dict):
                it.update({f: x for f, x in cases[it["id"]].items() if f in ("image", "mask")})
            if "image" not in it:
                if require_paths:
                    where = (f"{lp} has no entry for it" if lp.is_file() else
                             f"they are kept in {lp} on the machine that made the split, which is not here")
                    raise DataError(p, f"no image path for case {it.get('id')}: {where}", row=i, field=k)
                continue
            if not isinstance(it["image"], (str, list)) or not it["image"]:
                raise DataError(p, f"'image' must be a path or a list of slice files, got {json.dumps(it)[:80]}",
                                row=i, field=k)
            for f in ("image", "mask"):
                if f in it:
                    it[f] = absolute(it[f])
    return doc


def check_reused_split(split_file: str | os.PathLike, doc: dict[str, Any], *, source: str | os.PathLike, by: str,
                       max_items: int | None = None, found: Sequence[str | os.PathLike] | None = None) -> None:
    """A run directory's split (``doc``, :func:`load_split` of ``split_file``) is reused (resumes, shared benchmark
    splits) only for the data it was made from: another dataset folder ``source``, grouping ``by`` or subset size —
    or, given ``found`` (the cases the dataset holds now, e.g. its volumes), cases of the split that are gone from
    it or cases it has that the split lacks — would silently train and report on the old data.

    Raises:
        MedsimError: naming ``split_file`` and every difference (the missing / extra cases by their path in the
            dataset folder).
    """
    meta = doc.get("meta") or {}
    source = str(Path(source).resolve())
    had = {"dataset": meta.get("source"), "split_by": meta.get("by"), "max_items": meta.get("max_items", max_items)}
    want = {"dataset": source, "split_by": by, "max_items": max_items}
    if had["dataset"] is not None and Path(str(had["dataset"])).resolve() == Path(source):
        had["dataset"] = source
    elif had["dataset"] is None and meta.get("source_token"):  # split.local.json not here: compare the tokens
        from medsim.data.phi import project_anonymizer

        same = project_anonymizer()(source, "d") == meta["source_token"]
        had["dataset"] = source if same else "another dataset"
    if had["split_by"] is not None and by in ("group", "lesion_id") and had["split_by"] in ("group", "lesion_id"):
        had["split_by"] = by  # aliases of the same key
    diff = [f"{k} {had[k]!r} (asked: {want[k]!r})" for k in want if had[k] is not None and had[k] != want[k]]
    if found is not None:  # the cases, by their path in their dataset folder (a moved copy is the same data)
        root = Path(str(meta.get("dataset_dir") or source)).resolve()
        listed = {Path(os.path.relpath(Path(it["image"]).resolve(), root)).as_posix()
                  for k in SPLIT_KEYS for it in doc.get(k, []) if isinstance(it.get("image"), str)}
        now = {Path(os.path.relpath(Path(f).resolve(), source)).as_posix() for f in found}
        for what, names in (("in the split but not in the dataset", listed - now),
                            ("in the dataset but not in the split", now - listed)):
            if names:
                shown = sorted(names)
                diff.append(f"{len(shown)} case(s) {what}: {', '.join(shown[:5])}"
                            + (f" and {len(shown) - 5} more" if len(shown) > 5 else ""))
    if diff:
        raise MedsimError(f"{split_file}: this run directory holds a split made for other data — {'; '.join(diff)}; "
                          "train into a new directory (--output DIR) or delete this one to start over")


def _read_json(p: Path, missing: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(p, missing or "not found") from e
    except json.JSONDecodeError as e:
        raise DataError(p, f"not valid JSON (line {e.lineno}: {e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(p, f"cannot be read ({e})") from e


#: files a folder of cases may hold (2D images, DICOM files, NIfTI volumes)
CASE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")


def case_items(data: str | os.PathLike, *, split: str = "training") -> list[dict[str, Any]]:
    """The items of one split of a split JSON (absolute paths), or every case file under a folder as
    ``{"image", "label_name"}`` (label: the parent folder's name, None for files at the top). No torch needed:
    ``medsim index build`` and ``medsim export --calib`` both read their cases with it.

    Raises:
        DataError: an unknown split, an empty folder, a path that is neither, or a malformed split JSON.
    """
    p = Path(data)
    if p.is_file() and p.name.endswith(LOCAL_SUFFIX):
        split_json = p.with_name(p.name[: -len(LOCAL_SUFFIX)] + ".json")
        raise DataError(p, f"this is a split's local paths file; give the split itself ({split_json}), which "
                           "reads it")
    if p.is_file() and p.suffix == ".json":
        doc = load_split(p)
        if split not in SPLIT_KEYS or split not in doc:
            raise DataError(p, f"no split '{split}' (has: {', '.join(k for k in SPLIT_KEYS if k in doc)})")
        return doc[split]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.name.lower().endswith(CASE_SUFFIXES) and f.is_file())
        if not files:
            raise DataError(p, f"no images found (looked for {', '.join(CASE_SUFFIXES)})")
        return [{"image": str(f), "label_name": f.parent.name if f.parent != p else None} for f in files]
    raise DataError(p, "expected a split JSON (from `medsim train` / `medsim data split`) or a folder of images")


def split_summary(splits: dict[str, list[dict]], by: str) -> dict[str, Any]:
    """Counts per split: items, groups, classes."""
    key = GROUP_ALIASES.get(by, by)
    return {k: {"items": len(v), "groups": len({it.get(key) for it in v}),
                "classes": dict(sorted(Counter(it.get("label_name") for it in v).items(), key=str))}
            for k, v in splits.items()}
