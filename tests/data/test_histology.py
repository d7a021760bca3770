"""Tests for medsim.data.histology on real IHC histology (skimage.data.immunohistochemistry) written as TIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from medsim.data import histology as H
from medsim.errors import DataError

P = 256  # patch / tile size


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    """(1024, 1024, 3) uint8: IHC tiled 2x2, top-right quadrant pure white background."""
    from skimage import data

    img = np.tile(data.immunohistochemistry(), (2, 2, 1))
    img[:512, 512:] = 255
    return np.ascontiguousarray(img)


WHITE = {(y, x) for y in (0, 256) for x in (512, 768)}
ALL = {(y, x) for y in range(0, 1024, P) for x in range(0, 1024, P)}


def write_flat(path: Path, img: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, tile=(P, P), photometric="rgb", compression="zlib", **kw)
    return path


def write_pyramid(path: Path, img: np.ndarray, kind: str, levels: int = 3) -> Path:
    """Pyramid with levels 1024, 512, 256 as SubIFDs (OME/tifffile style) or as reduced-resolution pages."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(P, P), photometric="rgb", compression="zlib",
                 subifds=levels - 1 if kind == "subifds" else None)
        lvl = img
        for _ in range(levels - 1):
            lvl = np.ascontiguousarray(lvl[::2, ::2])
            tw.write(lvl, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
    return path


@pytest.fixture(scope="module")
def flat(tmp_path_factory, slide) -> Path:
    return write_flat(tmp_path_factory.mktemp("flat") / "slide.tif", slide)


@pytest.fixture(scope="module", params=["subifds", "pages"])
def pyramid(request, tmp_path_factory, slide) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("pyr") / f"pyr_{request.param}.tif", slide, request.param)


