"""benchmarks/pgl_segmentation.py's split: by volume, the test volumes never pretrain nor fine-tune, and the labelled
sets are nested inside the pretraining volumes (PGL's few-label protocol, Xie et al. 2020)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import pgl_segmentation as P  # noqa: E402


def test_the_split_holds_test_volumes_back_and_nests_the_labelled_pool():
    items = [{"image": f"v{i:02d}.nii.gz", "label": f"l{i:02d}.nii.gz"} for i in range(15)]
    parts = P.split_volumes(items, n_test=5, n_pool=4, seed=0)
    names = {k: [it["image"] for it in v] for k, v in parts.items()}
    assert len(names["test"]) == 5 and len(names["pretrain"]) == 10 and len(names["pool"]) == 4
    assert not set(names["test"]) & set(names["pretrain"])
    assert set(names["test"]) | set(names["pretrain"]) == {it["image"] for it in items}
    assert names["pool"] == names["pretrain"][:4]  # N = 1, 2, 4 are the first N: nested
    assert P.split_volumes(items, 5, 4, seed=0) == parts and P.split_volumes(items, 5, 4, seed=1) != parts
    with pytest.raises(ValueError, match="n_test=12 n_pool=4"):
        P.split_volumes(items, 12, 4, seed=0)


def test_the_pretraining_folder_holds_only_links_to_the_images(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    folder = P._link_folder([{"image": str(tmp_path / "a.nii.gz"), "label": "nope"}], tmp_path / "pre")
    assert [p.name for p in folder.iterdir()] == ["a.nii.gz"] and (folder / "a.nii.gz").is_symlink()
    P._link_folder([{"image": str(tmp_path / "b.nii.gz")}], folder)  # reused: the old links go
    assert [p.name for p in folder.iterdir()] == ["b.nii.gz"]
