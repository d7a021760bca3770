"""Splits: whole groups per split, stratified, reproducible, MONAI-readable JSON."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from medsim.data.splits import local_paths_file, load_split, save_split, split_items
from medsim.errors import MedsimError


def _items(n_groups=200, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for g in range(n_groups):
        label = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        for k in range(int(rng.integers(1, 4))):
            items.append({"id": f"{g}-{k}", "image": f"img/{g}_{k}.png", "label": label, "label_name": "abc"[label],
                          "group": f"G{g}", "patient": f"P{g // 3}"})
    return items


@pytest.mark.parametrize("by,key", [("lesion_id", "group"), ("patient_id", "patient")])
def test_no_group_in_two_splits(by, key):
    items = _items()
    s = split_items(items, by=by, seed=3)
    sets = {k: {it[key] for it in v} for k, v in s.items()}
    assert not sets["training"] & sets["validation"]
    assert not sets["training"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(v) for v in s.values()) == len(items)
    assert sorted(it["id"] for v in s.values() for it in v) == sorted(it["id"] for it in items)


def test_fractions_and_stratification():
    items = _items(600)
    s = split_items(items, fractions=(0.7, 0.15, 0.15), seed=0)
    n = len(items)
    assert abs(len(s["test"]) / n - 0.15) < 0.04 and abs(len(s["validation"]) / n - 0.15) < 0.04
    overall = Counter(it["label"] for it in items)
    for part in s.values():
        c = Counter(it["label"] for it in part)
        for lab in overall:
            assert abs(c[lab] / len(part) - overall[lab] / n) < 0.06


def test_reproducible_and_seed_dependent():
    items = _items()
    a, b, c = split_items(items, seed=1), split_items(items, seed=1), split_items(items, seed=2)
    assert a == b and a != c


def test_bad_requests():
    with pytest.raises(MedsimError, match="summing to 1"):
        split_items(_items(), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(MedsimError, match="no item has 'study'"):
        split_items(_items(), by="study")


def test_save_load_roundtrip_and_monai_reads_it(tmp_path):
    from monai.data import load_decathlon_datalist

    items = _items(60)
    for it in items:
        it["image"] = str(tmp_path / it["image"])
    s = split_items(items, seed=0)
    out = save_split(s, tmp_path / "split.json", dataset_dir=tmp_path, meta={"by": "group"})
    doc = json.loads(out.read_text())
    assert "image" not in doc["training"][0] and doc["training"][0]["id"].startswith("c-")  # no file names
    assert str(tmp_path) not in out.read_text()
    local = json.loads(local_paths_file(out).read_text())
    assert local["training"][0]["image"].startswith("img/")  # relative to the dataset folder
    assert doc["meta"]["counts"] == {k: len(v) for k, v in s.items()}
    back = load_split(out)
    assert [it["image"] for it in back["training"]] == [it["image"] for it in s["training"]]
    monai_list = load_decathlon_datalist(local_paths_file(out), data_list_key="validation", base_dir=tmp_path)
    assert [d["image"] for d in monai_list] == [it["image"] for it in s["validation"]]
