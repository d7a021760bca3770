"""medsim.data.views3d: SAM's paired 3-D crops carry exact voxel correspondences (Yan et al., TMI 2022).

A volume whose three channels are its own x, y, z index coordinates makes the check exact: the value of view 0 at
``pos_0`` and the trilinear value of view 1 at ``pos_1`` must both be the volume coordinate of the same point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsim.data.views3d import PairedCrops3Dd, sam_view_transforms, sample_volume


def _coordinate_volume(shape=(40, 36, 28)) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.stack(grids)  # (3, X, Y, Z): channel a holds the voxel's index along axis a


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("scale_range,isotropic", [((1.0, 1.0), True), ((0.8, 1.25), False), ((1.2, 1.5), True),
                                                   ((0.6, 0.7), False)])
def test_points_are_the_same_anatomy_in_both_views(seed, scale_range, isotropic):
    vol = _coordinate_volume()
    t = PairedCrops3Dd("image", (16, 12, 10), scale_range=scale_range, isotropic=isotropic, max_shift=0.3,
                       n_points=50)
    t.set_random_state(seed)
    out = t({"image": vol})
    v0, v1, p0, p1 = out["_view0"], out["_view1"], out["pos_0"], out["pos_1"]
    assert v0.shape == v1.shape == (3, 16, 12, 10) and p0.shape == p1.shape == (50, 3)
    roi = torch.tensor([16, 12, 10], dtype=torch.float32)
    for p in (p0, p1):  # inside both views
        assert (p >= -1e-4).all() and (p <= roi - 1 + 1e-4).all()
    assert torch.equal(p0, p0.round())  # whole voxels of view 0
    a = sample_volume(v0.double(), p0.double())  # (3, P): the volume coordinates of the points
    b = sample_volume(v1.double(), p1.double())
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    # and those are the points' real positions in the volume: view 0 is an exact crop, inside the volume
    assert (a >= 0).all() and (a <= torch.tensor([39, 35, 27.0])[:, None]).all()
    s = torch.as_tensor(t._draw["scale"], dtype=torch.float32)
    assert torch.allclose(s, s[0].expand(3)) if isotropic else True
    assert (s >= scale_range[0] - 1e-6).all() and (s <= scale_range[1] + 1e-6).all()


def test_view_1_is_rescaled_by_the_drawn_factor():
    vol = _coordinate_volume((64, 64, 64))
    t = PairedCrops3Dd("image", (16, 16, 16), scale_range=(1.25, 1.25), isotropic=True, max_shift=0.0, n_points=4)
    t.set_random_state(0)
    v1 = t({"image": vol})["_view1"]
    step = v1[0, 1:, 0, 0] - v1[0, :-1, 0, 0]  # volume voxels per view-1 voxel along x
    assert torch.allclose(step, torch.full_like(step, 1 / 1.25), atol=1e-5)


def test_a_volume_smaller_than_the_roi_is_padded_and_points_stay_inside_it():
    vol = _coordinate_volume((10, 12, 8)) + 1  # +1 so zero padding is distinguishable
    t = PairedCrops3Dd("image", (16, 16, 16), n_points=30)
    t.set_random_state(5)
    out = t({"image": vol})
    a = sample_volume(out["_view0"].double(), out["pos_0"].double())
    b = sample_volume(out["_view1"].double(), out["pos_1"].double())
    assert (a >= 1 - 1e-6).all() and torch.allclose(a, b, atol=1e-3)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="scale_range"):
        PairedCrops3Dd("image", (8, 8, 8), scale_range=(1.5, 1.0))
    with pytest.raises(ValueError, match="max_shift=0.7"):
        PairedCrops3Dd("image", (8, 8, 8), max_shift=0.7)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        PairedCrops3Dd("image", (8, 8, 8))({"image": torch.zeros(8, 8, 8)})


def test_the_pipeline_loads_a_nifti_and_gathers_two_views_with_points(sample_root):
    t = sam_view_transforms((16, 16, 12), n_points=8)
    t.set_random_state(seed=0)
    out = t({"image": str(sample_root / "ct" / "ct.nii.gz")})
    assert set(out) == {"views", "pos_0", "pos_1"}
    v0, v1 = out["views"]
    assert v0.shape == v1.shape == (1, 16, 16, 12) and out["pos_0"].shape == (8, 3)
    assert not torch.equal(v0, v1)
    again = sam_view_transforms((16, 16, 12), n_points=8)
    again.set_random_state(seed=0)
    assert torch.equal(again({"image": str(sample_root / "ct" / "ct.nii.gz")})["pos_1"], out["pos_1"])


def test_mr_volumes_are_scaled_by_their_percentiles(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 900, size=(20, 20, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "mr.nii.gz")
    t = sam_view_transforms((8, 8, 8), intensity="percentile", contrast=0, brightness=0, noise=0, n_points=4)
    t.set_random_state(seed=1)
    v0 = t({"image": str(tmp_path / "mr.nii.gz")})["views"][0]
    assert float(v0.min()) >= 0 and float(v0.max()) <= 1 and float(v0.max()) > 0.9
    with pytest.raises(ValueError, match="hu"):
        sam_view_transforms((8, 8, 8), intensity="HUx")


def test_seeded_copy_draws_reproducibly_without_moving_the_original():
    from medsim.data.views3d import seeded_copy

    vol = _coordinate_volume((20, 20, 20))
    t = sam_view_transforms((8, 8, 8), load=False, n_points=4)
    t.set_random_state(seed=0)
    first = t({"image": vol})["pos_1"]
    t.set_random_state(seed=0)
    a, b = seeded_copy(t, 7), seeded_copy(t, 7)
    assert torch.equal(a({"image": vol})["pos_1"], b({"image": vol})["pos_1"])
    assert torch.equal(t({"image": vol})["pos_1"], first)  # the original's random state is its own


def test_auto_intensity_takes_the_hu_window_for_ct_and_percentiles_for_mr(tmp_path, sample_root):
    import nibabel as nib

    from medsim.data.transforms import ct3d_transforms

    arr = np.random.default_rng(0).uniform(0, 900, size=(20, 20, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "mr.nii.gz")
    for path, want in ((sample_root / "ct" / "ct.nii.gz", "hu"), (tmp_path / "mr.nii.gz", "percentile")):
        auto = ct3d_transforms((16, 16, 8), intensity="auto")({"image": str(path)})["image"]
        same = ct3d_transforms((16, 16, 8), intensity=want)({"image": str(path)})["image"]
        other = ct3d_transforms((16, 16, 8), intensity={"hu": "percentile", "percentile": "hu"}[want])(
            {"image": str(path)})["image"]
        assert torch.equal(auto, same) and not torch.equal(auto, other), path.name
