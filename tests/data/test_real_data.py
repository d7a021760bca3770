"""Real images from ../shared/data (skipped with a reason when the folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from medsim.data.sources import open_source
from medsim.data.splits import split_items

pytestmark = pytest.mark.needs_shared_data


def test_ham10000_lesion_split_keeps_lesions_together(shared_data):
    src = open_source(shared_data / "ham10000")
    assert len(src.items) == 10015
    assert src.class_counts() == {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705,
                                  "vasc": 142}
    assert len({it["group"] for it in src.items}) == 7470
    assert sum("mask" in it for it in src.items) == 10015
    s = split_items(src.items, by="lesion_id", seed=0)
    lesions = {k: {it["group"] for it in v} for k, v in s.items()}
    assert not (lesions["training"] & lesions["validation"] or lesions["training"] & lesions["test"]
                or lesions["validation"] & lesions["test"])
    for k in ("validation", "test"):  # even the rarest class reaches every held-out split
        assert {it["label_name"] for it in s[k]} == set(src.classes)


def test_ct_dicom_series_matches_its_label_map(shared_data):
    from monai.transforms import LoadImage, Orientation

    from medsim.data.dicom import DicomReader, load_dicom

    series_dir = shared_data / "ct" / "dicom_series" / "slices"
    vol, affine, series = load_dicom(series_dir)
    assert vol.shape == (512, 512, 20)
    np.testing.assert_allclose(series.spacing, (0.9766, 0.9766, 2.0), atol=1e-3)  # not SliceThickness (3 mm)
    img = LoadImage(reader=DicomReader(), image_only=True, ensure_channel_first=True)(str(series_dir))
    lab = LoadImage(image_only=True, ensure_channel_first=True)(str(shared_data / "ct" / "dicom_series" /
                                                                     "labels.nii.gz"))
    img, lab = Orientation("RAS", labels=None)(img), Orientation("RAS", labels=None)(lab)
    assert img.shape == lab.shape == (1, 512, 512, 20)
    np.testing.assert_allclose(img.affine.numpy(), lab.affine.numpy(), atol=1e-3)
    hu, labels = img[0].numpy(), lab[0].numpy()
    assert hu.min() == -1024  # rescale intercept applied
    assert hu[labels > 0].mean() > 0 > hu[labels == 0].mean() - 400  # organs are tissue, outside has air


def test_ct_dicom_series_folder_opens_with_its_label_map(shared_data):
    from medsim.data.transforms import ct3d_transforms
    from medsim.data.validate import validate_source

    src = open_source(shared_data / "ct" / "dicom_series")  # slices/ + labels.nii.gz: detected as DICOM
    assert src.layout == "dicom" and src.kind == "ct3d" and src.bad == []
    (item,) = src.items
    assert len(item["image"]) == 20 and item["mask"] == str(shared_data / "ct" / "dicom_series" / "labels.nii.gz")
    assert list(validate_source(src, progress=False).shapes) == [(512, 512, 20)]
    out = ct3d_transforms((64, 64, 16), pixdim=(4.0, 4.0, 4.0), with_mask=True)(
        {"image": item["image"], "mask": item["mask"]})
    assert out["image"].shape == out["mask"].shape == (1, 64, 64, 16) and float(out["mask"].max()) > 0


def test_ct_nifti_volumes(shared_data):
    src = open_source(shared_data / "ct" / "abdomen_3mm")
    assert len(src.items) == 1 and src.items[0]["mask"].endswith("labels.nii.gz")
    from medsim.data.validate import validate_source

    res = validate_source(src, progress=False)
    assert list(res.shapes) == [(122, 101, 112)] and list(res.spacings) == [(3.0, 3.0, 3.0)]


def test_nih_cxr_patient_groups(shared_data):
    src = open_source(shared_data / "cxr_nih1000" / "metadata.csv", label_column="binary_label")
    assert len(src.items) == 1000 and src.classes == ["abnormal", "normal"]
    assert src.kind == "gray2d"
    patients = [it["patient"] for it in src.items]
    assert len(set(patients)) == 264
    assert sum(1 for p in set(patients) if patients.count(p) >= 2) == 136
    s = split_items(src.items, by="patient_id", seed=0)
    pats = {k: {it["patient"] for it in v} for k, v in s.items()}
    assert not (pats["training"] & pats["test"] or pats["validation"] & pats["test"])
    assert {it["view"] for it in src.items} == {"PA", "AP"}
