"""medsim.ssl.pgl: PGL's local loss against its formula written per region, regions that really are the same anatomy
in both crops (a coordinate-encoding volume), the EMA target (exact), and a few training steps (Xie et al. 2020)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsim.data.views3d import PairedCrops3Dd, sample_volume
from medsim.ssl import BYOLLoss, PGL, PGLLoss, get_method
from medsim.ssl.losses import byol_regression
from medsim.ssl.pgl import dense_head_apply, pool_regions, region_points

GRID = ((0.0, 0.0, 0.0), (4.0, 4.0, 4.0))  # cell i centred at voxel 4 i


def _coordinate_volume(shape=(48, 40, 36)) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.stack(grids)  # (3, X, Y, Z): channel a holds the voxel's index along axis a


def test_byol_regression_is_two_minus_two_cosine():
    p, z = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    assert byol_regression(p, z).item() == pytest.approx(((2 - 0) + (2 - 2)) / 2)
    zg = z.clone().requires_grad_()
    byol_regression(p.requires_grad_(), zg).backward()
    assert zg.grad is None  # the target gets no gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale_range", [(1.0, 1.0), (0.8, 1.25), (1.2, 1.5)])
def test_region_boxes_are_the_same_anatomy_in_both_views(seed, scale_range):
    """Every lattice point of a region in view 0 and its partner in view 1 read the same volume coordinate."""
    vol = _coordinate_volume()
    t = PairedCrops3Dd("image", (16, 12, 10), scale_range=scale_range, max_shift=0.3, n_points=12, scale_key="scale")
    t.set_random_state(seed)
    out = t({"image": vol})
    assert torch.allclose(out["scale"], torch.as_tensor(t._draw["scale"], dtype=torch.float32))
    pts_0, pts_1 = region_points(out["pos_0"][None], out["pos_1"][None], out["scale"][None], (16, 12, 10),
                                 (16, 12, 10), region_size=6.0, samples=3)
    assert pts_0.shape == pts_1.shape == (1, 12, 27, 3)
    a = sample_volume(out["_view0"].double(), pts_0[0].double())  # (3, R, 27) volume coordinates
    b = sample_volume(out["_view1"].double(), pts_1[0].double())
    # view 0 is an exact crop, so a is the points' volume coordinate; view 1's trilinear values mix in its zero
    # padding within one voxel of the volume's border (as SAM's points, which keep that margin): compare inside it
    shape = torch.tensor([48.0, 40.0, 36.0], dtype=torch.float64)[:, None, None]
    inner = ((a >= 1) & (a <= shape - 2)).all(0)
    assert inner.float().mean() > 0.5
    assert torch.allclose(a[:, inner], b[:, inner], atol=1e-3), (a - b)[:, inner].abs().max()
    roi = torch.tensor([15.0, 11.0, 9.0])
    for p in (pts_0, pts_1):  # inside both views (clipped to the overlap)
        assert (p >= -1e-4).all() and (p <= roi + 1e-4).all()
    side = pts_0[0].amax(1) - pts_0[0].amin(1)  # (R, 3) box extent in view 0
    assert (side <= 6.0 + 1e-4).all()
    # a box well inside both views keeps its full size, and its view-1 image is s times larger
    centre = torch.tensor([[[7.0, 5.0, 4.0]]])
    s = torch.tensor([[1.25, 0.8, 1.0]])
    p0, p1 = region_points(centre, s[:, None] * centre + 0.5, s, (16, 12, 10), (16, 12, 10), 4.0)
    assert torch.allclose(p0[0, 0].amax(0) - p0[0, 0].amin(0), torch.full((3,), 4.0))
    assert torch.allclose(p1[0, 0].amax(0) - p1[0, 0].amin(0), 4.0 * s[0])


def test_pool_regions_averages_the_cells_under_the_lattice():
    torch.manual_seed(0)
    maps = torch.randn(1, 5, 4, 4, 4)
    pts = torch.tensor([[[[4.0, 4.0, 4.0], [8.0, 4.0, 4.0]], [[0.0, 12.0, 8.0], [4.0, 12.0, 8.0]]]])  # (1, 2, 2, 3)
    got = pool_regions(maps, pts, GRID)
    want = torch.stack([(maps[0, :, 1, 1, 1] + maps[0, :, 2, 1, 1]) / 2,
                        (maps[0, :, 0, 3, 2] + maps[0, :, 1, 3, 2]) / 2])
    assert torch.allclose(got[0], want, atol=1e-6)


def test_dense_head_is_the_mlp_at_every_cell():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    maps = torch.randn(2, 3, 2, 3, 2)
    out = dense_head_apply(head, maps)
    assert out.shape == (2, 2, 2, 3, 2)
    assert torch.allclose(out[1, :, 1, 2, 0], head(maps[1, :, 1, 2, 0]), atol=1e-6)


def _pred(seed=0, b=2, p=6, c=5):
    g = torch.Generator().manual_seed(seed)
    maps = lambda: [torch.randn(b, c, 4, 4, 4, generator=g) for _ in range(2)]  # noqa: E731
    return {"p": [torch.randn(b, p, generator=g) for _ in range(2)], "z_target": [torch.randn(b, p, generator=g)
                                                                                    for _ in range(2)],
            "p_local": maps(), "z_local_target": maps(), "grid": [GRID, GRID], "input_size": [(16, 16, 16)] * 2}


def test_local_loss_equals_the_formula_region_by_region():
    """Regions centred on cell centres, boxes of two strides sampled 3 per axis: every sample is a cell centre, so
    a region's vector is the plain mean of 27 cells; view 1 is view 0 shifted by whole cells (scale 1)."""
    pred = _pred()
    pos_0 = torch.tensor([[[4.0, 4.0, 4.0], [4.0, 8.0, 8.0]], [[4.0, 8.0, 4.0], [8.0, 8.0, 4.0]]])
    shift = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, -4.0, 4.0]]])
    pos_1 = pos_0 + shift
    target = {"pos_0": pos_0, "pos_1": pos_1, "scale": torch.ones(2, 3)}
    loss = PGLLoss(local_weight=0.5, region_size=8.0, samples=3)
    total = loss(pred, target)

    def region(m, i, centre):
        c = [int(v) // 4 for v in centre]
        return m[i, :, c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2].reshape(m.shape[1], -1).mean(1)

    want = 0.0
    for a, b in ((0, 1), (1, 0)):
        terms = []
        for i in range(2):
            for r in range(2):
                q = region(pred["p_local"][a], i, (pos_0, pos_1)[a][i, r])
                z = region(pred["z_local_target"][b], i, (pos_0, pos_1)[b][i, r])
                terms.append(2 - 2 * float(F.cosine_similarity(q, z, dim=0)))
        want += sum(terms) / len(terms)
    glob = BYOLLoss()(pred).item()
    assert loss.last["local"] == pytest.approx(want, abs=1e-5)
    assert loss.last["global"] == pytest.approx(glob, abs=1e-6)
    assert total.item() == pytest.approx(glob + 0.5 * want, abs=1e-5)


def test_the_loss_reads_the_correspondence_from_the_target():
    pred = _pred()
    with pytest.raises(ValueError, match="scale"):
        PGLLoss()(pred, {"pos_0": torch.zeros(2, 3, 3), "pos_1": torch.zeros(2, 3, 3)})
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        PGLLoss()(pred, {"pos_0": torch.zeros(2, 3, 3), "pos_1": torch.zeros(2, 3, 3), "scale": torch.ones(3)})
    with pytest.raises(ValueError, match="local_weight=-1"):
        PGLLoss(local_weight=-1)
    assert get_method("pgl") == (PGL, PGLLoss)


def _tiny_pgl():
    from medsim.nn import Embedder

    enc = Embedder("resnet10", spatial_dims=3, in_channels=1, cut="layer2", attention="none", embedding_dim=16,
                   widen_factor=0.25)
    return PGL(enc, projection_dim=16, hidden_dim=32, momentum=0.9)


def _batches(n_batches=4, seed=0):
    from medsim.data.views3d import sam_view_transforms

    g = torch.Generator().manual_seed(seed)
    vol = F.interpolate(torch.rand(1, 1, 6, 6, 5, generator=g), size=(32, 32, 24), mode="trilinear")[0]
    make = sam_view_transforms((16, 16, 16), load=False, n_points=8, max_shift=0.2, noise=0.0, scale_key="scale")
    make.set_random_state(seed=seed)
    out = []
    for _ in range(n_batches):
        items = [make({"image": vol.clone()}) for _ in range(2)]
        out.append(([torch.stack([it["views"][v] for it in items]) for v in range(2)],
                    {k: torch.stack([it[k] for it in items]) for k in ("pos_0", "pos_1", "scale")}))
    return out


def test_the_target_branch_is_an_exact_ema_of_the_online_one():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = _tiny_pgl()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    views, target = _batches(1)[0]
    pairs = [(model.target_encoder, model.encoder), (model.target_projector, model.projector),
             (model.target_local_projector, model.local_projector)]
    PGLLoss()(model(views), target).backward()  # move the online weights away from the target's
    opt.step()
    before = [([t.clone() for t in tm.parameters()], [o.clone() for o in om.parameters()]) for tm, om in pairs]
    assert any(not torch.equal(t, o) for tb, ob in before for t, o in zip(tb, ob))
    model.update_target()  # the EMA step a training-mode forward pass starts with
    for (tm, om), (tb, ob) in zip(pairs, before):
        for t, t0, o0 in zip(tm.parameters(), tb, ob):
            assert torch.allclose(t, 0.9 * t0 + 0.1 * o0, atol=1e-6, rtol=0)  # float32 rounding
            assert not t.requires_grad
        for tbuf, obuf in zip(tm.buffers(), om.buffers()):
            assert torch.equal(tbuf, obuf)  # BatchNorm statistics are copied
    # a training-mode forward takes that step (parameters; the target's BatchNorm then sees the batch)
    after = [[0.9 * t + 0.1 * o for t, o in zip(tm.parameters(), om.parameters())] for tm, om in pairs]
    with torch.no_grad():
        model(views)
    for (tm, _), want in zip(pairs, after):
        assert all(torch.allclose(t, w, atol=1e-6, rtol=0) for t, w in zip(tm.parameters(), want))
    snapshot = [p.clone() for p in model.target_encoder.parameters()]
    model.eval()
    model(views)  # eval mode: no EMA step
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.target_encoder.parameters()))
    assert model.trainable_parameters() and all(p.requires_grad for p in model.trainable_parameters())
    assert not {id(p) for p in model.target_local_projector.parameters()} & {id(p) for p in
                                                                               model.trainable_parameters()}


def test_a_few_training_steps_lower_the_loss(adam_steps):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = _tiny_pgl()
    loss_fn = PGLLoss()
    losses, terms = adam_steps(model, loss_fn, _batches(4), 20)
    local = [t["local"] for t in terms]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"PGL loss first 4 steps {first:.3f} -> last 4 {last:.3f}; local {sum(local[:4]) / 4:.3f} -> "
          f"{sum(local[-4:]) / 4:.3f}")
    assert last < 0.7 * first and sum(local[-4:]) < 0.8 * sum(local[:4])
