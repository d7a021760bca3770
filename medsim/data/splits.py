"""Group-aware, stratified train/validation/test splits saved as a datalist JSON.

All images of one lesion (``group``) or one patient (``patient``) land in one split, so retrieval is never
scored on near-duplicates of training images; class proportions are kept as far as the groups allow
(scikit-learn's ``StratifiedGroupKFold``). The JSON follows MONAI's datalist format (``training``,
``validation``, ``test`` lists, read by ``monai.data.load_decathlon_datalist``) with paths relative to the
dataset folder and a ``meta`` block recording how it was made, so a run can be reproduced exactly.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import DataError, MedsimError, atomic_write_text

__all__ = ["split_items", "save_split", "load_split", "SPLIT_KEYS", "GROUP_ALIASES"]

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
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(iter(cv.split(np.zeros(len(labels)), labels, groups)))
    return rest, held


def split_items(items: Sequence[dict], *, by: str = "group", fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> dict[str, list[dict]]:
    """Split ``items`` into training / validation / test by whole groups.

    Args:
        items: datalist items (with ``label`` for stratification when present).
        by: the grouping: an item key or alias (``lesion_id`` → ``group``, ``patient_id`` → ``patient``).
            Items lacking it form a group of their own.
        fractions: (train, val, test), summing to 1; a 0 skips that split.
        seed: fixes the assignment.
    """
    key = GROUP_ALIASES.get(by, by)
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise MedsimError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if not items:
        raise MedsimError("no items to split")
    missing = sum(1 for it in items if it.get(key) is None)
    if missing == len(items) and key != "id":
        raise MedsimError(f"no item has '{by}' (item key '{key}'); available keys: "
                          f"{', '.join(sorted(set().union(*items)))}")
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


def save_split(splits: dict[str, list[dict]], path: str | os.PathLike, *, dataset_dir: str | os.PathLike,
               meta: dict[str, Any] | None = None) -> Path:
    """Write the split as a MONAI datalist JSON (atomically), image/mask paths relative to ``dataset_dir``."""
    root = Path(dataset_dir).resolve()
    doc: dict[str, Any] = {"meta": {**(meta or {}), "dataset_dir": str(root),
                                    "counts": {k: len(v) for k, v in splits.items()}}}
    for k, v in splits.items():
        doc[k] = [{**it, **{f: _relative(it[f], root) for f in ("image", "mask") if f in it}} for it in v]
    return atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False))


def load_split(path: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a split JSON; paths are made absolute against ``dataset_dir`` (default: the one recorded)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(p, "split file not found (make one with `medsim data split`)") from e
    except json.JSONDecodeError as e:
        raise DataError(p, f"not valid JSON (line {e.lineno}: {e.msg})") from e
    root = Path(dataset_dir or doc.get("meta", {}).get("dataset_dir", p.parent))

    def absolute(v: Any) -> Any:
        return [absolute(x) for x in v] if isinstance(v, list) else str(root / v)

    for k in SPLIT_KEYS:
        for it in doc.get(k, []):
            for f in ("image", "mask"):
                if f in it:
                    it[f] = absolute(it[f])
    return doc


def split_summary(splits: dict[str, list[dict]], by: str) -> dict[str, Any]:
    """Counts per split: items, groups, classes."""
    key = GROUP_ALIASES.get(by, by)
    return {k: {"items": len(v), "groups": len({it.get(key) for it in v}),
                "classes": dict(sorted(Counter(it.get("label_name") for it in v).items(), key=str))}
            for k, v in splits.items()}
