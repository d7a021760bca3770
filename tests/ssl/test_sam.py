"""medsim.ssl.sam: SAM's loss against its formula written as loops, point sampling on the map grid, landmark
matching, and a few training steps on a tiny synthetic volume (Yan et al., TMI 2022)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsim.ssl import SAM, SAMLoss, get_method, info_nce_logits, match_points, sample_points
from medsim.ssl.sam import cell_centres

GRID = ((0.0, 0.0, 0.0), (4.0, 4.0, 4.0))  # cell i centred at voxel 4 i


def test_info_nce_logits_equals_the_formula():
    pos = torch.tensor([0.5, -0.2])
    neg = torch.tensor([[0.1, 0.3], [0.9, -1.0]])
    valid = torch.tensor([[True, False], [True, True]])
    t = 0.5
    want = (-math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2)))
            - math.log(math.exp(-0.4) / (math.exp(-0.4) + math.exp(1.8) + math.exp(-2.0)))) / 2
    assert info_nce_logits(pos, neg, t, valid).item() == pytest.approx(want, abs=1e-6)
    assert info_nce_logits(pos, neg, t).item() == pytest.approx(
        (-math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2) + math.exp(0.6))) + want * 2
         + math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2)))) / 2, abs=1e-6)


def test_sample_points_reads_the_cell_under_a_point_in_xyz_order():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(2, 5, 3, 4, 2), dim=1)  # non-cubic: a swapped axis would fail
    pts = torch.tensor([[[0.0, 0.0, 0.0], [8.0, 12.0, 4.0], [4.0, 8.0, 0.0]],
                        [[8.0, 0.0, 4.0], [0.0, 4.0, 0.0], [4.0, 12.0, 4.0]]])
    got = sample_points(emb, pts, GRID)
    for b in range(2):
        for p in range(3):
            i, j, k = (int(v) // 4 for v in pts[b, p])
            assert torch.allclose(got[b, p], emb[b, :, i, j, k], atol=1e-6)
    mid = sample_points(emb[:1], torch.tensor([[[2.0, 0.0, 0.0]]]), GRID)[0, 0]  # halfway between cells 0 and 1 on x
    assert torch.allclose(mid, F.normalize(emb[0, :, 0, 0, 0] + emb[0, :, 1, 0, 0], dim=0), atol=1e-6)
    assert torch.allclose(cell_centres((3, 4, 2), GRID)[5], torch.tensor([0.0, 8.0, 4.0]))  # index 5 = (0, 2, 1)


def _pred(seed=0, b=2, dg=3, dl=4):
    g = torch.Generator().manual_seed(seed)
    maps = lambda d, s: [F.normalize(torch.randn(b, d, *s, generator=g), dim=1) for _ in range(2)]  # noqa: E731
    return {"global": maps(dg, (2, 2, 2)), "local": maps(dl, (3, 3, 2)),  # no two local cells share a global value
            "grid": {"global": [((0.0, 0.0, 0.0), (8.0, 8.0, 8.0))] * 2, "local": [((0.0, 0.0, 0.0), (4.0,) * 3)] * 2}}


def _loop_info_nce(maps, pos, grid_stride, t, radius, a=0, b=1, negatives=None):
    """The loss as the paper writes it, one anchor at a time, points on cell centres (sampling = indexing)."""
    total, n = 0.0, 0
    B, P = pos[a].shape[:2]
    for i in range(B):
        for p in range(P):
            idx = lambda q, s: tuple(int(round(float(v) / s)) for v in q)  # noqa: E731
            f = maps[a][i, :, *idx(pos[a][i, p], grid_stride)]
            f_pos = maps[b][i, :, *idx(pos[b][i, p], grid_stride)]
            terms = [math.exp(float(f @ f_pos) / t)]
            for j in range(B):
                for cell in torch.cartesian_prod(*[torch.arange(s) for s in maps[b].shape[2:]]):
                    centre = cell.float() * grid_stride
                    if j == i and torch.dist(centre, pos[b][i, p]) < radius:
                        continue
                    if negatives is not None and (j, *cell.tolist()) not in negatives[(i, p)]:
                        continue
                    terms.append(math.exp(float(f @ maps[b][j, :, *cell]) / t))
            total += -math.log(terms[0] / sum(terms))
            n += 1
    return total / n


def _positions():
    pos_0 = torch.tensor([[[0.0, 0.0, 0.0], [8.0, 8.0, 0.0]], [[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]]])
    pos_1 = torch.tensor([[[8.0, 8.0, 0.0], [0.0, 8.0, 0.0]], [[0.0, 0.0, 0.0], [8.0, 0.0, 0.0]]])
    return pos_0, pos_1


def test_global_term_equals_the_paper_formula():
    pred, (p0, p1) = _pred(), _positions()
    loss = SAMLoss(temperature=0.3, symmetric=False)
    got = loss.global_loss(pred, [p0, p1], 0, 1).item()
    want = _loop_info_nce(pred["global"], [p0, p1], 8.0, 0.3, radius=8.0)
    assert got == pytest.approx(want, abs=1e-5)
    # symmetric: the mean of both directions (+ the local term, checked below)
    sym = SAMLoss(temperature=0.3, n_hard=1000, n_random=0)
    total = sym(pred, {"pos_0": p0, "pos_1": p1}).item()
    want_g = (want + _loop_info_nce(pred["global"], [p0, p1], 8.0, 0.3, 8.0, a=1, b=0)) / 2
    want_l = (_loop_info_nce(pred["local"], [p0, p1], 4.0, 0.3, 4.0)
              + _loop_info_nce(pred["local"], [p0, p1], 4.0, 0.3, 4.0, a=1, b=0)) / 2
    assert sym.last["global"] == pytest.approx(want_g, abs=1e-5)
    assert sym.last["local"] == pytest.approx(want_l, abs=1e-5)
    assert total == pytest.approx(want_g + want_l, abs=1e-5)


def test_local_hard_negatives_are_the_most_globally_similar_cells():
    pred, (p0, p1) = _pred(seed=3), _positions()
    loss = SAMLoss(temperature=0.5, n_hard=3, n_random=0, symmetric=False)
    got = loss.local_loss(pred, [p0, p1], 0, 1).item()
    # the hard negatives by hand: global embedding of the anchor vs the global map at each local cell
    negatives = {}
    for i in range(2):
        for p in range(2):
            g_anchor = pred["global"][0][i, :, *(int(v) // 8 for v in p0[i, p])]
            scored = []
            for j in range(2):
                for cell in torch.cartesian_prod(*[torch.arange(s) for s in (3, 3, 2)]):
                    centre = cell.float() * 4
                    if j == i and torch.dist(centre, p1[i, p]) < 4.0:
                        continue
                    g_cell = sample_points(pred["global"][1][j:j + 1], centre.view(1, 1, 3), ((0.0,) * 3, (8.0,) * 3),
                                           normalize=False)  # the global similarity map, upsampled
                    scored.append((float(g_anchor @ g_cell[0, 0]), (j, *cell.tolist())))
            negatives[(i, p)] = {c for _, c in sorted(scored, reverse=True)[:3]}
    want = _loop_info_nce(pred["local"], [p0, p1], 4.0, 0.5, 4.0, negatives=negatives)
    assert got == pytest.approx(want, abs=1e-5)


def test_random_negatives_never_repeat_the_hard_ones_or_the_positive_neighbourhood():
    pred, (p0, p1) = _pred(seed=1), _positions()
    loss = SAMLoss(n_hard=2, n_random=1000, symmetric=False)  # more than there are cells: every valid one
    full = SAMLoss(n_hard=1000, n_random=0, symmetric=False)
    assert loss.local_loss(pred, [p0, p1], 0, 1).item() == pytest.approx(full.local_loss(pred, [p0, p1], 0, 1).item(), abs=1e-6)


def test_the_loss_reads_points_from_the_target_and_checks_them():
    pred = _pred()
    with pytest.raises(ValueError, match="pos_0"):
        SAMLoss()(pred, {"label": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"\(B, P, 3\)"):
        SAMLoss()(pred, {"pos_0": torch.zeros(2, 3), "pos_1": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="n_hard"):
        SAMLoss(n_hard=0, n_random=0)
    assert get_method("sam") == (SAM, SAMLoss)


def test_match_points_finds_the_same_cell_in_identical_views():
    pred = _pred(seed=2)
    pred["local"][1], pred["global"][1] = pred["local"][0], pred["global"][0]
    pts = torch.tensor([[[4.0, 0.0, 4.0], [8.0, 8.0, 0.0]], [[0.0, 4.0, 0.0], [4.0, 4.0, 4.0]]])
    assert torch.equal(match_points(pred, pts), pts)


def _tiny_sam():
    from medsim.nn import SAMNet

    return SAMNet("resnet10", widen_factor=0.25, global_dim=16, local_dim=16, conv1_t_stride=1)


def test_sam_trains_on_a_tiny_volume_and_positives_end_up_closer_than_negatives(adam_steps):
    """A few Adam steps on paired crops of one smooth synthetic volume: the loss goes down, and the positive pairs'
    local similarity ends above the mean similarity to the negatives (fresh crops, not those trained on)."""
    from medsim.data.views3d import sam_view_transforms

    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    vol = F.interpolate(torch.rand(1, 1, 6, 6, 5, generator=g), size=(32, 32, 24), mode="trilinear")[0]
    make = sam_view_transforms((16, 16, 16), load=False, n_points=16, max_shift=0.2, noise=0.0)
    make.set_random_state(seed=0)

    def batch(n=2):
        items = [make({"image": vol.clone()}) for _ in range(n)]
        views = [torch.stack([it["views"][v] for it in items]) for v in range(2)]
        return views, {k: torch.stack([it[k] for it in items]) for k in ("pos_0", "pos_1")}

    model = SAM(_tiny_sam())
    loss_fn = SAMLoss(temperature=0.5, n_hard=16, n_random=16)
    losses, _ = adam_steps(model, loss_fn, [batch() for _ in range(4)], 24)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"SAM loss first 4 steps {first:.3f} -> last 4 {last:.3f}")
    assert last < 0.8 * first
    model.eval()
    with torch.no_grad():
        views, target = batch()
        pred = model(views)
        l0 = sample_points(pred["local"][0], target["pos_0"], pred["grid"]["local"][0])
        l1 = sample_points(pred["local"][1], target["pos_1"], pred["grid"]["local"][1])
        pos_sim = (l0 * l1).sum(-1).mean().item()
        cells = pred["local"][1].flatten(2)  # every cell of view 1 as a (mostly) negative
        neg_sim = torch.einsum("bpd,bdm->bpm", l0, cells).mean().item()
    print(f"positive similarity {pos_sim:.3f}, mean over view-1 cells {neg_sim:.3f}")
    assert pos_sim > neg_sim + 0.1


def test_match_points_is_the_deployed_landmark_rule():
    """The validation metric's search (torch, voxel-index coordinates) finds what the torch-free
    medsim.deploy.landmark.match_point finds (continuous coordinates: + 0.5) on the same two volumes."""
    from medsim.deploy.landmark import DenseEmbedding, match_point

    torch.manual_seed(0)
    net = _tiny_sam().eval()
    model = SAM(net)
    views = [torch.rand(1, 1, 16, 16, 12), torch.rand(1, 1, 16, 16, 12)]
    with torch.no_grad():
        pred = model(views)
    pts = torch.tensor([[[3.0, 5.0, 2.0], [10.0, 1.0, 7.0], [15.0, 15.0, 11.0], [7.5, 8.25, 4.0]]])
    found = match_points(pred, pts)[0]
    dense = [{n: DenseEmbedding(pred[n][v][0].numpy(), net.map_geometry(n, (16, 16, 12))) for n in ("global", "local")}
             for v in range(2)]
    for p, f in zip(pts[0], found):
        m = match_point(dense[0], (p + 0.5).numpy(), dense[1])
        assert torch.allclose(torch.as_tensor(m.point, dtype=torch.float32), f + 0.5), (p, f, m.point)
