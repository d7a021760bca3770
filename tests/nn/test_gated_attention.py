"""Gated attention (Fan et al., MICCAI 2020): Eq. 1–2 against a direct implementation, every Table 2 module on one
contract, traceable connected components against scipy, crops, the whole FineGrainedMIL (shapes, gradients, ONNX
boxes), a toy problem where the discriminative blob is known, and tile-wise prediction on a TIFF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsim.nn.gated_attention import (FINE_GRAINED_ATTENTIONS, FineGrainedMIL, GatedAttention, crop_boxes,
                                       create_fine_grained_attention, label_components, largest_components,
                                       tile_predictions)


def _tiny(**kw) -> FineGrainedMIL:
    torch.manual_seed(0)
    return FineGrainedMIL(3, **{"backbone": "resnet10", "widen_factor": 0.25, "cut": "layer2", "global_size": 32,
                                "local_size": 16, "n_instances": 2, "embedding_dim": 8, **kw})


# ---------------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("name", sorted(set(FINE_GRAINED_ATTENTIONS) - {"none"}))  # "none" is the one NoAttention
@pytest.mark.parametrize("dims", [2, 3])  # shapes, gradients, input check: the registry sweep (test_attention_factory)
def test_every_table2_module_reads_its_map_out_of_its_features(name, dims):
    torch.manual_seed(0)
    m = create_fine_grained_attention(name, 16, spatial_dims=dims)
    with torch.no_grad():
        feats, att = m(torch.rand(2, 16, *([5] * dims)))
    assert float(att.min()) == 0.0 and float(att.max()) == pytest.approx(1.0)  # min–max per image
    # the map is the channel mean of the returned features, min–max scaled
    raw = feats.mean(1, keepdim=True).flatten(1)
    ref = (raw - raw.amin(1, keepdim=True)) / (raw.amax(1, keepdim=True) - raw.amin(1, keepdim=True))
    torch.testing.assert_close(att.flatten(1), ref, atol=1e-5, rtol=0)


def test_factory_did_you_mean():
    with pytest.raises(ValueError, match="gated"):
        create_fine_grained_attention("gatd", 8)


def test_gated_attention_eq1_eq2_against_a_direct_implementation():
    torch.manual_seed(0)
    m = GatedAttention(6, dilation=(1, 2), hidden=4).eval()
    x = torch.randn(2, 6, 4, 5)  # signed features: some X_kᵀS < 0, so ReLU(tanh(·)) = 0 for them
    maps = m.maps(x)
    with torch.no_grad():
        blocks = [blk(x) for blk in m.blocks]  # Wᵀ X of each dilated block
    for b in range(2):
        mm = [[sum(float(o[b, k, i, j]) for o in blocks for k in range(o.shape[1])) for j in range(5)]
              for i in range(4)]  # M = Σ_k Wᵀ X_k
        z = sum(math.exp(mm[i][j]) for i in range(4) for j in range(5))
        s = [[math.exp(mm[i][j]) / z for j in range(5)] for i in range(4)]  # Eq. 1
        gates = [max(0.0, math.tanh(sum(float(x[b, k, i, j]) * s[i][j] for i in range(4) for j in range(5))))
                 for k in range(6)]  # ReLU(tanh(X_kᵀ S))
        omega = [[sum(float(x[b, k, i, j]) * gates[k] for k in range(6)) / 6 for j in range(5)]
                 for i in range(4)]  # Eq. 2
        torch.testing.assert_close(maps["semantic"][b, 0], torch.tensor(s), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(maps["gate"][b], torch.tensor(gates), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(maps["omega"][b, 0], torch.tensor(omega), atol=1e-6, rtol=1e-5)
        assert min(gates) == 0.0 and max(gates) > 0.0
    feats, att = m(x)
    torch.testing.assert_close(feats, maps["features"])
    torch.testing.assert_close(feats.mean(1, keepdim=True), maps["omega"])


# ---------------------------------------------------------------------------------------------------- instances
@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_scipy_on_random_grids(connectivity):
    from scipy import ndimage

    rng = np.random.default_rng(connectivity)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(1, 11, 2))
        masks = rng.random((3, h, w)) < rng.uniform(0.2, 0.8)
        labels = label_components(torch.from_numpy(masks), connectivity=connectivity).numpy()
        n_max = h * w
        boxes, sizes, valid = largest_components(torch.from_numpy(labels), n_max)
        for b in range(3):
            ref, n = ndimage.label(masks[b], structure=structure)
            assert ((labels[b] > 0) == masks[b]).all()
            pairs = set(zip(ref[masks[b]].tolist(), labels[b][masks[b]].tolist()))
            assert len(pairs) == n and len({p[1] for p in pairs}) == n  # the same partition into components
            want = sorted(((int((ref == k).sum()), s[0].start, s[1].start, s[0].stop, s[1].stop)
                           for k, s in enumerate(ndimage.find_objects(ref), 1)), reverse=True)
            got = sorted(((int(sz), *map(int, bx)) for sz, bx, ok in zip(sizes[b], boxes[b], valid[b]) if ok),
                         reverse=True)
            assert got == want  # every component once, with its exact size and box
            assert int(valid[b].sum()) == n and sizes[b].tolist() == sorted(sizes[b].tolist(), reverse=True)


def test_label_propagation_needs_more_than_h_plus_w_steps_on_a_spiral():
    from scipy import ndimage

    spiral = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                           [0, 0, 0, 0, 0, 0, 1],
                           [1, 1, 1, 1, 1, 0, 1],
                           [1, 0, 0, 0, 1, 0, 1],
                           [1, 0, 1, 1, 1, 0, 1],
                           [1, 0, 0, 0, 0, 0, 1],
                           [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)[None]
    assert ndimage.label(spiral[0].numpy())[1] == 1
    assert len(label_components(spiral, connectivity=4).unique()) == 2  # default h·w − 1 steps: one component
    assert len(label_components(spiral, connectivity=4, iterations=14).unique()) > 2  # h + w steps are not enough


def test_largest_components_pick_by_size_and_pad():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0:2, 0:3] = True  # 6 cells, rows 0–1, columns 0–2
    mask[0, 4, 4:6] = True  # 2 cells
    mask[0, 5, 0] = True  # 1 cell
    boxes, sizes, valid = largest_components(label_components(mask), 4)
    assert sizes[0].tolist() == [6, 2, 1, 0] and valid[0].tolist() == [True, True, True, False]
    assert boxes[0, :3].tolist() == [[0, 0, 2, 3], [4, 4, 5, 6], [5, 0, 6, 1]]
    m = _tiny(n_instances=3, threshold=0.5)
    att = mask.float().unsqueeze(1)
    px, valid = m.instance_boxes(att, (120, 60))  # cells of 20 × 10 input pixels; 3rd slot: whole image
    assert px[0].tolist() == [[0, 0, 40, 30], [80, 40, 100, 60], [100, 0, 120, 10]]
    m = _tiny(n_instances=4, threshold=0.5)
    px, valid = m.instance_boxes(att, (120, 60))
    assert px[0, 3].tolist() == [0, 0, 120, 60] and valid[0].tolist() == [True, True, True, False]


def _bilinear(img: np.ndarray, px: float, py: float) -> np.ndarray:
    """img (C, X, Y) at the continuous pixel position (px, py), borders repeated (grid_sample "border")."""
    px, py = min(max(px, 0.0), img.shape[1] - 1), min(max(py, 0.0), img.shape[2] - 1)
    i0, j0 = int(math.floor(px)), int(math.floor(py))
    i1, j1 = min(i0 + 1, img.shape[1] - 1), min(j0 + 1, img.shape[2] - 1)
    a, b = px - i0, py - j0
    return ((1 - a) * (1 - b) * img[:, i0, j0] + a * (1 - b) * img[:, i1, j0] + (1 - a) * b * img[:, i0, j1]
            + a * b * img[:, i1, j1])


def test_crop_boxes_against_the_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10)
    boxes = torch.tensor([[[2, 1, 6, 9], [0, 0, 12, 10]], [[5.5, 4, 9, 6.5], [3, 3, 5, 4]]])
    crops = crop_boxes(x, boxes, (4, 8))
    assert crops.shape == (4, 3, 4, 8)
    torch.testing.assert_close(crops[0], x[0, :, 2:6, 1:9])  # box size = crop size: an exact copy
    torch.testing.assert_close(crops[1], F.interpolate(x[:1], size=(4, 8), mode="bilinear", align_corners=False)[0])
    xs = x.numpy()
    for row, (b, n) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x0, y0, x1, y1 = boxes[b, n].tolist()
        for i in range(4):  # sample (i, j) at the centre of the i-th of 4 parts of [x0, x1), j-th of 8 of [y0, y1)
            for j in range(8):
                ref = _bilinear(xs[b], x0 + (x1 - x0) * (i + 0.5) / 4 - 0.5, y0 + (y1 - y0) * (j + 0.5) / 8 - 0.5)
                np.testing.assert_allclose(crops[row, :, i, j].numpy(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- model
def test_model_outputs_and_plain_baseline():
    m = _tiny().eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 48))
    assert out["embedding"].shape == (2, 8) and out["attention"].shape == (2, 1, 4, 4)  # 32 px → layer2: 1/8
    assert out["logits"].shape == out["global_logits"].shape == (2, 3)
    assert out["instance_boxes"].shape == (2, 2, 4) and out["instance_valid"].shape == (2, 2)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(2))
    b = out["instance_boxes"]
    assert (b[..., 0] >= 0).all() and (b[..., 2] <= 64).all() and (b[..., 3] <= 48).all()
    assert (b[..., 2] > b[..., 0]).all() and (b[..., 3] > b[..., 1]).all()
    assert float(out["attention"].min()) >= 0 and float(out["attention"].max()) <= 1
    plain = _tiny(n_instances=0, attention="none").eval()
    assert plain.local_trunk is None
    with torch.no_grad():
        p = plain(torch.randn(2, 3, 64, 48))
    torch.testing.assert_close(p["logits"], p["global_logits"])
    assert p["instance_boxes"].shape == (2, 0, 4)
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 64, 48\)"):
        m(torch.randn(2, 1, 64, 48))
    with pytest.raises(ValueError, match="threshold"):
        _tiny(threshold=1.5)


def test_gradients_reach_both_branches():
    from medsim.losses.fine_grained import FineGrainedLoss

    m = _tiny(instance_pool="concat", embedding_dim=None)
    loss_fn = FineGrainedLoss(fixed_lambda=0.5)
    loss_fn(m(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0])).backward()
    for name in ("trunk.0.weight", "attention.blocks.0.conv.weight", "global_classifier.weight",
                 "local_trunk.0.weight", "fusion_classifier.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name
    assert m.embed is None  # the embedding is the fused features the CE terms train, not an untrained head
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = m.eval()(x)
        g = m.global_branch(x)[0].flatten(2).mean(-1)
        fused = torch.cat([g, m.instance_features(x, out["instance_boxes"])], 1)
    torch.testing.assert_close(out["embedding"], F.normalize(fused, dim=1))
    assert m.embedding_dim == fused.shape[1]
    local_channels = m.local_trunk[-1][-1].conv2.out_channels
    assert m.fusion_classifier.in_features == m.global_classifier.in_features + 2 * local_channels  # concat of N = 2


def test_boxes_and_outputs_match_in_onnx(tmp_path):
    from medsim.export.onnx_export import ExportWrapper, export_module, ort_session

    m = _tiny().eval()
    x = torch.randn(3, 3, 64, 48)
    export_module(m, x[:2], tmp_path / "m.onnx", opset=17)
    got = ort_session(tmp_path / "m.onnx").run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = m(x)
    for name, arr in zip(("embedding", "attention", "logits"), got):
        np.testing.assert_allclose(arr, ref[name].numpy(), atol=1e-4)
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(ExportWrapper(m, ["instance_boxes"]).eval(), (x[:2],), str(tmp_path / "b.onnx"),
                          opset_version=17, dynamo=False, input_names=["image"], output_names=["instance_boxes"],
                          dynamic_axes={"image": {0: "batch"}, "instance_boxes": {0: "batch"}})
    boxes = ort_session(tmp_path / "b.onnx").run(None, {"image": x.numpy()})[0]
    np.testing.assert_array_equal(boxes, ref["instance_boxes"].numpy())


def _blob_images(n: int, seed: int, side: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64×64 noise with a discriminative square (red: class 0, blue: class 1) and an equally bright green
    distractor square in both classes; returns images, labels and the two squares' top-left corners (n, 2, 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.zeros(n, 2, 2, dtype=torch.long)
    for i in range(n):
        p = torch.randint(0, 64 - side, (2, 2), generator=g)
        while (p[0] - p[1]).abs().max() < side + 2:
            p = torch.randint(0, 64 - side, (2, 2), generator=g)
        pos[i] = p
        for (r, c), ch in ((p[0], 0 if y[i] == 0 else 2), (p[1], 1)):
            x[i, ch, r:r + side, c:c + side] += 1.5
    return x, y, pos


def _peak_in(att: torch.Tensor, corner: torch.Tensor, side: int = 12, cell: int = 8) -> torch.Tensor:
    """Does the cell with the largest attention touch the square at ``corner``?"""
    a = att[:, 0].flatten(1).argmax(1)
    r, c = (a // att.shape[3]) * cell + cell / 2, (a % att.shape[3]) * cell + cell / 2
    return ((r >= corner[:, 0] - cell / 2) & (r <= corner[:, 0] + side + cell / 2)
            & (c >= corner[:, 1] - cell / 2) & (c <= corner[:, 1] + side + cell / 2))


def test_attention_finds_the_discriminative_blob():
    torch.manual_seed(0)
    m = FineGrainedMIL(2, backbone="resnet10", widen_factor=0.25, cut="layer2", global_size=64, local_size=16,
                       n_instances=1, embedding_dim=8)
    xt, yt, pt = _blob_images(128, seed=1)
    with torch.no_grad():
        before = _peak_in(m.eval()(xt)["attention"], pt[:, 0]).float().mean()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    m.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two on a shared CPU
    try:
        for step in range(60):  # the global loss (λ = 1) trains the attention
            x, y, _ = _blob_images(32, seed=100 + step)
            loss = F.cross_entropy(m(x)["global_logits"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        out = m.eval()(xt)
    assert float((out["global_logits"].argmax(1) == yt).float().mean()) >= 0.95
    assert before < 0.7  # untrained: the peak is on either square
    assert float(_peak_in(out["attention"], pt[:, 0]).float().mean()) >= 0.95  # Ω peaks on the discriminative one
    assert float(_peak_in(out["attention"], pt[:, 1]).float().mean()) <= 0.05
    centre = pt[:, 0].float() + 6
    box = out["instance_boxes"][:, 0]
    inside = (box[:, 0] <= centre[:, 0]) & (centre[:, 0] < box[:, 2]) & (box[:, 1] <= centre[:, 1]) & \
        (centre[:, 1] < box[:, 3])
    assert float(inside.float().mean()) >= 0.95  # the top instance box holds it


# ---------------------------------------------------------------------------------------------------- tiles
def test_tile_predictions_on_a_tiff_and_an_array(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (96, 160, 3), dtype=np.uint8)  # dark enough to count as tissue everywhere
    tif = tmp_path / "slide.tif"
    tifffile.imwrite(tif, img, tile=(32, 32), photometric="rgb")
    m = _tiny().eval()
    from_tiff = tile_predictions(m, tif, tile_size=(48, 64), input_size=(64, 48), batch_size=4)
    from_array = tile_predictions(m, img, tile_size=(48, 64), input_size=(64, 48), batch_size=3)
    assert from_tiff["locations"].tolist() == [[0, 0], [0, 64], [48, 0], [48, 64]]  # (row, column), 2 × 2 tiles
    np.testing.assert_allclose(from_tiff["probabilities"], from_array["probabilities"], atol=1e-6)
    np.testing.assert_allclose(from_tiff["instance_boxes"], from_array["instance_boxes"], atol=1e-4)
    assert from_tiff["probabilities"].shape == (4, 3) and from_tiff["embeddings"].shape == (4, 8)
    np.testing.assert_allclose(from_tiff["image_probabilities"], from_tiff["probabilities"].mean(0), atol=1e-6)
    # tile 3 (rows 48–96, columns 64–128): the model's boxes on that tile, shifted into slide (x = column, y = row)
    from medsim.data.transforms import rgb2d_transforms

    tile = torch.as_tensor(img[48:96, 64:128].transpose(2, 1, 0).copy(), dtype=torch.float32)
    x = rgb2d_transforms((64, 48), load=False)({"image": tile})["image"]
    with torch.no_grad():
        ref = m(torch.as_tensor(x)[None])
    np.testing.assert_allclose(from_tiff["probabilities"][3], torch.softmax(ref["logits"], 1)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(from_tiff["instance_boxes"][3], ref["instance_boxes"][0].numpy() + [64, 48, 64, 48],
                               atol=1e-4)
    with pytest.raises(ValueError, match="no 128x128 tiles"):
        tile_predictions(m, img, tile_size=128)
