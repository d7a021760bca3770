"""Sources: layouts are detected and read into checked datalists; every table problem names row and field."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsim.data.phi import Anonymizer
from medsim.data.sources import detect_layout, open_source
from medsim.errors import DataError


def _png(path: Path, value: int = 100, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_sample_derm_is_ham10000_layout(sample_root):
    src = open_source(sample_root / "derm")
    assert src.layout == "ham10000" and src.kind == "rgb2d"
    assert src.classes == ["round", "ring", "lobed", "streaks"]
    assert src.class_counts() == {c: 12 for c in src.classes}
    assert all("mask" in it for it in src.items)
    assert all(src.classes[it["label"]] == it["label_name"] for it in src.items)
    # lesion ids are hashed, and images of one lesion share the hash
    groups = [it["group"] for it in src.items]
    assert all(g.startswith("g-") for g in groups) and len(set(groups)) < len(groups)


def test_csv_problems_are_listed_with_row_and_field(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "b.png")
    table = _csv(tmp_path / "list.csv", ["image", "label", "patient_id"], [
        ["a.png", "benign", "P1"],      # row 2 ok
        ["missing.png", "benign", "P2"],  # row 3 missing file
        ["b.png", "", "P3"],            # row 4 empty label
        ["b.png", "weird", "P3"],        # row 5 unknown label
        ["a.png", "malignant", "P1"],   # row 6 duplicate id
    ])
    with pytest.raises(DataError) as e:
        open_source(table, classes=["benign", "malignant"])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 4
    assert "row 3, field 'image': image 'missing.png' not found" in lines[0]
    assert "row 4, field 'label': empty label" in lines[1]
    assert "row 5, field 'label': unknown label 'weird'" in lines[2]
    assert "row 6, field 'id': duplicate id 'a.png' (first at row 2)" in lines[3]
    assert all(str(table) in ln for ln in lines)

    src = open_source(table, classes=["benign", "malignant"], lenient=True)
    from medsim.data.phi import project_anonymizer

    assert [it["id"] for it in src.items] == [project_anonymizer().case_token("a.png")]  # ids travel as tokens
    assert len(src.bad) == 4


def test_csv_missing_image_column(tmp_path):
    table = _csv(tmp_path / "list.csv", ["picture", "label"], [["a.png", "x"]])
    with pytest.raises(DataError, match=r"missing the image column .* columns are: picture, label"):
        open_source(table)
    with pytest.raises(DataError, match="column 'nope' not found"):
        open_source(table, image_column="nope")


def test_csv_patient_ids_are_hashed_and_never_clear(tmp_path):
    _png(tmp_path / "x ü.png")
    table = _csv(tmp_path / "list.csv", ["image", "label", "patient_id", "patient_name"],
                 [["x ü.png", "a", "MRN-12345", "DOE^JOHN"]])
    src = open_source(table)
    it = src.items[0]
    assert it["patient"] == Anonymizer(b"test-salt")("MRN-12345", "p")
    assert "MRN-12345" not in repr(src.items) and "DOE" not in repr(src.items)
    assert set(it) <= {"id", "image", "label", "label_name", "patient"}


def test_anonymizer_is_keyed():
    a, b = Anonymizer(b"one"), Anonymizer(b"two")
    assert a("P1") == a("P1") != b("P1")
    assert a("P1") != a("P2")
    assert a("") is None and a(None) is None


def test_folder_layout_and_non_image_file(tmp_path):
    _png(tmp_path / "cats" / "1.png")
    _png(tmp_path / "dogs" / "2.png")
    (tmp_path / "dogs" / "notes.txt").write_text("hello")
    assert detect_layout(tmp_path) == "folder"
    with pytest.raises(DataError, match=r"notes.txt: not an image file"):
        open_source(tmp_path)
    src = open_source(tmp_path, lenient=True)
    assert src.classes == ["cats", "dogs"] and len(src.items) == 2 and len(src.bad) == 1


def test_isic2019_one_hot(tmp_path):
    for n in ("ISIC_1", "ISIC_2", "ISIC_3"):
        _png(tmp_path / "ISIC_2019_Training_Input" / f"{n}.jpg")
    _csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", ["image", "MEL", "NV", "BCC"], [
        ["ISIC_1", "1.0", "0.0", "0.0"], ["ISIC_2", "0.0", "0.0", "1.0"], ["ISIC_3", "1.0", "1.0", "0.0"]])
    _csv(tmp_path / "ISIC_2019_Training_Metadata.csv", ["image", "lesion_id"], [["ISIC_1", "L1"], ["ISIC_2", "L1"]])
    src = open_source(tmp_path, lenient=True)
    assert src.layout == "isic2019" and src.classes == ["MEL", "NV", "BCC"]
    from medsim.data.phi import project_anonymizer

    token = project_anonymizer().case_token
    assert [(it["id"], it["label_name"], it["label"]) for it in src.items] == [(token("ISIC_1"), "MEL", 0),
                                                                              (token("ISIC_2"), "BCC", 2)]
    assert src.items[0]["group"] == src.items[1]["group"]
    assert "row 4" in src.bad[0].line() and "exactly one class" in src.bad[0].reason


def test_ham10000_unknown_label_and_missing_image(tmp_path):
    _png(tmp_path / "images" / "ISIC_1.jpg")
    _csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"],
         [["L1", "ISIC_1", "mel"], ["L2", "ISIC_2", "nv"], ["L3", "ISIC_1", "cancer"]])
    with pytest.raises(DataError) as e:
        open_source(tmp_path)
    msg = str(e.value)
    assert "row 3, field 'image_id': image 'ISIC_2' not found" in msg
    assert "row 4, field 'dx': unknown label 'cancer'" in msg


def test_unknown_layout_suggests(tmp_path):
    with pytest.raises(DataError, match="Did you mean 'dicom'"):
        open_source(tmp_path, layout="dicm")


def test_empty_folder_says_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        open_source(tmp_path)


def test_nifti_sample(sample_root):
    src = open_source(sample_root / "ct")
    assert src.layout == "nifti" and src.kind == "ct3d"
    assert len(src.items) == 1 and src.items[0]["mask"].endswith("labels.nii.gz")


def test_dicom_sample_patients_hashed(sample_root):
    src = open_source(sample_root / "dicom")
    assert src.layout == "dicom" and src.kind == "gray2d" and len(src.items) == 4
    patients = {it["patient"] for it in src.items}
    assert 1 < len(patients) < 4 and all(p.startswith("p-") for p in patients)
    assert not any("SAMPLE-PAT" in str(v) or "DOE" in str(v) for it in src.items for v in it.values())
    assert {it["view"] for it in src.items} == {"PA", "AP"}
