"""MONAI pipelines: shapes, value ranges, determinism, and masks that stay on the lesion through augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsim.data.datasets import make_dataset
from medsim.data.sources import open_source
from medsim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_transforms


def _disk_item(tmp_path, i=0):
    yy, xx = np.mgrid[:48, :64]
    m = ((yy - 20) ** 2 + (xx - 40) ** 2) < 12 ** 2
    img = np.full((48, 64, 3), 40, np.uint8)
    img[m, 0] = 255
    Image.fromarray(img).save(tmp_path / f"i{i}.png")
    Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / f"m{i}.png")
    return {"image": str(tmp_path / f"i{i}.png"), "mask": str(tmp_path / f"m{i}.png")}, m


def test_rgb_eval_is_deterministic_and_mask_exact(tmp_path):
    item, m = _disk_item(tmp_path)
    xf = make_transforms("rgb2d", spatial_size=(64, 48), with_mask=True)
    a, b = xf(dict(item)), xf(dict(item))
    assert torch.equal(a["image"], b["image"])
    assert a["image"].shape == (3, 64, 48) and a["mask"].shape == (1, 64, 48)
    assert set(torch.unique(a["mask"]).tolist()) <= {0.0, 1.0}
    # MONAI arrays are (x, y): the transposed mask equals the file's mask exactly at the same size
    assert np.array_equal(a["mask"][0].numpy().T > 0.5, m)
    red = a["image"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert np.array_equal((red.numpy().T > 0.6), m)


def test_rgb_train_augmentation_keeps_mask_on_lesion(tmp_path):
    from monai.utils import set_determinism

    item, _ = _disk_item(tmp_path)
    xf = make_transforms("rgb2d", spatial_size=(64, 64), with_mask=True, train=True)
    set_determinism(0)
    changed = 0
    for _ in range(10):
        out = xf(dict(item))
        red = out["image"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        lesion = red > 0.6
        mask = out["mask"][0] > 0.5
        iou = (lesion & mask).sum() / (lesion | mask).sum()
        assert iou > 0.85, iou
        changed += int(not torch.equal(mask, make_transforms("rgb2d", spatial_size=(64, 64), with_mask=True)(
            dict(item))["mask"][0] > 0.5))
    set_determinism(None)
    assert changed > 3  # augmentation really moves things


def test_sample_derm_batch(sample_root):
    src = open_source(sample_root / "derm")
    ds = make_dataset(src.items[:6], make_transforms("rgb2d", spatial_size=(32, 32), with_mask=True),
                      cache="memory", progress=False)
    x = ds[0]
    assert x["image"].shape == (3, 32, 32) and x["mask"].sum() > 0
    assert x["label"] == src.items[0]["label"]


def test_persistent_cache_matches_plain(sample_root, tmp_path):
    src = open_source(sample_root / "derm")
    xf = make_transforms("rgb2d", spatial_size=(32, 32))
    plain = make_dataset(src.items[:3], xf)
    disk = make_dataset(src.items[:3], xf, cache="disk", cache_dir=tmp_path / "cache")
    assert torch.allclose(plain[2]["image"], disk[2]["image"])
    assert any((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match="did you mean .memory."):
        make_dataset(src.items, xf, cache="memry")


def test_gray_dicom_pipeline_monochrome1_matches(sample_root):
    src = open_source(sample_root / "dicom")
    xf = make_transforms("gray2d", spatial_size=(32, 32))
    outs = [xf(dict(it))["image"] for it in src.items]
    assert all(o.shape == (1, 32, 32) and float(o.min()) >= 0 and float(o.max()) <= 1 for o in outs)
    mean = torch.stack(outs).mean(0).flatten()
    for o in outs:  # the MONOCHROME1 file looks like the others once inverted by the reader
        assert np.corrcoef(o.flatten().numpy(), mean.numpy())[0, 1] > 0.9


def test_ct_pipeline_labels_stay_aligned(sample_root):
    src = open_source(sample_root / "ct")
    out = make_transforms("ct3d", roi_size=(16, 16, 16), pixdim=(3.0, 3.0, 4.0), with_mask=True)(dict(src.items[0]))
    img, lab = out["image"], out["mask"]
    assert img.shape == (1, 16, 16, 16) and lab.shape == (1, 16, 16, 16)
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    spine, liver = img[lab == 3], img[lab == 1]
    assert spine.numel() and liver.numel()
    assert float(spine.mean()) > 0.95 and 0.4 < float(liver.mean()) < 0.7  # 700 HU clipped; 60 HU in [-175, 250]


def test_histology_patches_through_the_rgb_pipeline(tmp_path):
    import tifffile
    from skimage import data as skdata

    from medsim.data.sources import open_source

    ihc = skdata.immunohistochemistry()  # real IHC histology, 512×512 RGB
    slide = np.full((512, 768, 3), 255, np.uint8)
    slide[:, :512] = ihc
    path = tmp_path / "Schnitt 1 ü.tif"
    tifffile.imwrite(path, slide, tile=(128, 128), photometric="rgb")
    src = open_source(path, patch_size=128)
    assert src.layout == "tiff" and len(src.items) == 16  # the 8 white patches on the right are dropped
    ds = make_dataset(src.items, make_transforms("rgb2d", spatial_size=(64, 64), load=False))
    x = ds[5]
    y0, x0 = src.items[5]["location"]
    assert x["image"].shape == (3, 64, 64)
    # undo the normalisation: the mean colour equals the slide's patch (resizing keeps the mean)
    rgb = x["image"] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    expected = slide[y0:y0 + 128, x0:x0 + 128].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(rgb.flatten(1).mean(1).numpy(), expected, atol=0.01)


def test_gray_pipeline_reads_2d_nifti(tmp_path):
    import nibabel as nib

    a = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "x.nii.gz")
    out = make_transforms("gray2d", spatial_size=(20, 30))({"image": str(tmp_path / "x.nii.gz")})["image"]
    assert out.shape == (1, 20, 30)
    np.testing.assert_allclose(out[0].numpy(), (a - a.min()) / (a.max() - a.min()), atol=1e-5)
