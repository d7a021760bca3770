"""medsim.data.views: seedable multi-view chains, their collation and their agreement with eval preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsim.data.views import rgb_view_transforms, xray_view_transforms


@pytest.fixture(scope="module")
def rgb_files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def gray_file(tmp_path_factory):
    from PIL import Image

    p = tmp_path_factory.mktemp("gray") / "cxr.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)).save(p)
    return str(p)


def _items(paths):
    return [{"image": p, "label": i % 2, "index": i} for i, p in enumerate(paths)]


def test_rgb_views_structure_and_multicrop(rgb_files):
    t = rgb_view_transforms((16, 16), n_views=2, local_views=3, local_size=(8, 8))
    out = t(_items(rgb_files)[0])
    assert set(out) == {"label", "index", "views"}  # per-view keys and the loaded image are dropped
    assert [tuple(v.shape) for v in out["views"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in out["views"])


def test_same_seed_same_views_and_views_differ(rgb_files):
    item = _items(rgb_files)[0]
    a, b = rgb_view_transforms((16, 16), n_views=3), rgb_view_transforms((16, 16), n_views=3)
    a.set_random_state(seed=7)
    b.set_random_state(seed=7)
    va, vb = a(item)["views"], b(item)["views"]
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    assert not torch.equal(va[0], va[1]) and not torch.equal(va[1], va[2])
    a.set_random_state(seed=8)  # what TrainingHooks does at the next epoch
    assert not torch.equal(a(item)["views"][0], va[0])


def test_rgb_views_scaled_as_eval(tmp_path):
    """Without jitter, a view of a flat-colour image has exactly the eval pipeline's values (same scaling and
    ImageNet normalisation), so a pretrained encoder sees train and eval inputs alike."""
    from PIL import Image

    from medsim.data.transforms import rgb2d_transforms

    p = tmp_path / "flat.png"
    Image.fromarray(np.full((20, 24, 3), (200, 100, 30), dtype=np.uint8)).save(p)
    t = rgb_view_transforms((8, 8), contrast=0.0, brightness=0.0, blur_prob=0.0)
    view = t({"image": str(p)})["views"][0]
    ref = rgb2d_transforms((8, 8))({"image": str(p)})["image"]
    expected = (torch.tensor([200, 100, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    torch.testing.assert_close(view, torch.as_tensor(ref), atol=1e-4, rtol=0)
    torch.testing.assert_close(view[:, 0, 0], expected, atol=1e-4, rtol=0)


def test_xray_views_gray_clipped_and_no_vertical_flip(gray_file):
    import monai.transforms as mt

    t = xray_view_transforms((16, 16), n_views=2)
    views = t({"image": gray_file})["views"]
    assert [tuple(v.shape) for v in views] == [(1, 16, 16)] * 2
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in views)
    assert not any(isinstance(x, mt.RandFlipd) for x in t.transforms)  # no flips at all by default
    t3 = xray_view_transforms((16, 16), channels=3, hflip_prob=0.5)
    flips = [x for x in t3.transforms if isinstance(x, mt.RandFlipd)]
    assert flips and all(f.flipper.spatial_axis == 0 for f in flips)  # left-right only, never up-down
    v = t3({"image": gray_file})["views"][0]
    assert v.shape == (3, 16, 16) and torch.equal(v[0], v[1]) and torch.equal(v[0], v[2])


def test_collated_batch_and_views_prepare_batch(rgb_files):
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.engines import views_prepare_batch

    t = rgb_view_transforms((16, 16), n_views=2, local_views=1, local_size=(8, 8))
    ds = make_dataset(_items(rgb_files), t, cache="memory", progress=False)
    cached = ds._cache[0]
    # the cache stops at the view copies: it holds the loaded image once, not one copy per view
    assert "image" in cached and not any(k.startswith("_view") for k in cached)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert isinstance(batch["views"], list) and [tuple(v.shape) for v in batch["views"]] == [
        (4, 3, 16, 16), (4, 3, 16, 16), (4, 3, 8, 8)]
    inputs, target = views_prepare_batch(batch)
    assert len(inputs) == 3 and torch.equal(target["label"], torch.tensor([0, 1, 0, 1]))
    assert torch.equal(target["index"], torch.arange(4))


@pytest.mark.parametrize("kwargs, match", [({"scale": (0.0, 1.0)}, "crop scale"), ({"n_views": 0}, "n_views"),
                                           ({"local_views": -1}, "local_views")])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rgb_view_transforms(**kwargs)


def test_xray_channels_checked():
    with pytest.raises(ValueError, match="channels=2"):
        xray_view_transforms(channels=2)
