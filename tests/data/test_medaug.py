"""medsim.data.medaug: metadata pairs (Vu et al. 2021) on a synthetic CXR table, and on NIH1000 when present."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medsim.data.medaug import (CRITERIA, RULES, MedAugPaird, pair_candidates, patient_split, read_cxr_metadata,
                                resolve_criterion)
from medsim.data.phi import TOKEN_RE

HEADER = ["image", "patient_id", "follow_up", "view_position", "age", "sex", "finding_labels", "binary_label"]
# patient ALPHA: 3 images (2 PA, 1 AP); BRAVO: 2 AP; CHARLIE: 1 image
ROWS = [("PATIENT-ALPHA", 0, "PA"), ("PATIENT-ALPHA", 1, "PA"), ("PATIENT-ALPHA", 2, "AP"),
        ("PATIENT-BRAVO", 0, "AP"), ("PATIENT-BRAVO", 3, "AP"), ("PATIENT-CHARLIE", 0, "PA")]
CLEAR_IDS = ("PATIENT-ALPHA", "PATIENT-BRAVO", "PATIENT-CHARLIE")


def _write(root, rows, name="metadata.csv"):
    from PIL import Image

    (root / "images").mkdir(exist_ok=True)
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for i, (pid, fu, view, *rest) in enumerate(rows):
            img = f"img{i:03d}.png"
            Image.fromarray(np.full((16, 16), (10 * i) % 256, dtype=np.uint8)).save(root / "images" / img)
            w.writerow([img, pid, fu, view, 40 + i, "F", "No Finding", rest[0] if rest else
                        ("normal", "abnormal")[i % 2]])
    return root / name


@pytest.fixture
def table(tmp_path):
    return _write(tmp_path, ROWS)


@pytest.fixture
def items(table):
    return read_cxr_metadata(table)


def test_read_hashes_patients_and_maps_labels(items):
    assert len(items) == 6
    assert all(TOKEN_RE.match(it["patient"]) for it in items)
    assert len({it["patient"] for it in items}) == 3
    assert [it["label"] for it in items] == [0, 1, 0, 1, 0, 1] and items[1]["label_name"] == "abnormal"
    assert items[2] == {**items[2], "follow_up": 2, "view": "AP", "age": 42, "sex": "F", "index": 2}


def _pid(items):
    return {it["image"]: it for it in items}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_criteria_give_only_valid_pairs(items, criterion):
    by = _pid(items)
    cand = pair_candidates(items, criterion)
    rules = CRITERIA[criterion]
    for img, partners in cand.partners.items():
        if partners == (img,):
            continue
        for p in partners:
            assert p != img and all(RULES[r](by[img], by[p]) for r in rules)
            assert by[p]["patient"] == by[img]["patient"]


def test_fallback_counts(items):
    expected = {"none": 0, "same_patient": 1, "same_patient_same_view": 2, "same_patient_diff_followup": 1,
                "same_patient_same_view_diff_followup": 2}  # CHARLIE alone; ALPHA's AP has no other AP
    assert {c: pair_candidates(items, c).n_fallback for c in CRITERIA} == expected
    none = pair_candidates(items, "none")
    assert all(p == (img,) for img, p in none.partners.items())
    st = pair_candidates(items, "same_patient").stats()
    assert st == {"rules": ["same_patient"], "n_items": 6, "n_paired": 5, "n_fallback": 1, "n_pairs": 8,
                  "mean_partners": 1.6, "max_partners": 2}


def test_rule_lists_combine_like_presets(items):
    a = pair_candidates(items, ["same_patient", "same_view", "diff_followup"])
    assert a.partners == pair_candidates(items, "same_patient_same_view_diff_followup").partners
    assert resolve_criterion(["same_patient", "same_followup"]) == ("same_patient", "same_followup")
    same_fu = pair_candidates(items, ["same_patient", "same_followup"])
    assert same_fu.n_fallback == 6  # one image per follow-up here, as in NIH


@pytest.mark.parametrize("criterion, match", [("same_patien", "did you mean 'same_patient'"),
                                              (["same_view"], "add 'same_patient'"),
                                              (["same_patient", "same_view", "diff_view"], "exclude each other")])
def test_bad_criteria(criterion, match):
    with pytest.raises(ValueError, match=match):
        resolve_criterion(criterion)


def test_malformed_rows_name_file_row_and_column(tmp_path):
    from medsim.errors import DataError

    rows = [("PATIENT-ALPHA", 0, "PA"), ("PATIENT-ALPHA", "x", "PA"), ("PATIENT-BRAVO", 0, "AP", "maybe")]
    table = _write(tmp_path, rows)
    with pytest.raises(DataError) as e:
        read_cxr_metadata(table)
    msg = str(e.value)
    assert f"{table}, row 3, field 'follow_up': follow-up must be an integer, got 'x'" in msg
    assert "row 4, field 'binary_label'" in msg and "'maybe'" in msg
    assert not any(pid in msg for pid in CLEAR_IDS)
    with open(table, "a") as f:
        f.write("missing.png,PATIENT-ALPHA,4,PA,50,F,x,normal\n")
    with pytest.raises(DataError, match="row 5, field 'image': image 'missing.png' not found"):
        read_cxr_metadata(table)


def test_missing_column_is_named(tmp_path):
    from medsim.errors import DataError

    (tmp_path / "m.csv").write_text("image,patient_id,follow_up,binary_label\na.png,1,0,normal\n")
    with pytest.raises(DataError, match="missing column 'view_position'"):
        read_cxr_metadata(tmp_path / "m.csv")


def test_patient_split_keeps_patients_together(tmp_path):
    rows = [(f"PATIENT-{p:02d}", fu, "PA", ("normal", "abnormal")[p % 2]) for p in range(20) for fu in range(2)]
    items = read_cxr_metadata(_write(tmp_path, rows))
    splits = patient_split(items, fractions=(0.6, 0.2, 0.2), seed=0)
    patients = {k: {it["patient"] for it in v} for k, v in splits.items()}
    assert sum(len(v) for v in splits.values()) == 40
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"]
                or patients["validation"] & patients["test"])
    assert splits == patient_split(items, fractions=(0.6, 0.2, 0.2), seed=0)


def test_medaug_pair_draws_partners_and_is_seedable(items):
    cand = pair_candidates(items, "same_patient")
    echo = lambda d: {"views": [d["image"]]}  # noqa: E731  (shows which image each view came from)
    t = MedAugPaird(cand, echo, seed=3)
    by = _pid(items)
    drawn = [t(it)["views"] for it in items for _ in range(5)]
    assert all(a == b or (by[a]["patient"] == by[b]["patient"] and b in cand.partners[a]) for a, b in drawn)
    assert any(a != b for a, b in drawn)
    charlie = items[5]
    assert t(charlie)["views"] == [charlie["image"], charlie["image"]]  # fallback: itself
    again = MedAugPaird(cand, echo, seed=3)
    assert [again(it)["views"] for it in items for _ in range(5)] == drawn


def test_medaug_views_batch_and_seed(items):
    import monai.transforms as mt
    from monai.data import DataLoader, Dataset

    from medsim.engines import views_prepare_batch

    cand = pair_candidates(items, "same_patient")
    chain = mt.Compose([MedAugPaird(cand, spatial_size=(8, 8), load_size=(16, 16))])
    chain.set_random_state(seed=11)  # as TrainingHooks does
    a = [chain(it)["views"] for it in items]
    chain.set_random_state(seed=11)
    b = [chain(it)["views"] for it in items]
    assert all(torch.equal(x, y) for va, vb in zip(a, b) for x, y in zip(va, vb))
    batch = next(iter(DataLoader(Dataset(items, chain), batch_size=3)))
    inputs, target = views_prepare_batch(batch)
    assert [tuple(v.shape) for v in inputs] == [(3, 1, 8, 8)] * 2 and target["label"].shape == (3,)


def test_no_clear_patient_id_is_stored(items):
    cand = pair_candidates(items, "same_patient_same_view")
    out = MedAugPaird(cand, lambda d: {"views": [torch.zeros(1)]})(items[0])
    stored = json.dumps([items, cand.stats(), cand.partners, patient_split(items, (0.34, 0.33, 0.33)),
                         {k: v for k, v in out.items() if k != "views"}], default=str)
    assert not any(pid in stored for pid in CLEAR_IDS)


@pytest.mark.needs_shared_data
def test_nih1000_pair_counts(shared_data):
    """Pair statistics on the real NIH1000 metadata (printed with -s): 264 patients, 136 with >= 2 images."""
    items = read_cxr_metadata(shared_data / "cxr_nih1000" / "metadata.csv")
    stats = {c: pair_candidates(items, c).stats() for c in CRITERIA}
    print(json.dumps(stats, indent=1))
    assert len(items) == 1000 and len({it["patient"] for it in items}) == 264
    singles = 264 - 136
    assert stats["same_patient"]["n_fallback"] == singles and stats["none"]["n_fallback"] == 0
    assert stats["same_patient_same_view"]["n_fallback"] >= singles
    assert stats["same_patient_same_view"]["n_pairs"] <= stats["same_patient"]["n_pairs"]
