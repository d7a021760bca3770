"""medsim.deploy.localizer: attention (1, x, y) → heatmap / mask / boxes at image resolution, axis order, the
metrics (checked against hand-computed values) and the files written by ``Localizer.save``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsim.deploy import DeployError
from medsim.deploy.localizer import (Localization, Localizer, bilinear_resize, box_hit, box_iou, dice, iou,
                                     mask_box, otsu_threshold, pointing_game)

H, W = 48, 64  # non-square on purpose: a transposed map cannot pass for the right one


def disk(h: int, w: int, row: float, col: float, r: float) -> np.ndarray:
    """(h, w) bool disk, row-major."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - row) ** 2 + (xx - col) ** 2 <= r ** 2


def as_attention(heat_hw: np.ndarray) -> np.ndarray:
    """A row-major (H, W) map → the model's (1, x, y) MONAI-order attention."""
    return heat_hw.T[None].astype(np.float32)


def test_blob_at_full_resolution_gives_its_box_and_dice_one():
    gt = disk(H, W, row=12, col=44, r=6)  # top-right
    att = as_attention(0.1 + 0.8 * gt)
    loc = Localizer().localize(att, (H, W))
    assert loc.heatmap.shape == (H, W) and loc.mask.shape == (H, W) and loc.mask.dtype == bool
    assert 0.0 <= loc.heatmap.min() and loc.heatmap.max() <= 1.0
    assert dice(loc.mask, gt) == 1.0 and iou(loc.mask, gt) == 1.0
    assert len(loc.boxes) == 1
    b = loc.boxes[0]
    assert (b["x0"], b["y0"], b["x1"], b["y1"]) == (38, 6, 51, 19) == mask_box(gt)
    assert b["area"] == int(gt.sum()) and b["score"] == pytest.approx(1.0) and b["peak"] == pytest.approx(1.0)


