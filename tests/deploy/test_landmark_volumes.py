"""find_landmarks: an exported SAM model (bundles/ct_sam, tiny, on the sample CT) finds template points in target
volumes through the torch-free runtime, equal to PyTorch's nearest neighbour, in world millimetres."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest



@pytest.fixture(scope="module")
def sam(sample_root, tiny_sam_run, tmp_path_factory):
    import nibabel as nib

    from medsim.export.pipeline import export_run

    out = tmp_path_factory.mktemp("landmark")
    (out / "run").symlink_to(tiny_sam_run, target_is_directory=True)
    export_run(tiny_sam_run, out / "export", opt_batch=1)
    ct = sample_root / "ct" / "ct.nii.gz"
    img = nib.load(str(ct))
    moved = np.array(img.affine)
    moved[:3, 3] += [12.0, -7.0, 5.0]  # the same scan placed 12 / -7 / 5 mm away in the world
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), moved), str(out / "moved.nii.gz"))
    rng = np.random.default_rng(0)
    noisy = np.asanyarray(img.dataobj).astype(np.float32) + rng.normal(0, 30, img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, img.affine), str(out / "noisy.nii.gz"))
    return out, ct


def _grid(export: Path, ct: Path, *, crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The model grid find_landmarks embeds: the whole volume (default) or the training crop."""
    import json

    from medsim.runtime.volume import model_grid, whole_grid

    m = json.loads((export / "manifest.json").read_text())
    if crop:
        return model_grid(ct, m["preprocessing"])
    dyn = m["dynamic_spatial"]
    return whole_grid(ct, m["preprocessing"], multiple=dyn["multiple"], min_size=dyn["min_size"])


def _local_centre_mm(export: Path, ct: Path, cell, *, crop: bool = False) -> np.ndarray:
    """World mm of the centre of local cell ``cell`` on the model grid of ``ct``."""
    import json

    g = json.loads((export / "manifest.json").read_text())["dense_geometry"]["local"]
    _, affine = _grid(export, ct, crop=crop)
    cont = np.array(g["centre"]) + np.array(g["stride"]) * np.array(cell)
    return (affine @ np.append(cont - 0.5, 1.0))[:3]


def _monai_whole(run, path: Path, dyn: dict):
    """MONAI's preprocessing of the whole volume: the run's eval transform without its pad + centre crop, then
    SpatialPad to the training size and DivisiblePad to ``multiple``, both at the far end (the reference for the
    runtime's whole_grid)."""
    import monai.transforms as mt

    steps = [t for t in run.transform.transforms if not isinstance(t, (mt.SpatialPadd, mt.CenterSpatialCropd))]
    pipeline = mt.Compose([*steps[:-1], mt.SpatialPadd("image", spatial_size=dyn["min_size"], method="end"),
                           mt.DivisiblePadd("image", k=dyn["multiple"], method="end"), steps[-1]])
    return pipeline({"image": str(path)})["image"]


def test_a_point_is_found_in_its_own_scan_and_in_the_moved_copy(sam):
    """Local level alone, a point at a local cell centre finds itself in its own scan; with both levels (the
    default) the answer in a copy of the scan moved in the world is the answer in the scan, moved the same."""
    from medsim.deploy.landmark import find_landmarks

    out, ct = sam
    local = {"local": 1.0, "global": 0.0}
    for cell in [(3, 4, 4), (5, 2, 3)]:
        p = _local_centre_mm(out / "export", ct, cell)
        own = find_landmarks(str(out / "export"), str(ct), p, [str(ct)], weights=local)[0]
        np.testing.assert_allclose(own["point_mm"], p, atol=1e-3)
        assert own["score"] == pytest.approx(1.0, abs=1e-5)
        rows = find_landmarks(str(out / "export"), str(ct), p, [str(ct), str(out / "moved.nii.gz")])
        np.testing.assert_allclose(rows[1]["point_mm"], np.add(rows[0]["point_mm"], [12.0, -7.0, 5.0]), atol=1e-3)
        np.testing.assert_allclose(rows[1]["point_voxel"], rows[0]["point_voxel"], atol=1e-3)
        assert rows[1]["score"] == pytest.approx(rows[0]["score"], abs=1e-5)
        # voxel units: the template file's own indices of the same point give the same answer
        again = find_landmarks(str(out / "export"), str(ct), own["point_voxel"], [str(ct)], unit="voxel",
                               weights=local)[0]
        np.testing.assert_allclose(again["point_mm"], p, atol=1e-3)


