"""ct3d preprocessing in medsim.deploy (NumPy/nibabel/SciPy) against MONAI's ct3d eval pipeline: the embedded
sample volume, oblique and flipped affines (orientation + non-diagonal resampling), and the shared real CT as NIfTI
and as a DICOM series."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsim.data.transforms import ct3d_transforms
from medsim.deploy import DeployError
from medsim.deploy.preprocess import preprocess
from medsim.deploy.volume import output_grid, pad_crop


def _manifest(**kw) -> dict:
    """The manifest of a ct3d export: preprocessing described from the spec (medsim.preprocessing.describe)."""
    from medsim.preprocessing import describe

    spec = {"_target_": "medsim.data.transforms.ct3d_transforms",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}}
    return {"preprocessing": describe(spec), "input": {"name": "image"}}


def _monai(path, **kw) -> np.ndarray:
    return ct3d_transforms(**kw)({"image": str(path)})["image"].numpy()


def _nifti(path, arr: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def test_manifest_describes_every_ct3d_step():
    prep = _manifest(roi_size=(32, 32, 16), pixdim=(1.5, 1.5, 2.0), hu_window=(-100.0, 200.0))["preprocessing"]
    assert prep["kind"] == "ct3d" and prep["axcodes"] == "RAS" and prep["pixdim"] == [1.5, 1.5, 2.0]
    assert prep["scale"] == {"from": [-100.0, 200.0], "to": [0.0, 1.0], "clip": True}
    assert prep["spatial_size"] == [32, 32, 16] and prep["pad"] == {"method": "symmetric", "mode": "constant"}
    assert prep["spacing"] == {"mode": "bilinear", "padding_mode": "border", "align_corners": False,
                               "diagonal": False, "scale_extent": False}


def test_sample_volume_matches_monai(sample_root):
    path = sample_root / "ct" / "ct.nii.gz"
    kw = dict(roi_size=(20, 28, 12), pixdim=(2.0, 1.2, 2.5))
    ours, ref = preprocess(path, _manifest(**kw)), _monai(path, **kw)
    assert ours.shape == ref.shape == (1, 20, 28, 12)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("intensity", ["percentile", "auto"])
def test_mr_percentile_and_auto_intensity_match_monai(sample_root, tmp_path, intensity):
    """MR volumes (no HU scale): the runtime scales by the volume's own percentiles like MONAI's
    ScaleIntensityRangePercentilesd; "auto" takes the HU window for the CT sample and the percentiles for an MR-like
    volume (non-negative values)."""
    import nibabel as nib

    ct = sample_root / "ct" / "ct.nii.gz"
    img = nib.load(str(ct))
    mr = tmp_path / "mr.nii.gz"
    rng = np.random.default_rng(0)
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    _nifti(mr, (arr - arr.min()) * 3.7 + rng.gamma(2.0, 20.0, arr.shape).astype(np.float32), img.affine)
    kw = dict(roi_size=(20, 28, 12), pixdim=(2.0, 1.2, 2.5), intensity=intensity, percentiles=(1.0, 98.0))
    man = _manifest(**kw)
    assert man["preprocessing"]["intensity"]["mode"] == intensity
    for path in (mr, ct):
        ours, ref = preprocess(path, man), _monai(path, **kw)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    if intensity == "auto":  # the CT sample got the HU window: same as an "hu" model
        np.testing.assert_allclose(preprocess(ct, man), _monai(ct, roi_size=(20, 28, 12), pixdim=(2.0, 1.2, 2.5)),
                                   atol=1e-5)
    else:  # the percentile pipeline is not the HU one
        assert not np.allclose(preprocess(ct, man), _monai(ct, roi_size=(20, 28, 12), pixdim=(2.0, 1.2, 2.5)))


@pytest.mark.parametrize("case", ["flipped-LPS", "oblique", "permuted"])
def test_orientation_and_oblique_resampling_match_monai(tmp_path, case):
    rng = np.random.default_rng(3)
    arr = rng.normal(50, 120, (17, 13, 9)).astype(np.float32)
    if case == "flipped-LPS":
        affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    elif case == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        affine = np.array([[0.9 * c, -1.1 * s, 0, 5], [0.9 * s, 1.1 * c, 0, -3], [0, 0, 2.2, 7], [0, 0, 0, 1]])
    else:
        affine = np.array([[0, 0, 2.0, 1], [1.3, 0, 0, 2], [0, -0.7, 0, 3], [0, 0, 0, 1.0]])
    path = _nifti(tmp_path / f"{case}.nii.gz", arr, affine)
    kw = dict(roi_size=(16, 16, 12), pixdim=(1.1, 1.3, 1.7), hu_window=(-100.0, 250.0))
    ours, ref = preprocess(path, _manifest(**kw)), _monai(path, **kw)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_output_grid_matches_monai_spacing():
    from monai.transforms import Spacing
    import torch
    from monai.data import MetaTensor

    affine = np.array([[0.7, 0.2, 0, 1], [-0.1, 0.9, 0, 2], [0, 0, 3.0, 3], [0, 0, 0, 1.0]])
    out = Spacing(pixdim=(1.0, 1.5, 2.0))(MetaTensor(torch.zeros(1, 11, 7, 5), affine=torch.as_tensor(affine)))
    shape, new_affine = output_grid((11, 7, 5), affine, (1.0, 1.5, 2.0))
    assert shape == tuple(out.shape[1:])
    np.testing.assert_allclose(new_affine, out.affine.numpy(), atol=1e-6)


def test_pad_crop_is_monai_pad_then_centre_crop():
    from monai.transforms import CenterSpatialCrop, SpatialPad

    a = np.arange(5 * 8 * 3, dtype=np.float32).reshape(5, 8, 3)
    ref = CenterSpatialCrop((6, 3, 4))(SpatialPad((6, 3, 4))(a[None]))[0]
    np.testing.assert_array_equal(pad_crop(a, (6, 3, 4)), np.asarray(ref))


def test_bad_volume_inputs(tmp_path):
    m = _manifest(roi_size=(8, 8, 8))
    with pytest.raises(DeployError, match="nope.nii.gz: file or folder not found"):
        preprocess(tmp_path / "nope.nii.gz", m)
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    with pytest.raises(DeployError, match="junk.nii.gz: not a readable NIfTI"):
        preprocess(tmp_path / "junk.nii.gz", m)
    _nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))
    with pytest.raises(DeployError, match="3D volume, got an array of shape"):
        preprocess(tmp_path / "flat.nii.gz", m)
    with pytest.raises(DeployError, match="affine"):
        preprocess(np.zeros((8, 8, 8), np.float32), m)
    broken = {**m, "preprocessing": {k: v for k, v in m["preprocessing"].items() if k != "pixdim"}}
    with pytest.raises(DeployError, match="no 'pixdim'"):
        preprocess(_nifti(tmp_path / "v.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4)), broken)


@pytest.mark.parametrize("source", ["nifti", "dicom"])
def test_shared_ct_matches_monai(shared_data, source):
    path = (shared_data / "ct" / "abdomen_small_3mm" / "ct.nii.gz" if source == "nifti"
            else shared_data / "ct" / "dicom_series" / "slices")
    if not path.exists():
        pytest.skip(f"{path} is absent")
    kw = dict(roi_size=(64, 64, 32), pixdim=(3.0, 3.0, 4.0))
    ours, ref = preprocess(path, _manifest(**kw)), _monai(path, **kw)
    assert ours.shape == ref.shape == (1, 64, 64, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ref.std() > 0.01  # real anatomy, not padding


KW3D = dict(roi_size=(32, 32, 16), pixdim=(1.5, 1.5, 2.0))


@pytest.fixture(scope="module")
def export3d(sample_root, tmp_path_factory):
    """A 3D Embedder exported with a ct3d manifest: ``(export folder, network)``."""
    import torch

    from medsim.export import export_onnx
    from medsim.export.run import LoadedRun
    from medsim.nn import Embedder

    tmp_path = tmp_path_factory.mktemp("export3d")
    kw = KW3D
    record = {"eval_preprocessing": {"_target_": "medsim.data.transforms.ct3d_transforms",
                                     "roi_size": list(kw["roi_size"]), "pixdim": list(kw["pixdim"])},
              "network": {"_target_": "medsim.nn.Embedder", "backbone": "resnet10", "spatial_dims": 3}}
    torch.manual_seed(0)
    net = Embedder("resnet10", spatial_dims=3, in_channels=1, embedding_dim=16, widen_factor=0.25).eval()
    ckpt = tmp_path / "best.pt"
    torch.save({"network": net.state_dict()}, ckpt)
    x = _monai(sample_root / "ct" / "ct.nii.gz", **kw)[None]
    run = LoadedRun(run_dir=tmp_path, checkpoint=ckpt, record=record, network=net,
                    transform=ct3d_transforms(**kw), classes=["volume"])
    out = export_onnx(run, tmp_path / "model", batch=2, parity_images=np.concatenate([x, x[:, :, ::-1]]))
    assert out["manifest"]["preprocessing"]["kind"] == "ct3d" and out["manifest"]["input"]["shape"][1:] == [1, 32, 32, 16]
    return tmp_path / "model", net


def test_engine_embeds_a_volume_file_like_pytorch(sample_root, export3d):
    """EmbeddingEngine on the NIfTI file (deploy's own reading and preprocessing) gives PyTorch's embedding on
    MONAI's preprocessed tensor."""
    import torch

    from medsim.deploy.engine import EmbeddingEngine

    model, net = export3d
    path = sample_root / "ct" / "ct.nii.gz"
    x = _monai(path, **KW3D)[None]
    with EmbeddingEngine(model, backend="ort-cpu") as engine:
        got = engine.embed([path, path])
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    assert got["embedding"].shape == (2, 16)
    np.testing.assert_allclose(got["embedding"], np.repeat(ref["embedding"].numpy(), 2, 0), atol=1e-4)
    np.testing.assert_allclose(got["attention"][:1], ref["attention"].numpy(), atol=1e-4)


def test_volume_preprocessing_imports_neither_torch_nor_monai(sample_root, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    m = tmp_path / "manifest.json"
    m.write_text(json.dumps(_manifest(roi_size=(16, 16, 8))))
    code = ("import sys\nfrom medsim.deploy.preprocess import preprocess\n"
            f"x = preprocess({str(sample_root / 'ct' / 'ct.nii.gz')!r}, {str(m)!r})\n"
            "assert x.shape == (1, 16, 16, 8), x.shape\n"
            "bad = [k for k in ('torch', 'monai') if k in sys.modules]\nassert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- 3D localization
def _monai_meta(path, label=None, **kw):
    """MONAI's ct3d eval pipeline without its final EnsureTyped(track_meta=False): tensors keep their affine."""
    import monai.transforms as mt

    comp = ct3d_transforms(with_mask=label is not None, **kw)
    data = {"image": str(path), **({"mask": str(label)} if label is not None else {})}
    return mt.Compose(comp.transforms[:-1])(data)


@pytest.mark.parametrize("where", ["sample", "shared"])
def test_model_grid_affine_and_labels_match_monai(sample_root, shared_data, where):
    from medsim.deploy.volume import label_to_grid, model_grid

    folder = sample_root / "ct" if where == "sample" else shared_data / "ct" / "abdomen_small_3mm"
    if not folder.exists():
        pytest.skip(f"{folder} is absent")
    kw = dict(roi_size=(20, 28, 12), pixdim=(2.0, 1.2, 2.5)) if where == "sample" else \
        dict(roi_size=(64, 64, 32), pixdim=(3.0, 3.0, 4.0))
    ref = _monai_meta(folder / "ct.nii.gz", folder / "labels.nii.gz", **kw)
    prep = _manifest(**kw)["preprocessing"]
    grid, affine = model_grid(folder / "ct.nii.gz", prep)
    np.testing.assert_allclose(grid, ref["image"].numpy()[0], atol=1e-5)
    np.testing.assert_allclose(affine, ref["image"].affine.numpy(), atol=1e-4)
    labels = label_to_grid(folder / "labels.nii.gz", prep)
    want = ref["mask"].numpy()[0]
    assert labels.shape == want.shape and (labels > 0).sum() > 0
    assert (labels == np.rint(want)).mean() > 0.999  # nearest rounding ties may differ at a few voxels


def test_trilinear_resize_equals_torch():
    import torch

    from medsim.deploy.volume import trilinear_resize

    a = np.random.default_rng(0).random((3, 4, 2))
    ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=(12, 10, 7), mode="trilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(trilinear_resize(a, (12, 10, 7)), ref, atol=1e-10)


def test_localize_grid_finds_the_hot_region_and_box_hit_rules():
    from medsim.deploy.localizer import Localizer
    from medsim.deploy.localizer import box_hit as _box_hit_3d  # the one rule, 2D and 3D
    from medsim.deploy.volume import localize_grid

    att = np.zeros((4, 4, 2))
    att[2, 1, 1] = 1.0  # feature voxel (2, 1, 1) of a 4x4x2 map on a 32x32x16 grid: voxels x 16-24, y 8-16, z 8-16
    loc = localize_grid(Localizer(threshold=0.5, min_area=1), att, (32, 32, 16))
    (b,) = loc.boxes
    assert (b["x0"], b["x1"], b["y0"], b["y1"], b["z0"], b["z1"]) == (16, 24, 8, 16, 8, 16)
    assert loc.mask.sum() == b["volume_voxels"] and loc.mask[20, 12, 12] and not loc.mask[10, 12, 12]
    gt = np.zeros((32, 32, 16), bool)
    gt[18:22, 10:14, 10:14] = True
    assert _box_hit_3d(loc.boxes, gt)  # centroid (20, 12, 12) inside
    gt[:] = False
    gt[0:4, 0:4, 0:4] = True
    assert not _box_hit_3d(loc.boxes, gt)
    big = [{"x0": 0, "y0": 0, "z0": 0, "x1": 4, "y1": 4, "z1": 5}]  # IoU 64/80 = 0.8 with gt, centroid inside too
    assert _box_hit_3d(big, gt)
    shifted = [{"x0": 1, "y0": 1, "z0": 1, "x1": 5, "y1": 5, "z1": 5}]  # centroid (2.5,2.5,2.5) inside
    assert _box_hit_3d(shifted, gt)
    off = [{"x0": 3, "y0": 0, "z0": 0, "x1": 7, "y1": 4, "z1": 4}]  # centroid x 2.5 outside; IoU 16/112
    assert not _box_hit_3d(off, gt)


def test_localize_cli_on_a_volume_writes_nifti_on_the_scan(sample_root, export3d, tmp_path, capsys):
    import nibabel as nib
    from PIL import Image

    from medsim.cli import main
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.localizer import dice
    from medsim.deploy.volume import label_to_grid, model_grid

    model, _ = export3d
    ct, labels = sample_root / "ct" / "ct.nii.gz", sample_root / "ct" / "labels.nii.gz"
    with pytest.raises(SystemExit) as e:
        main(["localize", "--model", str(model), str(ct), "--out", str(tmp_path / "loc"), "--mask-file", str(labels)])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert "Dice" in out.out and "(1 with masks)" in out.out
    prep = json.loads((model / "manifest.json").read_text())["preprocessing"]
    grid, affine = model_grid(ct, prep)
    (name, src), = json.loads((tmp_path / "loc" / "cases.local.json").read_text())["cases"].items()
    assert src == str(ct) and name.startswith("c-") and not list((tmp_path / "loc").glob("ct_*"))
    mask = nib.load(tmp_path / "loc" / f"{name}_mask.nii.gz")
    heat = nib.load(tmp_path / "loc" / f"{name}_heatmap.nii.gz")
    assert mask.shape == heat.shape == grid.shape == tuple(KW3D["roi_size"])
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    # the heatmap is the engine's attention, trilinearly upsampled with each cell at the centre the manifest
    # declares (attention_geometry: layer3 cells at 16·i + 0.5 voxels), min-max normalised
    with EmbeddingEngine(model, backend="ort-cpu") as engine:
        att = engine.run(grid[None, None])["attention"][0, 0]
    import torch

    from medsim.deploy.geometry import geometry_from_manifest
    from medsim.nn import upsample_attention

    geometry = geometry_from_manifest(json.loads((model / "manifest.json").read_text()))
    assert geometry.input_size == grid.shape and [a.centre for a in geometry.axes] == [0.5] * 3
    up = upsample_attention(torch.from_numpy(att)[None, None].double(), grid.shape, geometry)[0, 0].numpy()
    up = (up - up.min()) / (up.max() - up.min())
    np.testing.assert_allclose(np.asarray(heat.dataobj), up, atol=1e-5)
    m = np.asarray(mask.dataobj) > 0
    table = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert table["summary"]["dice"] == pytest.approx(dice(m, label_to_grid(labels, prep) > 0))
    boxes = json.loads((tmp_path / "loc" / f"{name}_boxes.json").read_text())
    for b in boxes["boxes"]:
        assert m[b["x0"]:b["x1"], b["y0"]:b["y1"], b["z0"]:b["z1"]].any()
        lo = affine @ np.array([b["x0"], b["y0"], b["z0"], 1.0])
        assert np.allclose(np.minimum(lo[:3], b["ras_mm"]["max"]), lo[:3], atol=0.01)
        hi = affine @ np.array([b["x1"] - 1, b["y1"] - 1, b["z1"] - 1, 1.0])
        np.testing.assert_allclose(b["ras_mm"]["min"], np.minimum(lo, hi)[:3], atol=0.006)  # rounded to 0.01 mm
        np.testing.assert_allclose(b["ras_mm"]["max"], np.maximum(lo, hi)[:3], atol=0.006)
    with Image.open(tmp_path / "loc" / f"{name}_overlay.png") as im:
        assert im.size == (grid.shape[0], grid.shape[1])  # (width = x, height = y) of an axial slice


def test_assistant_serves_a_volume_model(sample_root, export3d, tmp_path):
    """The MONAI Label app's core on a 3D model: the label it returns is the NIfTI mask `medsim localize` writes
    (same voxels, same affine), and the indexed volume is its own most similar case (no thumbnail for volumes)."""
    import nibabel as nib

    from medsim.deploy.assist import Assistant
    from medsim.deploy.tasks import build_index, localize_images

    model, _ = export3d
    vol = sample_root / "ct" / "ct.nii.gz"
    build_index(model, sample_root / "ct", tmp_path / "index", progress=False)
    a = Assistant(model, tmp_path / "index")
    try:
        assert a.dimension == 3
        res = a.localize(vol, tmp_path / "app")
        ref = localize_images(model, [vol], tmp_path / "cli", progress=False)
        want = nib.load(tmp_path / "cli" / f"{ref['names'][0]}_mask.nii.gz")
        got = nib.load(res["label"])
        assert res["label"].endswith("_label.nii.gz")
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine)
        sim = a.similar_cases(vol, k=1)
        assert sim["cases"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert sim["cases"][0]["id"] == sim["query"]  # an indexed volume is named by its case id
        assert "thumbnail" not in sim["cases"][0] or sim["cases"][0]["thumbnail"] is None
    finally:
        a.close()