def test_axis_order_top_right_stays_top_right():
    # low-resolution attention as the model emits it: (1, x, y) with x = 4 columns, y = 3 rows; the hot cell is
    # the last column, first row = top-right of the image
    att = np.zeros((1, 4, 3), dtype=np.float32)
    att[0, 3, 0] = 1.0
    loc = Localizer(threshold=0.5, min_area=1).localize(att, (H, W))
    r, c = np.unravel_index(np.argmax(loc.heatmap), loc.heatmap.shape)
    assert r < H / 4 and c > 3 * W / 4, (r, c)
    assert len(loc.boxes) == 1
    b = loc.boxes[0]
    assert b["x0"] > W / 2 and b["y1"] <= H / 2, b  # right half, top half
    assert not loc.mask[:, : W // 2].any() and not loc.mask[H // 2:].any()
    # the same map given in (H, W) order by mistake would light the bottom-left: the transpose matters
    wrong = Localizer(threshold=0.5, min_area=1).localize(att[0].T[None], (H, W))
    assert wrong.boxes[0]["x1"] <= W / 2 and wrong.boxes[0]["y0"] >= H / 2


def test_heatmap_matches_torch_bilinear_upsampling_of_the_transposed_map():
    torch = pytest.importorskip("torch")
    from medsim.nn import upsample_attention

    rng = np.random.default_rng(0)
    att = rng.random((1, 5, 3)).astype(np.float32)  # (1, x, y)
    ref = upsample_attention(torch.from_numpy(att)[None], (W, H))[0, 0].numpy().T  # MONAI order, then (H, W)
    got = Localizer(normalize=False).heatmap(att, (H, W))
    assert got.shape == (H, W)
    assert np.abs(got - ref).max() < 1e-6
    assert np.abs(bilinear_resize(att[0].T, (H, W)) - ref).max() < 1e-6


def test_two_blobs_two_components_sorted_by_score_min_area_and_max_boxes():
    heat = np.zeros((H, W))
    hot, warm, speck = disk(H, W, 36, 12, 5), disk(H, W, 10, 48, 7), disk(H, W, 40, 56, 0.5)
    heat[warm] = 0.6
    heat[hot] = 1.0
    heat[speck] = 0.9  # a 1-pixel component, below min_area
    loc = Localizer(threshold=0.3, min_area=4, normalize=False).localize(as_attention(heat), (H, W))
    assert len(loc.boxes) == 2
    assert [b["score"] for b in loc.boxes] == sorted((b["score"] for b in loc.boxes), reverse=True)
    assert loc.boxes[0]["score"] == pytest.approx(1.0) and loc.boxes[1]["score"] == pytest.approx(0.6)
    assert (loc.boxes[0]["x0"], loc.boxes[0]["y0"]) == mask_box(hot)[:2]
    assert (loc.boxes[1]["x0"], loc.boxes[1]["y0"]) == mask_box(warm)[:2]
    assert np.array_equal(loc.mask, hot | warm)  # the speck is gone from the mask too
    one = Localizer(threshold=0.3, min_area=4, normalize=False, max_boxes=1).localize(as_attention(heat), (H, W))
    assert len(one.boxes) == 1 and np.array_equal(one.mask, hot)
    by_max = Localizer(threshold=0.3, min_area=1, normalize=False, score="max").localize(as_attention(heat), (H, W))
    assert [round(b["score"], 3) for b in by_max.boxes] == [1.0, 0.9, 0.6]


def test_constant_attention_gives_nothing():
    loc = Localizer().localize(np.full((1, 4, 4), 0.5, np.float32), (16, 16))
    assert not loc.mask.any() and loc.boxes == [] and np.all(loc.heatmap == 0)


def test_otsu_matches_skimage():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = np.concatenate([rng.normal(0.2, 0.05, 400), rng.normal(0.7, 0.1, 200)])
        assert otsu_threshold(v) == pytest.approx(filters.threshold_otsu(v), abs=1e-12)


def test_metrics_hand_computed():
    m = np.zeros((4, 4), bool)
    g = np.zeros((4, 4), np.uint8)
    m[0, 0:4] = True  # 4 pixels
    g[0, 1:4] = 255  # 3 of them ...
    g[1, 0:3] = 255  # ... plus 3 more: |g| = 6, |m ∩ g| = 3, |m ∪ g| = 7
    assert dice(m, g) == pytest.approx(2 * 3 / (4 + 6))
    assert iou(m, g) == pytest.approx(3 / 7)
    assert dice(np.zeros((4, 4), bool), np.zeros((4, 4))) == 1.0 == iou(np.zeros((4, 4), bool), np.zeros((4, 4)))
    assert dice(m, np.zeros((4, 4))) == 0.0
    with pytest.raises(DeployError, match="shapes differ"):
        dice(m, np.zeros((5, 4)))

    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0  # in g
    assert pointing_game(heat, g) is True
    heat[:] = 0
    heat[3, 3] = 1.0  # not in g; nearest g pixel (1, 2) is sqrt(4 + 1) away
    assert pointing_game(heat, g) is False
    assert pointing_game(heat, g, tolerance=2) is False and pointing_game(heat, g, tolerance=3) is True
    with pytest.raises(DeployError, match="empty"):
        pointing_game(heat, np.zeros((4, 4)))


def test_box_hit_rule():
    g = np.zeros((40, 40), bool)
    g[10:20, 10:20] = True  # gt box (10, 10, 20, 20), centroid (15, 15)
    assert box_iou((10, 10, 20, 20), (12, 10, 22, 20)) == pytest.approx(80 / 120)
    assert box_hit([{"x0": 12, "y0": 10, "x1": 22, "y1": 20, "score": 1}], g)  # IoU 0.667 >= 0.5
    assert not box_hit([(0, 0, 12, 12)], g)  # IoU 4/240, centroid outside
    assert box_hit([(5, 10, 15, 20)], g, iou_threshold=0.3)  # IoU 1/3
    assert not box_hit([(5, 10, 15, 20)], g, centroid=False)
    tiny = (14, 14, 16, 16)  # IoU 0.04 but holds the centroid
    assert box_hit([tiny], g) and not box_hit([tiny], g, centroid=False)
    assert box_hit([(0, 0, 12, 12), tiny], g)  # any box counts
    assert not box_hit([], g)
    with pytest.raises(DeployError, match="empty"):
        box_hit([tiny], np.zeros((40, 40)))


def test_save_writes_decodable_files(tmp_path):
    gt = disk(H, W, 30, 20, 8)
    loc = Localizer().localize(as_attention(0.2 + 0.7 * gt), (H, W))
    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    paths = Localizer().save(loc, tmp_path / "out", "case1", image=tmp_path / "img.png")
    assert set(paths) == {"mask", "boxes", "overlay"} and all(p.is_file() for p in paths.values())
    mask = np.asarray(Image.open(paths["mask"]))
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, loc.mask)
    data = json.loads(paths["boxes"].read_text())
    assert data["image_size"] == [H, W] and data["boxes"] == loc.boxes and data["threshold"] == loc.threshold
    over = np.asarray(Image.open(paths["overlay"]))
    assert over.shape == (H, W, 3) and over.dtype == np.uint8
    assert np.array_equal(over[0, 0], rgb[0, 0])  # zero heat leaves the image untouched (away from boxes)
    assert not np.array_equal(over[30, 20], rgb[30, 20])  # the lesion is tinted
    b = loc.boxes[0]
    assert tuple(over[b["y0"], b["x0"] + 2]) == (0, 255, 0)  # box outline
    # arrays and no image at all work too; a wrong-sized image is refused with both sizes in the message
    assert Localizer().save(loc, tmp_path / "out", "case2", image=rgb[..., 0])["overlay"].is_file()
    assert Localizer().save(loc, tmp_path / "out", "case3")["overlay"].is_file()
    with pytest.raises(DeployError, match=r"48x64"):
        Localizer().save(loc, tmp_path / "out", "bad", image=rgb[:10])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("kw, match", [({"threshold": "mean"}, "otsu"), ({"threshold": 1.5}, "otsu"),
                                       ({"min_area": -1}, "min_area"), ({"score": "sum"}, "score"),
                                       ({"max_boxes": 0}, "max_boxes")])
