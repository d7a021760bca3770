"""Datasets over a datalist: plain, cached in memory, or persisted to disk, chosen by configuration.

MONAI does the work (``Dataset``, ``CacheDataset``, ``PersistentDataset``); this picks one by name so a bundle
config can switch with ``cache: "none" | "memory" | "disk"``. Histology patches (items with ``location``) go
through :func:`medsim.data.histology.patch_dataset`.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

__all__ = ["CACHE_MODES", "make_dataset"]

CACHE_MODES = ("none", "memory", "disk")


def make_dataset(items: Sequence[dict], transform: Callable | None = None, *, cache: str = "none",
                 cache_dir: str | os.PathLike | None = None, cache_rate: float = 1.0, num_workers: int = 0,
                 progress: bool = True):
    """A MONAI dataset over ``items``.

    Args:
        cache: ``"none"`` (``monai.data.Dataset``), ``"memory"`` (``CacheDataset``: deterministic transforms run
            once, kept in RAM) or ``"disk"`` (``PersistentDataset`` under ``cache_dir``, reused across runs).
        cache_rate: fraction of items cached in memory mode.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.utils import look_up_option

    cache = look_up_option(cache, CACHE_MODES)
    items = list(items)
    if items and "location" in items[0]:
        from medsim.data.histology import patch_dataset

        return patch_dataset(items, transform)
    if cache == "memory":
        return CacheDataset(items, transform, cache_rate=cache_rate, num_workers=num_workers or None,
                            progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir (a folder for the PersistentDataset files)")
        os.makedirs(cache_dir, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    return Dataset(items, transform)