def expected_patch(path: Path, item: dict) -> np.ndarray:
    """What the patch must be: the level image sliced at the item's position, channel-first."""
    y, x = item["location"]
    h, w = item["size"]
    lvl = item["level"]
    with tifffile.TiffFile(path) as tif:
        h0 = tif.series[0].levels[0].shape[0]
        img = tif.series[0].levels[lvl].asarray()
    d = h0 // img.shape[0]
    return np.moveaxis(img[y // d:y // d + h, x // d:x // d + w], -1, 0)


# ---------------------------------------------------------------------------------------------------------------
def test_tiff_info_flat(flat):
    info = H.tiff_info(flat)
    assert info["height"] == info["width"] == 1024
    assert info["levels"] == 1 and info["level_shapes"] == [[1024, 1024]]
    assert info["tile_size"] == [P, P]
    assert info["dtype"] == "uint8" and info["samples_per_pixel"] == 3
    assert info["photometric"] == "RGB"


def test_tiff_info_pyramid(pyramid):
    info = H.tiff_info(pyramid)
    assert info["levels"] == 3
    assert info["level_shapes"] == [[1024, 1024], [512, 512], [256, 256]]
    assert info["downsamples"] == [1.0, 2.0, 4.0]
    with tifffile.TiffFile(pyramid) as tif:
        assert [list(lv.shape[:2]) for lv in tif.series[0].levels] == info["level_shapes"]


def test_grid_covers_all_positions(flat):
    items = H.patch_grid(flat, tissue_threshold=0.0)
    assert {tuple(it["location"]) for it in items} == ALL
    assert [tuple(it["location"]) for it in items] == sorted(ALL)  # row-major
    it = items[0]
    assert it["image"] == str(flat) and it["size"] == [P, P] and it["level"] == 0
    assert it["id"] == "slide_y0_x0"
    assert len({i["id"] for i in items}) == len(items)


def test_grid_stride_and_edges(tmp_path, slide):
    path = write_flat(tmp_path / "odd.tif", slide[:1000, :900])
    items = H.patch_grid(path, (256, 200), stride=(128, 300), tissue_threshold=0.0)
    ys = sorted({it["location"][0] for it in items})
    xs = sorted({it["location"][1] for it in items})
    assert ys == [0, 128, 256, 384, 512, 640]  # 640 + 256 <= 1000 < 768 + 256: only whole patches
    assert xs == [0, 300, 600]
    assert all(it["size"] == [256, 200] for it in items)
    assert H.patch_grid(path, 2000) == []


def test_background_dropped_tissue_kept(flat, slide):
    items = H.patch_grid(flat, tissue_threshold=0.1, background_level=220)
    assert {tuple(it["location"]) for it in items} == ALL - WHITE
    everything = {tuple(it["location"]): it["tissue_fraction"] for it in H.patch_grid(flat, tissue_threshold=0.0)}
    assert all(everything[yx] == 0.0 for yx in WHITE)
    # the thumbnail estimate is close to the exact full-resolution fraction
    full = (slide < 220).any(-1)
    for (y, x), frac in everything.items():
        assert frac == pytest.approx(full[y:y + P, x:x + P].mean(), abs=0.05)
    assert H.patch_grid(flat, tissue_threshold=1.0) == []


def test_grid_pyramid_levels(pyramid):
    at0 = H.patch_grid(pyramid, tissue_threshold=0.1)
    assert {tuple(it["location"]) for it in at0} == ALL - WHITE
    at1 = H.patch_grid(pyramid, 128, level=1, tissue_threshold=0.1)
    # 128-pixel patches at level 1 cover the same 256-pixel squares of level 0
    assert [(it["location"], it["size"], it["level"]) for it in at1] == [
        (it["location"], [128, 128], 1) for it in at0]
    with pytest.raises(DataError, match="level 3"):
        H.patch_grid(pyramid, level=3)


def test_dataset_pixels_match_tifffile(flat):
    items = H.patch_grid(flat, tissue_threshold=0.0)
    ds = H.patch_dataset(items)
    full = tifffile.imread(flat)
    for i in (0, 5, len(items) - 1):
        out = ds[i]
        y, x = items[i]["location"]
        img = out["image"]
        assert tuple(img.shape) == (3, P, P)
        np.testing.assert_array_equal(img.numpy(), np.moveaxis(full[y:y + P, x:x + P], -1, 0))
        assert list(img.meta["location"]) == [y, x]
        assert img.meta["id"] == items[i]["id"]
        assert "label" not in out


def test_dataset_same_as_monai_reader(flat, tmp_path, slide):
    """The tile-wise reader returns exactly what MONAI's own TiffFileWSIReader does (same convention)."""
    from monai.data import TiffFileWSIReader

    items = H.patch_grid(flat, tissue_threshold=0.5)
    ours, theirs = H.patch_dataset(items), H.patch_dataset(items, reader=TiffFileWSIReader)
    for i in range(0, len(items), 3):
        np.testing.assert_array_equal(ours[i]["image"].numpy(), theirs[i]["image"].numpy())
    # an off-grid, off-tile location and a patch running past the edge
    odd = [dict(items[0], location=[37, 901], size=[100, 300], id="odd")]
    a, b = H.patch_dataset(odd)[0]["image"], H.patch_dataset(odd, reader=TiffFileWSIReader)[0]["image"]
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(a.numpy(), np.moveaxis(slide[37:137, 901:1024], -1, 0))


def test_dataset_pyramid_levels(pyramid):
    for level, size in ((0, P), (1, 128), (2, 64)):
        items = H.patch_grid(pyramid, size, level=level, tissue_threshold=0.1)
        ds = H.patch_dataset(items)
        for i in (0, len(items) - 1):
            img = ds[i]["image"]
            assert tuple(img.shape) == (3, size, size)
            np.testing.assert_array_equal(img.numpy(), expected_patch(pyramid, items[i]))
            assert img.meta["level"] == level


def test_dataset_labels_transform_and_loader(flat):
    from monai.data import DataLoader
    from monai.transforms import ScaleIntensityRanged

    items = [dict(it, label=n % 2) for n, it in enumerate(H.patch_grid(flat, tissue_threshold=0.1))]
    ds = H.patch_dataset(items, ScaleIntensityRanged("image", 0, 255, 0.0, 1.0))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 3, P, P)
    assert float(batch["image"].max()) <= 1.0
    assert batch["label"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert batch["image"].meta["location"][1].tolist() == items[1]["location"]


def test_gray_image(tmp_path, slide):
    path = tmp_path / "gray.tif"
    gray = slide[..., 1]
    tifffile.imwrite(path, gray, tile=(P, P))
    info = H.tiff_info(path)
    assert info["samples_per_pixel"] == 1
    items = H.patch_grid(path, tissue_threshold=0.1)
    assert {tuple(it["location"]) for it in items} == ALL - WHITE
    img = H.patch_dataset(items)[0]["image"].numpy()
    y, x = items[0]["location"]
    assert img.shape == (3, P, P) and all(np.array_equal(c, gray[y:y + P, x:x + P]) for c in img)


def test_stripped_untiled_image(tmp_path, slide):
    for name, kw in (("raw.tif", {}), ("strips.tif", {"rowsperstrip": 50, "compression": "zlib"})):
        path = tmp_path / name
        tifffile.imwrite(path, slide, photometric="rgb", **kw)
        assert H.tiff_info(path)["tile_size"] is None
        items = H.patch_grid(path, tissue_threshold=0.1)
        assert {tuple(it["location"]) for it in items} == ALL - WHITE
        np.testing.assert_array_equal(H.patch_dataset(items)[-1]["image"].numpy(),
                                      expected_patch(path, items[-1]))


def test_unicode_path_with_spaces(tmp_path, slide):
    path = write_flat(tmp_path / "Präparat 1" / "schnitt ü.tif", slide)
    assert H.tiff_info(path)["height"] == 1024
    items = H.patch_grid(path)
    assert items[0]["id"] == "schnitt ü_y0_x0" and items[0]["image"] == str(path)
    np.testing.assert_array_equal(H.patch_dataset(items)[0]["image"].numpy(), expected_patch(path, items[0]))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_tiff(tmp_path, flat, cut):
    data = flat.read_bytes()
    bad = tmp_path / "cut slide.tif"
    bad.write_bytes(data[:int(len(data) * cut)])
    for fn in (H.tiff_info, H.patch_grid):
        with pytest.raises(DataError, match="truncated") as err:
            fn(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"II*", b"II*\x00" + b"\xff" * 60, b"not a tiff at all" * 20])
def test_corrupt_or_non_tiff(tmp_path, content):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        H.tiff_info(bad)
    assert str(err.value).startswith(f"{bad}: ")
    with pytest.raises(DataError):
        H.patch_grid(bad)


def test_png_and_missing_and_stack(tmp_path):
    from PIL import Image

    png = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    with pytest.raises(DataError, match="not a readable TIFF") as err:
        H.tiff_info(png)
    assert str(png) in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        H.tiff_info(tmp_path / "nope.tif")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 64, 64), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match="not a 2D gray or RGB"):
        H.tiff_info(stack)


def test_sixteen_bit_not_silently_truncated(tmp_path, slide):
    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, slide.astype(np.uint16) * 257, tile=(P, P), photometric="rgb")
    items = H.patch_grid(path, tissue_threshold=0.0)
    with pytest.raises(ValueError, match="truncated"):
        H.patch_dataset(items)[0]
    img = H.patch_dataset(items, dtype=np.uint16)[0]["image"].numpy()
    np.testing.assert_array_equal(img, expected_patch(path, items[0]))


def test_grid_does_not_decode_level0_of_pyramid(pyramid, monkeypatch):
    """The tissue thumbnail comes from a reduced level, never from an asarray() of level 0."""
    calls = []
    orig = H._read_page_region

    def spy(page, y, x, h, w, step=1):
        calls.append((page.imagelength, h, w, step))
        return orig(page, y, x, h, w, step)

    monkeypatch.setattr(H, "_read_page_region", spy)
    H.patch_grid(pyramid, tissue_threshold=0.1)
    assert calls and all(c[0] < 1024 for c in calls)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, medsim.data.histology; print('monai' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