def test_invalid_arguments(kw, match):
    with pytest.raises(DeployError, match=match):
        Localizer(**kw)


def test_bad_attention_shapes():
    with pytest.raises(DeployError, match=r"\(1, x, y\)"):
        Localizer().localize(np.zeros((2, 4, 4)), (8, 8))
    with pytest.raises(DeployError, match="NaN"):
        Localizer().localize(np.full((1, 4, 4), np.nan), (8, 8))
    assert isinstance(Localizer().localize(np.zeros((4, 4)), (8, 8)), Localization)  # (x, y) without channel


# ------------------------------------------------------------------- patch P/R, VOC matching and detection AP
def test_patch_counts_use_monai_axis_order_and_the_half_covered_rule():
    from medsim.deploy.localizer import patch_counts

    gt = np.zeros((40, 40), bool)
    gt[:10, :] = True  # the top band = grid row 0
    gt[10:14, :20] = True  # 40 % of cells (1, 0) and (1, 1): not lesion patches
    att = np.zeros((1, 4, 4), np.float32)  # (1, x, y): y = 0 is the top row
    att[0, :, 0] = 1.0
    assert patch_counts(att, gt) == (4, 0, 0)
    att[0, 0, 1] = 1.0  # also selects cell (row 1, col 0)
    assert patch_counts(att, gt) == (4, 1, 0)
    assert patch_counts(att.transpose(0, 2, 1), gt) == (2, 3, 2)  # the transposed map: column 0 + (0, 1)
    gt[10:15, :20] = True  # now exactly half of cells (1, 0), (1, 1)
    assert patch_counts(att, gt) == (5, 0, 1)


def _ap_by_definition(scores, tps, n_gt):
    """AP as Σ over recall steps of the best precision at that recall or beyond (a plain loop)."""
    ranked = sorted(zip(scores, tps), key=lambda t: -t[0])
    pr, tp = [], 0
    for i, (_, hit) in enumerate(ranked, 1):
        tp += hit
        pr.append((tp / n_gt, tp / i))
    ap, prev_r = 0.0, 0.0
    for r, _ in pr:
        if r > prev_r:
            ap += (r - prev_r) * max(p for rr, p in pr if rr >= r)
            prev_r = r
    return ap


def test_average_precision_against_its_definition():
    from medsim.deploy.localizer import average_precision

    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 3) == pytest.approx(5 / 9)
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        scores, tps = rng.random(n).tolist(), (rng.random(n) < 0.5).tolist()
        n_gt = max(1, sum(tps) + int(rng.integers(0, 5)))
        assert average_precision(scores, tps, n_gt) == pytest.approx(_ap_by_definition(scores, tps, n_gt))
    assert average_precision([], [], 4) == 0.0
    with pytest.raises(ValueError, match="n_gt=0"):
        average_precision([0.5], [True], 0)


def test_match_boxes_takes_each_ground_truth_once():
    from medsim.deploy.localizer import match_boxes

    gt = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert match_boxes([(0, 0, 10, 10), (1, 1, 10, 10), (20, 20, 31, 30), (50, 50, 60, 60)], gt) == \
        [True, False, True, False]
    assert match_boxes([(0, 0, 10, 4)], gt) == [False]  # IoU 0.4
    assert match_boxes([], gt) == [] and match_boxes([(0, 0, 1, 1)], []) == [False]