def test_equals_the_pytorch_models_nearest_neighbour(sam):
    """Training-crop search (``crop=True``), local level only, template point at a local cell centre: the found cell is the argmax of the dot product of
    that cell's PyTorch embedding with every local cell of the target's PyTorch map (MONAI preprocessing)."""
    import torch

    from medsim.deploy.landmark import find_landmarks
    from medsim.export.run import load_run

    out, ct = sam
    run = load_run(out / "run")
    net = run.network.eval()
    target = out / "noisy.nii.gz"
    with torch.no_grad():
        t_local = net(run.transform({"image": str(ct)})["image"][None])["local"][0]
        g_local = net(run.transform({"image": str(target)})["image"][None])["local"][0]
    import json

    geo = json.loads((out / "export" / "manifest.json").read_text())["dense_geometry"]["local"]
    for cell in [(3, 4, 4), (4, 4, 2), (2, 5, 5)]:
        q = t_local[(slice(None),) + cell]
        sim = torch.einsum("d,dxyz->xyz", q, g_local)
        best = np.unravel_index(int(sim.argmax()), sim.shape)
        p = _local_centre_mm(out / "export", ct, cell, crop=True)
        row = find_landmarks(str(out / "export"), str(ct), p, [str(target)], weights={"local": 1.0, "global": 0.0},
                             crop=True)[0]
        want = np.array(geo["centre"]) + np.array(geo["stride"]) * np.array(best)
        np.testing.assert_allclose(row["point_grid"], want, atol=1e-6)
        assert row["score"] == pytest.approx(float(sim.max()), abs=1e-4)


def test_whole_volume_grid_equals_monai_and_a_point_outside_the_crop_is_found(sam):
    """The whole-volume grid equals MONAI's preprocessing without the crop (to 1e-5), and a template point outside
    the training crop (refused with --crop) is found where PyTorch's nearest neighbour on the whole target is."""
    import json

    import torch

    from medsim.deploy.landmark import find_landmarks
    from medsim.export.run import load_run
    from medsim.runtime.errors import DeployError

    out, ct = sam
    m = json.loads((out / "export" / "manifest.json").read_text())
    run = load_run(out / "run")
    net = run.network.eval()
    target = out / "noisy.nii.gz"
    t_arr, _ = _grid(out / "export", ct)
    ref = _monai_whole(run, ct, m["dynamic_spatial"])
    assert tuple(ref.shape[1:]) == t_arr.shape and t_arr.shape != (16, 16, 16)
    np.testing.assert_allclose(t_arr, np.asarray(ref[0]), atol=1e-5)
    crop_arr, _ = _grid(out / "export", ct, crop=True)
    with torch.no_grad():
        t_local = net(ref[None])["local"][0]
        g_local = net(_monai_whole(run, target, m["dynamic_spatial"])[None])["local"][0]
    geo = m["dense_geometry"]["local"]
    # a local cell of the whole grid whose centre is outside the crop
    crop_lo = (np.array(t_arr.shape) - np.array(crop_arr.shape)) // 2
    cell = tuple(int(v) for v in np.array(t_local.shape[1:]) - 1)
    centre = np.array(geo["centre"]) + np.array(geo["stride"]) * np.array(cell)
    assert (centre > crop_lo + np.array(crop_arr.shape)).any()
    p = _local_centre_mm(out / "export", ct, cell)
    with pytest.raises(DeployError, match="outside"):
        find_landmarks(str(out / "export"), str(ct), p, [str(target)], crop=True)
    row = find_landmarks(str(out / "export"), str(ct), p, [str(target)], weights={"local": 1.0, "global": 0.0})[0]
    sim = torch.einsum("d,dxyz->xyz", t_local[(slice(None),) + cell], g_local)
    best = np.unravel_index(int(sim.argmax()), sim.shape)
    np.testing.assert_allclose(row["point_grid"], np.array(geo["centre"]) + np.array(geo["stride"]) * np.array(best),
                               atol=1e-6)
    assert row["score"] == pytest.approx(float(sim.max()), abs=1e-4)


