"""benchmarks/sam_landmarks.py's own helpers: the synthetic deformation's ground truth (the deformed volume at y
shows the original at T(y)), landmarks from a label map in world millimetres, and points mapped through a
registration transform."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sam_landmarks as S  # noqa: E402


def test_the_deformed_volume_at_y_is_the_original_at_T_of_y():
    """On a linear ramp V(x) = a·x + b trilinear sampling is exact, so D(y) = a·T(y) + b wherever T(y) is inside
    V: checks the (x, y, z) order and the voxel-centre convention of the field, not only its shape."""
    shape = (20, 18, 14)
    a = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    volume = (grid @ a + 3.0)[None]
    field, params = S.random_deformation(shape, 2.0, np.random.default_rng(0), rotate_deg=10, scale=0.1,
                                         shift_mm=4, elastic_mm=2, control=3)
    assert field.shape == (*shape, 3) and params["elastic_rms_mm"] > 0
    deformed = S.deform(volume, field)
    inside = ((field >= 0) & (field <= torch.tensor(shape, dtype=field.dtype) - 1)).all(-1)
    assert inside.float().mean() > 0.5
    np.testing.assert_allclose(deformed[0][inside].numpy(), (field[inside] @ a + 3.0).numpy(), atol=1e-9)
    assert float(deformed[0][~inside].abs().max()) < float(volume.abs().max())  # fades to zero outside


def test_a_pure_shift_moves_every_voxel_by_the_shift():
    field, params = S.random_deformation((8, 8, 8), 2.0, np.random.default_rng(1), rotate_deg=0, scale=0,
                                         shift_mm=6, elastic_mm=0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(8, dtype=torch.float64)] * 3, indexing="ij"), -1)
    shift_vox = torch.tensor(params["shift_mm"], dtype=torch.float64) / 2.0
    np.testing.assert_allclose((field - grid).reshape(-1, 3).numpy(), shift_vox.expand(512, 3).numpy(), atol=1e-2)
    assert params["elastic_rms_mm"] == 0 and params["rotation_deg"] == [0.0, 0.0, 0.0]


def test_body_points_have_their_exact_partner_inside_the_body():
    vol = torch.zeros(1, 12, 12, 12)
    vol[0, 3:9, 3:9, 3:9] = 1.0
    field, _ = S.random_deformation((12, 12, 12), 1.0, np.random.default_rng(2), rotate_deg=0, scale=0, shift_mm=1,
                                    elastic_mm=0)
    deformed = S.deform(vol, field)
    pts = S.body_points(deformed, field, vol, 30, 0.5, np.random.default_rng(0))
    assert pts.shape == (30, 3) and len({tuple(p) for p in pts}) == 30
    partners = field[tuple(torch.as_tensor(pts, dtype=torch.long).unbind(-1))].numpy()
    assert (deformed[0][tuple(torch.as_tensor(pts, dtype=torch.long).unbind(-1))] > 0.5).all()
    assert ((partners.round() >= 3) & (partners.round() <= 8)).all()


def test_organ_landmarks_are_centroids_and_extremes_in_world_mm():
    labels = np.zeros((10, 10, 6), np.uint8)
    labels[2:4, 2:6, 1:5] = 1  # liver: x 2..3, y 2..5, z 1..4
    labels[6, 6, 0:3] = 2  # right kidney: a column z 0..2
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 100.0]
    marks = S.organ_landmarks(labels, affine, slab_mm=3.0)
    assert set(marks) == {"liver", "right_kidney", "liver_top", "right_kidney_upper_pole", "right_kidney_lower_pole"}
    np.testing.assert_allclose(marks["liver"], [-10 + 2 * 2.5, 4 + 2 * 3.5, 100 + 5 * 2.5])
    np.testing.assert_allclose(marks["liver_top"], [-10 + 2 * 2.5, 4 + 2 * 3.5, 100 + 5 * 4])  # top slice only
    np.testing.assert_allclose(marks["right_kidney"], [2.0, 16.0, 105.0])
    np.testing.assert_allclose(marks["right_kidney_upper_pole"], [2.0, 16.0, 110.0])
    np.testing.assert_allclose(marks["right_kidney_lower_pole"], [2.0, 16.0, 100.0])
    # the world → grid index → world round trip the benchmark uses
    np.testing.assert_allclose(S.to_world(S.to_index(marks["liver"], affine), affine), marks["liver"])


def _isolated(check: str) -> None:
    """Run ``check`` (a function of this module) in a fresh interpreter. SimpleITK and faiss are both SWIG modules
    and whichever is imported second takes over the std::vector<float> proxy type for the whole process: importing
    SimpleITK here would make faiss's k-means fail in every later test of the session."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("SimpleITK") is None:  # not importorskip: that would import it into this process
        pytest.skip("SimpleITK is not installed")
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parents[1] / 'benchmarks')!r}]; "
            f"import test_sam_landmarks as t; t.{check}()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=here.parents[1])
    assert r.returncode == 0, r.stderr[-3000:]


def test_summarise_and_map_through_a_known_transform():
    _isolated("check_summarise_and_map_through")


def test_the_registration_maps_template_points_to_their_partners_in_the_target():
    """The direction the benchmark relies on: fixed = template, moving = target, the transform takes a template point
    to the target point showing the same thing. D(y) = V(y + s): V's point x is D's point x - s."""
    _isolated("check_registration_direction")


def check_summarise_and_map_through() -> None:
    import SimpleITK as sitk

    s = S.summarise([1.0, 2.0, 3.0, 10.0])
    assert s == {"mean": 4.0, "median": 2.5, "p90": 7.9, "max": 10.0, "n": 4}
    tx = sitk.TranslationTransform(3, (3.0, -6.0, 1.5))  # grid mm
    np.testing.assert_allclose(S.map_through(tx, np.array([[1.0, 2.0, 3.0]]), 3.0), [[2.0, 0.0, 3.5]])


def check_registration_direction() -> None:
    grid = torch.stack(torch.meshgrid(*[torch.arange(32, dtype=torch.float64)] * 3, indexing="ij"), -1)
    rng = np.random.default_rng(0)
    blobs = [(rng.uniform(8, 24, 3), rng.uniform(2, 4), rng.uniform(0.4, 1)) for _ in range(8)]
    volume = sum(w * torch.exp(-((grid - torch.tensor(c)) ** 2).sum(-1) / (2 * r ** 2)) for c, r, w in blobs)[None]
    shift = torch.tensor([1.5, -1.0, 2.0], dtype=torch.float64)  # voxels
    moved = S.deform(volume, grid + shift)
    tx, _ = S.affine_registration(volume.float(), moved.float(), 2.0)
    x = np.array([[12.0, 14.0, 16.0], [18.0, 12.0, 14.0]])
    np.testing.assert_allclose(S.map_through(tx, x, 2.0), x - shift.numpy(), atol=0.3)
