"""The embedded synthetic sample: deterministic, masks exactly the lesions, DICOM/CT tags and values coherent."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medsim.data.sample import CT_LABELS, DERM_CLASSES, default_sample_dir, ensure_sample, make_sample

SMALL = {"n_per_class": 6, "n_dicom": 4, "volume_shape": (20, 18, 12)}
DERM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    dirs = make_sample(root, seed=0)
    assert dirs == {"derm": root / "derm", "dicom": root / "dicom", "ct": root / "ct"}
    return root


def _rows(root: Path, name: str = "HAM10000_metadata.csv") -> list[dict[str, str]]:
    with open(root / "derm" / name, newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _arrays(root: Path) -> dict[str, np.ndarray]:
    """Every pixel array of a sample, keyed by relative path."""
    out = {}
    for p in sorted((root / "derm").rglob("*.png")):
        out[str(p.relative_to(root))] = _png(p)
    for p in sorted((root / "dicom").glob("*.dcm")):
        out[str(p.relative_to(root))] = pydicom.dcmread(p).pixel_array
    for name in ("ct.nii.gz", "labels.nii.gz"):
        out[name] = np.asarray(nib.load(root / "ct" / name).dataobj)
    return out


def test_same_seed_same_arrays_other_seed_differs(tmp_path):
    a, b, c = (make_sample(tmp_path / n, seed=s, **SMALL) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    arr_a, arr_b, arr_c = (_arrays(d["derm"].parent) for d in (a, b, c))
    assert arr_a.keys() == arr_b.keys() and len(arr_a) == 2 * 4 * 6 + 4 + 2
    for key in arr_a:
        assert arr_a[key].dtype == arr_b[key].dtype and np.array_equal(arr_a[key], arr_b[key]), key
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    uids = [[pydicom.dcmread(p).SOPInstanceUID for p in sorted(d["dicom"].glob("*.dcm"))] for d in (a, b, c)]
    assert uids[0] == uids[1] and not set(uids[0]) & set(uids[2])
    differing = [k for k in arr_a if arr_a[k].shape != arr_c[k].shape or not np.array_equal(arr_a[k], arr_c[k])]
    assert len(differing) == len(arr_a)


def test_classes_and_columns(sample):
    rows = _rows(sample)
    with open(sample / "derm" / "HAM10000_metadata.csv", newline="") as f:
        assert next(csv.reader(f)) == DERM_COLUMNS
    with open(sample / "derm" / "HAM10000_metadata_ext.csv", newline="") as f:
        assert next(csv.reader(f)) == DERM_COLUMNS + ["top", "bottom", "left", "right"]
    counts = Counter(r["dx"] for r in rows)
    assert len(counts) >= 4 and set(counts) == set(DERM_CLASSES) and set(counts.values()) == {40}
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["image_id"].startswith("SAMPLE_") and not r["image_id"].endswith(".png")
        assert float(r["age"]) > 0 and r["sex"] in {"male", "female"} and r["localization"]


def test_masks_are_exactly_the_lesions(sample):
    ext = {r["image_id"]: r for r in _rows(sample, "HAM10000_metadata_ext.csv")}
    for image_id, r in ext.items():
        img = _png(sample / "derm" / "images" / f"{image_id}.png")
        mask = _png(sample / "derm" / "masks" / f"{image_id}_segmentation.png")
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, image_id
        inside = mask == 255
        skin = np.median(img[~inside].astype(float), axis=0)
        dist = np.abs(img.astype(float) - skin).sum(axis=-1)
        assert dist[inside].mean() > 60 and dist[inside].mean() > 4 * dist[~inside].mean(), image_id
        # the pixels just outside the mask are skin, not an unmasked lesion rim
        ring = np.zeros_like(inside)
        ring[1:-1, 1:-1] = ~inside[1:-1, 1:-1] & (inside[:-2, 1:-1] | inside[2:, 1:-1] | inside[1:-1, :-2]
                                                  | inside[1:-1, 2:])
        assert dist[ring].mean() < 0.5 * dist[inside].mean(), image_id
        ys, xs = np.nonzero(inside)
        assert (int(r["top"]), int(r["bottom"]), int(r["left"]), int(r["right"])) == (
            ys.min(), ys.max(), xs.min(), xs.max()), image_id


def test_lesion_pairs(sample):
    rows = _rows(sample)
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[r["lesion_id"]].append(r)
    pairs = [g for g in groups.values() if len(g) == 2]
    assert max(len(g) for g in groups.values()) == 2
    assert 0.25 <= 2 * len(pairs) / len(rows) <= 0.45
    for a, b in pairs:
        assert {k: v for k, v in a.items() if k != "image_id"} == {k: v for k, v in b.items() if k != "image_id"}
        ca, cb = (np.argwhere(_png(sample / "derm" / "masks" / f"{r['image_id']}_segmentation.png")).mean(0)
                  for r in (a, b))
        assert np.linalg.norm(ca - cb) < 8  # the same lesion, slightly moved
        ia, ib = (_png(sample / "derm" / "images" / f"{r['image_id']}.png") for r in (a, b))
        assert not np.array_equal(ia, ib)


def test_dicom_tags_and_monochrome1(sample):
    files = sorted((sample / "dicom").glob("*.dcm"))
    assert len(files) == 6
    dss = [pydicom.dcmread(p) for p in files]
    studies: dict[str, set[str]] = defaultdict(set)
    for ds in dss:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality in {"CR", "DX"} and ds.ViewPosition in {"PA", "AP"} and ds.ImageLaterality
        assert "^" in str(ds.PatientName) and ds.PatientID.startswith("SAMPLE-PAT-") and len(ds.PatientBirthDate) == 8
        assert ds.pixel_array.shape == (64, 64) and ds.pixel_array.dtype == np.uint16
        assert [float(v) for v in ds.PixelSpacing] == [5.5, 5.5] and float(ds.WindowWidth) > 0
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid
        studies[ds.PatientID].add(ds.StudyInstanceUID)
    assert 2 <= len(studies) <= 3 and all(len(s) == 2 for s in studies.values())
    assert len({ds.SOPInstanceUID for ds in dss}) == 6
    mono1 = [ds for ds in dss if ds.PhotometricInterpretation == "MONOCHROME1"]
    mono2 = [ds for ds in dss if ds.PhotometricInterpretation == "MONOCHROME2"]
    assert len(mono1) >= 1 and len(mono2) >= 1
    template = np.mean([ds.pixel_array.astype(float) for ds in mono2], axis=0)
    for ds in mono1:
        stored = ds.pixel_array.astype(float)
        shown = (2 ** ds.BitsStored - 1) - stored  # what a reader honouring MONOCHROME1 displays
        assert np.corrcoef(shown.ravel(), template.ravel())[0, 1] > 0.9
        assert np.corrcoef(stored.ravel(), template.ravel())[0, 1] < -0.9
    for ds in mono2:  # dense structures (spine column) brighter than the lung fields
        a = ds.pixel_array.astype(float)
        assert a[20:40, 30:34].mean() > a[20:40, 8:16].mean() + 500


def test_ct_labels_match_hu(sample):
    ct, lab = nib.load(sample / "ct" / "ct.nii.gz"), nib.load(sample / "ct" / "labels.nii.gz")
    hu, labels = np.asarray(ct.dataobj, dtype=float), np.asarray(lab.dataobj)
    assert hu.shape == labels.shape == (48, 48, 32) and labels.dtype == np.uint8
    for img in (ct, lab):
        assert np.allclose(img.header.get_zooms()[:3], (1.5, 1.5, 2.0))
        assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), (1.5, 1.5, 2.0))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert json.loads((sample / "ct" / "label_names.json").read_text()) == {str(k): v for k, v in CT_LABELS.items()}
    assert hu[labels == 3].mean() > 500
    assert abs(hu[labels == 1].mean() - 60) < 10 and abs(hu[labels == 2].mean() - 30) < 10
    air = hu[:3, :3, :].mean()
    body = hu[20:28, 20:28, 12:20][labels[20:28, 20:28, 12:20] == 0].mean()
    assert air < -900 and -50 < body < 60 and body > air
    assert (labels > 0).sum() > 0 and np.all(hu[labels > 0] > -200)  # structures lie inside the body


def test_second_call_does_not_rewrite(sample):
    files = [p for p in sample.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    make_sample(sample, seed=0)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert json.loads((sample / "sample.json").read_text())["seed"] == 0
    assert not [p for p in sample.rglob(".tmp*")]


def test_changed_or_incomplete_sample_is_rewritten(tmp_path):
    make_sample(tmp_path, seed=1, **SMALL)
    lost = tmp_path / "derm" / "images" / "SAMPLE_0000003.png"
    good = _png(lost)
    lost.unlink()
    make_sample(tmp_path, seed=1, **SMALL)
    assert np.array_equal(_png(lost), good)
    make_sample(tmp_path, seed=1, **{**SMALL, "n_per_class": 3, "n_dicom": 2})
    assert len(list((tmp_path / "derm" / "images").glob("*.png"))) == 12 == len(_rows(tmp_path))
    assert len(list((tmp_path / "derm" / "masks").glob("*.png"))) == 12
    assert len(list((tmp_path / "dicom").glob("*.dcm"))) == 2
    assert json.loads((tmp_path / "sample.json").read_text())["n_per_class"] == 3


def test_default_dir_and_ensure_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIM_SAMPLE_DIR", str(tmp_path / "cache"))
    assert default_sample_dir() == tmp_path / "cache"
    root = ensure_sample()
    assert root == tmp_path / "cache" and (root / "README.md").is_file() and (root / "sample.json").is_file()
    monkeypatch.delenv("MEDSIM_SAMPLE_DIR")
    assert default_sample_dir() == Path("~/.cache/medsim/sample").expanduser()


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError):
        make_sample(tmp_path, n_per_class=0)