def test_a_classification_export_is_refused(exported):
    from medsim.deploy.landmark import find_landmarks
    from medsim.runtime.errors import DeployError

    model = Path(exported["onnx_path"]).parent
    with pytest.raises(DeployError, match="dense"):
        find_landmarks(str(model), "a.nii.gz", [0, 0, 0], ["b.nii.gz"])


def test_cli_prints_the_found_points_and_writes_json_and_pictures(sam, tmp_path, capsys):
    import json

    from PIL import Image

    from medsim.cli import main
    from medsim.deploy.landmark import find_landmarks

    out, ct = sam
    p = _local_centre_mm(out / "export", ct, (3, 4, 4))
    targets = [str(ct), str(out / "moved.nii.gz")]
    with pytest.raises(SystemExit) as e:
        main(["landmark", "--model", str(out / "export"), "--template", str(ct), "--point", ",".join(map(str, p)),
              *targets, "--out", str(tmp_path / "lm")])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    doc = json.loads((tmp_path / "lm" / "landmarks.json").read_text())
    ref = find_landmarks(str(out / "export"), str(ct), p, targets)
    assert [r["point_mm"] for r in doc["targets"]] == [r["point_mm"] for r in ref]
    for r in doc["targets"]:
        assert r["name"] in printed and "ct.nii" not in printed and "moved" not in json.dumps(doc)
        with Image.open(tmp_path / "lm" / f"{r['name']}_landmark.png") as im:
            assert im.width > 100 and im.height > 100
    with pytest.raises(SystemExit) as e:  # bad input: exit 2 with a one-line reason
        main(["landmark", "--model", str(out / "export"), "--template", str(ct), "--point", "1,2", *targets])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["landmark", "--model", str(out / "export"), "--template", str(ct), "--point", "9999,0,0", *targets])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "outside" in err and "Traceback" not in err


def test_engine_takes_checked_sizes_only_and_a_huge_volume_is_refused(sam):
    """A dense export runs inputs of other sizes that are multiples of its coarsest stride (and >= the training
    size); other shapes, and a whole-volume grid over the voxel cap, are refused with messages naming them."""
    import json

    from medsim.deploy.engine import open_engine
    from medsim.runtime.errors import DeployError
    from medsim.runtime.volume import whole_grid

    out, ct = sam
    with open_engine(str(out / "export"), "ort-cpu", batch_size=1) as engine:
        assert engine.run(np.zeros((1, 1, 24, 16, 32), np.float32))["local"].shape[2:] == (12, 8, 16)
        for bad in [(1, 1, 20, 16, 16), (1, 1, 8, 16, 16), (1, 2, 16, 16, 16)]:
            with pytest.raises(DeployError, match="expected preprocessed images"):
                engine.run(np.zeros(bad, np.float32))
    m = json.loads((out / "export" / "manifest.json").read_text())
    with pytest.raises(DeployError, match="ct.nii.gz.*voxels on the model grid.*--crop"):
        whole_grid(ct, m["preprocessing"], multiple=8, min_size=[16, 16, 16], max_voxels=1000)
