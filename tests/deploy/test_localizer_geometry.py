"""The localizer places each attention cell at its declared centre (medsim.deploy.geometry), 2D and 3D."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from medsim.deploy import DeployError
from medsim.deploy.geometry import AttentionGeometry, AxisGeometry, geometry_from_manifest, resample_attention
from medsim.deploy.localizer import Localizer, bilinear_resize, patch_counts

#: loss-based attention on a 64×64 input (analytic, see tests/nn/test_geometry.py): 6 cells at 8i + 8.5 px
LOSS_ATTN = AttentionGeometry((64, 64), (AxisGeometry(6, 8.5, 8.0, 77.0),) * 2)
H, W = 150, 200  # a HAM10000 image (rows, columns)


def _one_patch(i: int, j: int, grid=(6, 6)) -> np.ndarray:
    """Attention (1, x, y) in MONAI order peaked at cell (i, j) = (column index, row index)."""
    a = np.full((1, *grid), 0.05, np.float32)
    a[0, i, j] = 1.0
    return a


@pytest.mark.parametrize("cell", [(0, 0), (5, 5), (4, 1), (2, 3)])
def test_mask_covers_the_declared_patch_not_the_stretched_one(cell):
    i, j = cell  # x = column, y = row
    loc = Localizer(threshold=0.5, min_area=1).localize(_one_patch(i, j), (H, W), LOSS_ATTN)
    # the patch's centre and its territory (± half a stride) in image pixels: x over W, y over H
    cx, cy = (8 * i + 8.5) / 64 * W, (8 * j + 8.5) / 64 * H
    hx, hy = 4.0 / 64 * W, 4.0 / 64 * H
    rows, cols = np.nonzero(loc.mask)
    assert loc.mask[int(cy - hy / 2):int(cy + hy / 2), int(cx - hx / 2):int(cx + hx / 2)].all()
    for idx, c, n, pix in ((cols, cx, i, W / 64 * 8), (rows, cy, j, H / 64 * 8)):
        # heat 1 at the centre, 0.05 at the neighbours' centres: above 0.5 up to 0.47 strides from it; an edge
        # cell's value is held from its centre to the image border
        lo = 0 if n == 0 else c - 0.47 * pix
        hi = (W if idx is cols else H) if n == 5 else c + 0.47 * pix
        assert abs(idx.min() + 0.5 - lo) <= 1.0 and abs(idx.max() + 0.5 - hi) <= 1.0
    if 0 < i < 5 and 0 < j < 5:
        peak_r, peak_c = np.unravel_index(int(np.argmax(loc.heatmap)), loc.heatmap.shape)
        assert abs(peak_c + 0.5 - cx) <= 0.5 * W / 64 + 1e-9 and abs(peak_r + 0.5 - cy) <= 0.5 * H / 64 + 1e-9
    # stretched (the old placement / an export without geometry): the same extents around (i + 0.5) / 6 instead
    old = Localizer(threshold=0.5, min_area=1).localize(_one_patch(i, j), (H, W))
    cols_o = np.nonzero(old.mask)[1]
    sx = (i + 0.5) / 6 * W
    assert abs(cols_o.min() + 0.5 - (0 if i == 0 else sx - 0.47 * W / 6)) <= 1.0
    assert abs(cols_o.max() + 0.5 - (W if i == 5 else sx + 0.47 * W / 6)) <= 1.0
    if i == 5:  # the last patch: the stretched mask starts 16 px right of the patch's centre, missing it
        assert cols_o.min() + 0.5 > cx + 15


def test_between_centres_linear_outside_held():
    g = AttentionGeometry((64,), (AxisGeometry(6, 8.5, 8.0, 77.0),))
    a = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    out = resample_attention(a, (64,), g)  # one output pixel per input pixel: centres at p + 0.5
    np.testing.assert_allclose(out[8:49], (np.arange(8, 49) + 0.5 - 8.5) / 8.0)  # linear between centres
    assert (out[:8] == 0.0).all() and (out[49:] == 5.0).all()  # held outside (clamped, no extrapolation)


def test_stretch_geometry_is_the_old_resize():
    rng = np.random.default_rng(0)
    a = rng.random((5, 7))
    np.testing.assert_allclose(resample_attention(a, (37, 53)), bilinear_resize(a, (37, 53)), atol=1e-12)
    np.testing.assert_allclose(resample_attention(a, (37, 53), AttentionGeometry.stretch((5, 7), (10, 14))),
                               bilinear_resize(a, (37, 53)), atol=1e-12)
    h = Localizer(normalize=False).heatmap(a[None], (53, 37))  # (x, y) map → (H, W) = (53, 37)
    np.testing.assert_allclose(h, bilinear_resize(a.T, (53, 37)), atol=1e-6)


def test_patch_counts_use_the_declared_cells():
    # a lesion exactly on patch (x=5, y=2)'s territory: pixels nearer its centre than its neighbours' centres
    g = LOSS_ATTN
    x_edges = np.concatenate([[0], (g.axes[0].centres()[:-1] + 4.0) / 64 * W, [W]])
    y_edges = np.concatenate([[0], (g.axes[1].centres()[:-1] + 4.0) / 64 * H, [H]])
    gt = np.zeros((H, W), bool)
    gt[int(np.ceil(y_edges[2] - 0.5)):int(np.ceil(y_edges[3] - 0.5)), int(np.ceil(x_edges[5] - 0.5)):] = True
    assert patch_counts(_one_patch(5, 2), gt, geometry=g) == (1, 0, 0)
    # the stretched partition puts that cell elsewhere: the lesion is not its patch there
    assert patch_counts(_one_patch(5, 2), gt) != (1, 0, 0)


def test_3d_localizer_uses_the_geometry():
    from medsim.deploy.volume import localize_grid, trilinear_resize

    g = AttentionGeometry((32, 32, 16), (AxisGeometry(2, 0.5, 16.0, 163.0),) * 2 + (AxisGeometry(1, 0.5, 16.0, 163.0),))
    att = np.full((2, 2, 1), 0.1)
    att[1, 0, 0] = 1.0
    loc = localize_grid(Localizer(threshold=0.5, min_area=1), att, (32, 32, 16), g)
    xs, ys, _ = np.nonzero(loc.mask)
    # cell x=1 is centred at 16.5 (not 24): the mask starts halfway between the centres, at 8.5, and covers the rest
    assert xs.min() == 9 and xs.max() == 31 and ys.max() == 7
    stretched = localize_grid(Localizer(threshold=0.5, min_area=1), att, (32, 32, 16))
    assert np.nonzero(stretched.mask)[0].min() == 16
    np.testing.assert_allclose(trilinear_resize(att, (32, 32, 16), g), resample_attention(att, (32, 32, 16), g))


def test_manifest_round_trip_and_old_manifests(caplog):
    d = json.loads(json.dumps(LOSS_ATTN.to_dict()))
    assert AttentionGeometry.from_dict(d) == LOSS_ATTN
    assert geometry_from_manifest({"attention_geometry": d}) == LOSS_ATTN
    with caplog.at_level(logging.WARNING, logger="medsim.deploy.geometry"):
        assert geometry_from_manifest({"schema": 1}, where="old/export") is None
    assert "old/export has no attention_geometry" in caplog.text and "stretched" in caplog.text
    with pytest.raises(DeployError, match="malformed"):
        geometry_from_manifest({"attention_geometry": {**d, "stride": [8.0]}})
    with pytest.raises(DeployError, match="stride > 0"):
        AttentionGeometry.from_dict({**d, "stride": [0.0, 8.0]})
    with pytest.raises(DeployError, match="declares a"):
        Localizer().localize(np.zeros((1, 4, 4)), (H, W), LOSS_ATTN)
