"""benchmarks/pgl_segmentation.py's split: by volume, the test volumes never pretrain nor fine-tune, and the labelled
sets are nested inside the pretraining volumes (PGL's few-label protocol, Xie et al. 2020)."""

from __future__ import annotations

import json

import numpy as np
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


def test_rotations_label_other_volumes_of_the_same_split():
    items = [{"image": f"v{i:02d}.nii.gz"} for i in range(15)]
    base = P.split_volumes(items, 5, 4, seed=0)
    pools = [[it["image"] for it in P.split_volumes(items, 5, 4, seed=0, rotation=r)["pool"]] for r in range(3)]
    pre = [it["image"] for it in base["pretrain"]]
    assert pools[0] == pre[:4] and pools[1] == pre[4:8] and pools[2] == pre[8:] + pre[:2]  # wraps around
    for r in range(3):  # the test volumes stay the same and never get labelled
        parts = P.split_volumes(items, 5, 4, seed=0, rotation=r)
        assert parts["test"] == base["test"] and not {it["image"] for it in parts["test"]} & set(pools[r])


def _doc(runs, **data):
    return {"command": "c", "pretraining": {}, "settings": {"roi_size": [48, 48, 32]}, "runs": runs,
            "data": {"dataset": "d", "n_volumes": 15, "split_seed": 0, "test": ["t"], "pretrain": ["p"],
                     "labelled_pool": ["p"], "pixdim_mm": [4, 4, 6], "label_names": {"1": "liver"}, **data}}


def _run(start, n, rotation, dice):
    return {"start": start, "n_labelled": n, "rotation": rotation, "dice": {"liver": dice}, "mean_dice": dice,
            "finetune_epochs": [{"loss": 1.0}, {"loss": 0.5}], "finetune_seconds": 1.0, "test_seconds": 1.0}


def test_collect_merges_side_by_side_parts_and_reports_mean_and_sd(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc([_run("random", 1, 0, 0.2), _run("pgl", 1, 0, 0.5)], rotations={"0": ["p"]})))
    b.write_text(json.dumps(_doc([_run("random", 1, 1, 0.4), _run("pgl", 1, 1, 0.7)], rotations={"1": ["q"]})))
    doc = P.collect([a, b], tmp_path / "out")
    assert len(doc["runs"]) == 4 and doc["data"]["rotations"] == {"0": ["p"], "1": ["q"]}
    md = (tmp_path / "out.md").read_text()
    assert "| 1 | random init | 0.300 ± 0.141 | **0.300 ± 0.141** | 2 |" in md  # sd with ddof=1: |0.4-0.2|/sqrt(2)
    assert "| 1 | PGL | 0.600 ± 0.141 |" in md and "1.000 → 0.500" in md
    c = tmp_path / "c.json"
    c.write_text(json.dumps(_doc([], test=["other"])))
    with pytest.raises(ValueError, match="data.test differs"):
        P.collect([a, c], tmp_path / "out2")


def test_paired_differences_match_rotations():
    runs = [_run("pgl", 1, 0, 0.5), _run("random", 1, 0, 0.2), _run("pgl", 1, 1, 0.7), _run("random", 1, 1, 0.8),
            _run("pgl", 1, 2, 0.6)]  # rotation 2 has no random-init run: left out
    assert np.allclose(P.paired(runs, 1, "pgl", "random"), [0.3, -0.1])
    assert P.paired(runs, 2, "pgl", "random") == []
