"""medsim.deploy.landmark: SAM's nearest-neighbour point search on dense embeddings, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from medsim.deploy.landmark import DenseEmbedding, match_point, sample, similarity_map
from medsim.runtime.errors import DeployError
from medsim.runtime.geometry import AttentionGeometry, AxisGeometry


def _geometry(input_size, stride, centre=None):
    axes = tuple(AxisGeometry(cells=int(n // stride), centre=(centre if centre is not None else stride / 2),
                              stride=float(stride), receptive_field=float(stride)) for n in input_size)
    return AttentionGeometry(input_size=tuple(input_size), axes=axes)


def _unit(x, axis=0):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _field(rng, dim, shape, smooth=True):
    """A random unit-vector field (dim, *shape); neighbouring cells similar when ``smooth``."""
    v = rng.normal(size=(dim, *shape))
    if smooth:
        from scipy.ndimage import gaussian_filter

        v = gaussian_filter(v, sigma=(0, 1.0, 1.0, 1.0))
    return _unit(v)


def _levels(rng, size=(32, 32, 16), shift=(0, 0, 0)):
    """Template and target levels (global stride 8, local stride 2) where the target is the template's anatomy
    moved by ``shift`` local cells (2·shift voxels): the fields are cut from one larger field at two offsets."""
    big_l = _field(rng, 16, tuple(n // 2 + 8 for n in size))
    big_g = _field(rng, 8, tuple(n // 8 + 2 for n in size), smooth=False)
    out = []
    for off in ((4, 4, 4), tuple(4 - s for s in shift)):
        loc = big_l[(slice(None),) + tuple(slice(o, o + n // 2) for o, n in zip(off, size))]
        g_off = tuple(o // 4 for o in off)
        glo = big_g[(slice(None),) + tuple(slice(o, o + n // 8) for o, n in zip(g_off, size))]
        out.append({"local": DenseEmbedding(loc, _geometry(size, 2)), "global": DenseEmbedding(glo, _geometry(size, 8))})
    return out


def test_sample_at_a_cell_centre_is_that_cell():
    rng = np.random.default_rng(0)
    e = DenseEmbedding(_field(rng, 6, (8, 8, 4)), _geometry((16, 16, 8), 2))
    for idx in [(0, 0, 0), (3, 5, 2), (7, 7, 3)]:
        p = np.array(idx) * 2 + 1.0  # centre of cell idx (stride 2, centre 1)
        np.testing.assert_allclose(sample(e, p), e.values[(slice(None),) + idx], atol=1e-12)


def test_sample_between_centres_is_the_normalised_trilinear_mix():
    rng = np.random.default_rng(1)
    e = DenseEmbedding(_field(rng, 5, (4, 4, 4), smooth=False), _geometry((8, 8, 8), 2))
    p = np.array([1.0 + 2 * 0.25, 1.0 + 2 * 1.5, 1.0 + 2 * 2.0])  # cells (0.25, 1.5, 2.0)
    v = e.values
    mix = 0.75 * (0.5 * v[:, 0, 1, 2] + 0.5 * v[:, 0, 2, 2]) + 0.25 * (0.5 * v[:, 1, 1, 2] + 0.5 * v[:, 1, 2, 2])
    np.testing.assert_allclose(sample(e, p), _unit(mix), atol=1e-12)


def test_the_same_scan_finds_the_point_itself():
    rng = np.random.default_rng(2)
    tpl, _ = _levels(rng)
    for idx in [(3, 4, 2), (10, 12, 6), (0, 15, 7)]:
        p = np.array(idx) * 2 + 1.0
        m = match_point(tpl, p, tpl)
        np.testing.assert_allclose(m.point, p)
        assert m.levels["local"] == pytest.approx(1.0, abs=1e-9)  # the coarse level: interpolated, below 1
        assert m.score == pytest.approx((m.levels["local"] + m.levels["global"]) / 2, abs=1e-12) and m.score <= 1


@pytest.mark.parametrize("shift", [(2, -1, 1), (-3, 2, 0), (4, 4, -2)])
def test_moved_anatomy_is_found_where_it_moved(shift):
    rng = np.random.default_rng(3)
    tpl, tgt = _levels(rng, shift=shift)
    for idx in [(6, 7, 3), (8, 5, 4), (9, 9, 3)]:
        p = np.array(idx) * 2 + 1.0
        m = match_point(tpl, p, tgt, weights={"local": 1.0, "global": 0.0})
        np.testing.assert_allclose(m.point, p + 2 * np.array(shift))
        assert m.score == pytest.approx(1.0, abs=1e-9)


def test_match_equals_brute_force_over_the_fine_cells():
    """The combined map by explicit loops: each fine cell's centre, each level's similarity interpolated there by
    the same trilinear rule, averaged with the weights; the argmax cell is the match."""
    rng = np.random.default_rng(4)
    tpl, tgt = _levels(rng, size=(16, 16, 8), shift=(1, 1, 0))
    p = np.array([7.3, 8.9, 5.2])
    weights = {"global": 0.3, "local": 0.7}
    m = match_point(tpl, p, tgt, weights=weights)
    loc, glo = tgt["local"], tgt["global"]
    q_l, q_g = sample(tpl["local"], p), sample(tpl["global"], p)
    sim_g = similarity_map(q_g, glo)
    best, best_pt = -np.inf, None
    for i in range(8):
        for j in range(8):
            for k in range(4):
                c = np.array([i, j, k]) * 2 + 1.0
                g_cell = np.clip((c - 4.0) / 8.0, 0, np.array(sim_g.shape) - 1)
                lo = np.minimum(np.floor(g_cell).astype(int), np.maximum(np.array(sim_g.shape) - 2, 0))
                f = g_cell - lo
                g = 0.0
                for corner in np.ndindex(2, 2, 2):
                    ix = tuple(min(lo[d] + corner[d], sim_g.shape[d] - 1) for d in range(3))
                    g += np.prod([f[d] if corner[d] else 1 - f[d] for d in range(3)]) * sim_g[ix]
                total = 0.3 * g + 0.7 * float(q_l @ loc.values[:, i, j, k])
                if total > best:
                    best, best_pt = total, c
    np.testing.assert_allclose(m.point, best_pt)
    assert m.score == pytest.approx(best, abs=1e-12)


def test_bad_input_is_refused_with_a_reason():
    rng = np.random.default_rng(5)
    tpl, tgt = _levels(rng, size=(16, 16, 8))
    with pytest.raises(DeployError, match="outside"):
        match_point(tpl, [40.0, 1.0, 1.0], tgt)
    with pytest.raises(DeployError, match="share none"):
        match_point({"local": tpl["local"]}, [1.0, 1.0, 1.0], {"global": tgt["global"]})
    with pytest.raises(DeployError, match="does not match"):
        DenseEmbedding(np.zeros((4, 3, 3, 3)), _geometry((16, 16, 8), 2))
    with pytest.raises(DeployError, match="NaN"):
        DenseEmbedding(np.full((4, 8, 8, 4), np.nan), _geometry((16, 16, 8), 2))
