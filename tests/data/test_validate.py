"""Validation opens every file: corrupt, truncated, bomb, wrong-dimension and NaN inputs each give one line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medsim.files
from medsim.data.sources import open_source
from medsim.data.validate import check_file, validate_source
from medsim.errors import DataError


def _png(path, shape=(20, 30, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def test_good_png_shape_is_xy(tmp_path):
    info = check_file(_png(tmp_path / "a.png", (20, 30, 3)), "rgb2d")
    assert info == {"shape": (30, 20), "channels": 3}


def test_truncated_png(tmp_path):
    p = _png(tmp_path / "a.png")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.png: truncated PNG file"):
        check_file(p, "rgb2d")


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"hello world", "not a readable image")])
def test_empty_and_non_image(tmp_path, content, reason):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(DataError, match=reason):
        check_file(p, "rgb2d")


def test_decompression_bomb(tmp_path, monkeypatch):
    p = _png(tmp_path / "big.png", (100, 100, 3))
    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression bomb"):
        check_file(p, "rgb2d")


def test_wrong_dimensionality(tmp_path):
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), vol)
    flat = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), flat)
    assert check_file(vol, "ct3d")["shape"] == (4, 5, 6)
    with pytest.raises(DataError, match=r"expected a 3D volume, got shape \(4, 5\)"):
        check_file(flat, "ct3d")
    with pytest.raises(DataError, match="expected a 3D volume, got a 2D image"):
        check_file(_png(tmp_path / "a.png"), "ct3d")
    with pytest.raises(DataError, match=r"expected a 2D volume"):
        check_file(vol, "gray2d")


def test_nan_voxels(tmp_path):
    a = np.zeros((4, 4, 4), np.float32)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(a, np.eye(4)), p)
    with pytest.raises(DataError, match="2 voxels are NaN or infinite"):
        check_file(p, "ct3d")


def test_strict_lists_all_bad_files_lenient_continues_with_report(tmp_path):
    for i in range(4):
        _png(tmp_path / "good" / f"{i}.png")
    (tmp_path / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "good" / "empty.png").write_bytes(b"")
    _png(tmp_path / "other" / "ok.png")
    src = open_source(tmp_path)
    with pytest.raises(DataError) as e:
        validate_source(src, progress=False)
    lines = str(e.value).splitlines()
    assert "2 unusable file(s)" in lines[0] and "nothing was trained" in lines[0]
    assert sorted(ln.split(":")[0].strip().rsplit("/", 1)[-1] for ln in lines[1:]) == ["broken.png", "empty.png"]
    assert len(src.items) == 7  # strict mode changed nothing

    report = tmp_path / "report.json"
    res = validate_source(src, lenient=True, progress=False, report_path=report)
    assert len(src.items) == 5 and len(res.report.skipped) == 2
    import json

    doc = json.loads(report.read_text())
    assert doc["total"] == 7 and doc["usable"] == 5 and len(doc["skipped"]) == 2


def test_mask_shape_mismatch(tmp_path):
    import csv

    _png(tmp_path / "a.png", (20, 30, 3))
    _png(tmp_path / "m.png", (10, 30, 3))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "mask"], ["a.png", "m.png"]])
    src = open_source(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"m\.png: mask shape \(30, 10\) differs from image shape \(30, 20\)"):
        validate_source(src, progress=False)
