"""Trust, part 5: every bad input file exits 2 naming the file; good single files are read by their content.

Every case goes through the CLI (``medsim.cli.main``): a single file given to ``data inspect`` / ``data check``
is recognised by its bytes (not assumed to be DICOM); each kind of broken file gives exit 2 and one line naming
it; one decompression-bomb limit (:data:`medsim.files.MAX_PIXELS`) holds in the data layer, the runtime and for
ground-truth masks; ``data inspect`` counts each unreadable file once and reports the hidden files it skipped.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

import medsim.files
from medsim.cli import main
from medsim.errors import DataError

DICOM_TEST_FILE = Path(pydicom.data.get_testdata_file("CT_small.dcm"))


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _img(path: Path, arr: np.ndarray, mode: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **save) if mode else Image.fromarray(arr).save(path, **save)
    return path


def _rng_rgb(h: int, w: int, c: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, c), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR declares ``width`` x ``height`` 8-bit gray pixels (a decompression bomb's
    header: the pixel data itself is one tiny compressed row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 2))
            + _png_chunk(b"IEND", b""))


#: more pixels than the default limit (2**28): 20000 x 20000 = 4·10**8
BOMB_SIDE = 20000


# ------------------------------------------------------------------------------------------ good single files
def _good_files(tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, expected 'layout   …' line, expected shape)"""
    dcm = pydicom.dcmread(DICOM_TEST_FILE)
    bare = tmp / "bare_dicom.dcm"  # no 128-byte preamble / DICM prefix: read the way pydicom reads it (forced)
    bare.write_bytes(DICOM_TEST_FILE.read_bytes()[132:])
    jpeg_named_dcm = tmp / "photo.dcm"  # the content decides, not the name
    jpeg_named_dcm.write_bytes(_img(tmp / "x.jpg", _rng_rgb(9, 7)).read_bytes())
    nii = tmp / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), nii)
    return {
        "plain JPEG": (_img(tmp / "plain.jpg", _rng_rgb(40, 50), quality=90), "image (rgb2d)", "50x40"),
        "RGBA PNG": (_img(tmp / "rgba.png", _rng_rgb(20, 30, 4), "RGBA"), "image (rgb2d)", "30x20"),
        "16-bit PNG": (_img(tmp / "gray16.png", np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
                       "image (gray2d)", "30x20"),
        "1x1 image": (_img(tmp / "one.png", np.full((1, 1, 3), 7, np.uint8)), "image (gray2d)", "1x1"),
        "spaces and non-ASCII": (_img(tmp / "ünï cödé" / "scan 1.png", _rng_rgb(10, 12)), "image (rgb2d)", "12x10"),
        "BMP": (_img(tmp / "b.bmp", _rng_rgb(6, 5)), "image (rgb2d)", "5x6"),
        "small TIFF": (_img(tmp / "t.tif", _rng_rgb(6, 5)), "image (rgb2d)", "5x6"),
        "DICOM": (DICOM_TEST_FILE, "dicom (gray2d)", f"{dcm.Columns}x{dcm.Rows}"),
        "DICOM without preamble": (bare, "dicom (gray2d)", f"{dcm.Columns}x{dcm.Rows}"),
        "JPEG named .dcm": (jpeg_named_dcm, "image (", "7x9"),
        "NIfTI": (nii, "nifti (ct3d)", "4x5x6"),
    }


GOOD = ["plain JPEG", "RGBA PNG", "16-bit PNG", "1x1 image", "spaces and non-ASCII", "BMP", "small TIFF", "DICOM",
        "DICOM without preamble", "JPEG named .dcm", "NIfTI"]


@pytest.mark.parametrize("name", GOOD)
def test_good_single_file_is_read_by_its_content(name, tmp_path, capsys):
    path, layout, shape = _good_files(tmp_path)[name]
    code, out, err = run(["data", "inspect", path], capsys)
    assert code == 0, err
    assert f"layout   {layout}" in out and "items    1 usable\n" in out and f"shapes   {shape} (1)" in out, out
    assert "unreadable" not in out
    code, out, err = run(["data", "check", path], capsys)
    assert code == 0 and f"1 usable item(s) in {path}" in out, err


# ------------------------------------------------------------------------------------------ broken files
def _broken(tmp: Path, kind: str) -> tuple[Path, str]:
    """(file, the reason data check must give) for each kind of broken file."""
    if kind == "truncated JPEG":
        p = _img(tmp / "cut.jpg", _rng_rgb(64, 64), quality=95)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p, "truncated JPEG file"
    if kind == "truncated PNG":
        p = _img(tmp / "cut.png", _rng_rgb(64, 64))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p, "truncated PNG file"
    if kind == "PNG cut inside its header":
        p = _img(tmp / "head.png", _rng_rgb(8, 8))
        p.write_bytes(p.read_bytes()[:30])
        return p, "corrupt or truncated PNG file"
    if kind == "zero-byte file":
        p = tmp / "empty.png"
        p.write_bytes(b"")
        return p, "empty file (0 bytes)"
    if kind == "text renamed .png":
        p = tmp / "notes.png"
        p.write_text("patient notes, not an image\n")
        return p, "not a readable image: its content is no PNG, JPEG, TIFF, BMP, NIfTI or DICOM file despite its " \
                  "'.png' name"
    if kind == "corrupt DICOM":
        p = tmp / "cut.dcm"
        p.write_bytes(DICOM_TEST_FILE.read_bytes()[:3000])
        return p, "unreadable DICOM: file truncated"
    if kind == "DICOM header only":
        p = tmp / "junk.dcm"
        p.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 20)
        return p, "unreadable DICOM"
    if kind == "decompression bomb":
        p = tmp / "bomb.png"
        p.write_bytes(png_declaring(BOMB_SIDE, BOMB_SIDE))
        return p, "PNG too large, possible decompression bomb"
    if kind in ("NIfTI with bad header", "gzipped NIfTI with bad header"):
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp / "v.nii")
        data = bytearray((tmp / "v.nii").read_bytes())
        data[70:72] = struct.pack("<h", 999)  # datatype code 999 does not exist
        if kind.startswith("gzipped"):
            p = tmp / "bad header.nii.gz"
            p.write_bytes(gzip.compress(bytes(data)))
        else:
            p = tmp / "bad header.nii"
            p.write_bytes(bytes(data))
        return p, "not a readable NIfTI volume (HeaderDataError: data code 999 not recognized)"
    raise AssertionError(kind)


BROKEN = ["truncated JPEG", "truncated PNG", "PNG cut inside its header", "zero-byte file", "text renamed .png",
          "corrupt DICOM", "DICOM header only", "decompression bomb", "NIfTI with bad header",
          "gzipped NIfTI with bad header"]


@pytest.mark.parametrize("kind", BROKEN)
def test_data_check_exits_2_naming_each_broken_file(kind, tmp_path, capsys):
    path, reason = _broken(tmp_path, kind)
    code, out, err = run(["data", "check", path], capsys)
    assert code == 2, (out, err)
    assert f"{path}: {reason}" in err, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("kind", BROKEN)
def test_data_check_of_a_folder_names_each_broken_file(kind, tmp_path, capsys):
    """The same files among good ones in a class folder: exit 2, the broken file named with the same reason."""
    if "DICOM" in kind or "NIfTI" in kind:
        pytest.skip("the folder layout takes 2D images only (other suffixes are refused by name)")
    root = tmp_path / "set"
    _img(root / "a" / "ok.png", _rng_rgb(8, 8))
    (root / "b").mkdir()
    path, reason = _broken(root / "b", kind)
    code, out, err = run(["data", "check", root], capsys)
    assert code == 2 and f"{path}: {reason}" in err and "Traceback" not in err, err


def test_truncated_jpeg_in_inspect_is_reported_as_such(tmp_path, capsys):
    path, _ = _broken(tmp_path, "truncated JPEG")
    code, out, err = run(["data", "inspect", path], capsys)
    assert code == 0, err
    assert "items    0 usable of 1" in out and f"{path}: truncated JPEG file" in out
    code, out, err = run(["data", "inspect", path, "--strict"], capsys)
    assert code == 2


def test_unrecognisable_single_file_exits_2(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    code, _, err = run(["data", "inspect", p], capsys)
    assert code == 2 and f"{p}: cannot tell what this file is" in err


# ------------------------------------------------------------------------------------------ one pixel limit
def test_one_pixel_limit_for_data_layer_and_runtime(tmp_path, monkeypatch):
    """The data layer and the runtime refuse at the same pixel count: the limit is one constant."""
    from medsim.data.validate import check_file
    from medsim.deploy import DeployError
    from medsim.deploy.preprocess import read_image

    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 100)
    fits = _img(tmp_path / "fits.png", _rng_rgb(10, 10))
    over = _img(tmp_path / "over.png", _rng_rgb(10, 11))
    assert check_file(fits, "rgb2d")["shape"] == (10, 10)
    assert read_image(fits).shape == (3, 10, 10)
    with pytest.raises(DataError, match=r"over\.png: PNG too large, possible decompression bomb"):
        check_file(over, "rgb2d")
    with pytest.raises(DeployError, match=r"over\.png: PNG too large, possible decompression bomb"):
        read_image(over)


def test_limit_holds_for_dicom_and_nifti_at_runtime(tmp_path, monkeypatch):
    from medsim.deploy import DeployError
    from medsim.deploy.preprocess import read_image
    from medsim.deploy.volume import read_volume

    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 100)
    with pytest.raises(DeployError, match=r"CT_small\.dcm: 128x128x1x1 = 16384 pixels exceeds the limit of 100"):
        read_image(DICOM_TEST_FILE, "gray2d")
    nii = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), nii)
    with pytest.raises(DeployError, match=r"v\.nii\.gz: 5x5x5 = 125 pixels exceeds the limit of 100"):
        read_volume(nii)


def test_training_transforms_load_what_validation_accepted(tmp_path, monkeypatch):
    """PIL's own default limit is below medsim's: the training loader must not refuse a checked image."""
    from medsim.data.transforms import rgb2d_transforms
    from medsim.data.validate import check_file

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # PIL refuses above 2 x 40 = 80 pixels
    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 200)
    p = _img(tmp_path / "ten.png", _rng_rgb(10, 10))  # 100 pixels: within medsim's limit
    assert check_file(p, "rgb2d")["shape"] == (10, 10)
    out = rgb2d_transforms((8, 8), normalize=False)({"image": str(p)})
    assert tuple(out["image"].shape) == (3, 8, 8) and Image.MAX_IMAGE_PIXELS == 200


def test_runtime_refuses_a_bomb_header_as_image_and_as_mask(tmp_path):
    """At the default limit: the runtime's image reader and its ground-truth mask reader, each naming the file."""
    from medsim.deploy import DeployError
    from medsim.deploy.preprocess import read_image
    from medsim.deploy.tasks import _read_mask

    p = tmp_path / "bomb file.png"
    p.write_bytes(png_declaring(BOMB_SIDE, BOMB_SIDE))
    bomb = rf"PNG too large, possible decompression bomb.*limit {medsim.files.MAX_PIXELS} pixels"
    with pytest.raises(DeployError, match=rf"bomb file\.png: {bomb}"):
        read_image(p)
    with pytest.raises(DeployError, match=rf"bomb file\.png: ground-truth mask for img\.png cannot be read \({bomb}"):
        _read_mask(p, "img.png")


def test_localize_mask_file_bomb_exits_2(exported, sample_root, tmp_path, capsys):
    model_dir = Path(exported["onnx_path"]).parent
    img = sorted((sample_root / "derm" / "images").glob("*.png"))[0]
    bomb = tmp_path / "bomb_mask.png"
    bomb.write_bytes(png_declaring(BOMB_SIDE, BOMB_SIDE))
    code, _, err = run(["localize", "--model", model_dir, img, "--out", tmp_path / "loc", "--mask-file", bomb],
                       capsys)
    assert code == 2 and f"{bomb}: ground-truth mask for" in err and "decompression bomb" in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ inspect counting
def _hide_things(folder: Path) -> int:
    """A .DS_Store, an AppleDouble file and a dot-folder holding an image; returns how many hidden entries."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._IMG_0001.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    _img(folder / ".thumbnails" / "t.png", _rng_rgb(4, 4))
    return 3


def test_inspect_counts_each_unreadable_file_once_and_hidden_files(tmp_path, capsys):
    root = tmp_path / "classes"
    for c in ("a", "b"):
        for i in range(3):
            _img(root / c / f"{c}{i}.png", _rng_rgb(8, 8))
    (root / "b" / "b0.png").write_bytes(b"")  # undecodable: found by the decode pass
    (root / "a" / "notes.txt").write_text("x")  # refused by name: found by the listing pass
    hidden = _hide_things(root / "a") + _hide_things(root)
    code, out, err = run(["data", "inspect", root, "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "items    5 usable of 7" in out  # 6 images + 1 text file listed; not 8 (the text file twice)
    assert "unreadable (2):" in out and out.count("b0.png") == 1 and out.count("notes.txt") == 1
    assert f"hidden   skipped {hidden} hidden file(s)/folder(s)" in out
    assert "._IMG" not in out and "thumbnails" not in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["listed"] == 7 and report["items"] == 5 and len(report["unreadable"]) == 2
    assert report["hidden"] == hidden


def test_a_mask_shared_by_two_rows_is_one_unreadable_file(tmp_path, capsys):
    for i in range(3):
        _img(tmp_path / "images" / f"i{i}.png", _rng_rgb(8, 8))
    (tmp_path / "images" / "m.png").write_bytes(b"broken")
    (tmp_path / "list.csv").write_text("image,label,mask\ni0.png,x,m.png\ni1.png,y,m.png\ni2.png,x,\n")
    code, out, err = run(["data", "inspect", tmp_path / "list.csv"], capsys)
    assert code == 0, err
    assert "items    1 usable of 3" in out and "unreadable (1):" in out and out.count("m.png:") == 1


def test_hidden_files_skipped_and_counted_in_every_scanned_layout(tmp_path, capsys, sample_root):
    import shutil

    from medsim.data.inspect import inspect_source

    # dicom: AppleDouble files beside the slices would otherwise be unreadable DICOMs
    dcm = tmp_path / "dicom"
    shutil.copytree(sample_root / "dicom", dcm)
    n_dcm = len(list(dcm.glob("*.dcm")))
    for f in list(dcm.glob("*.dcm"))[:2]:
        (dcm / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (dcm / ".DS_Store").write_bytes(b"Bud1")
    # nifti: an AppleDouble ._ct.nii.gz and a dot-folder of volumes
    nii = tmp_path / "nifti" / "case1"
    nii.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), nii / "ct.nii.gz")
    (nii / "._ct.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (nii / ".old").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), nii / ".old" / "ct.nii.gz")
    # tiff: an AppleDouble slide
    tif = tmp_path / "tiff"
    _img(tif / "slide.tif", np.full((300, 300, 3), 128, np.uint8))
    (tif / "._slide.tif").write_bytes(b"\x00\x05\x16\x07")
    for root, layout, n_hidden, n_items in [(dcm, "dicom", 3, n_dcm), (tmp_path / "nifti", "nifti", 2, 1),
                                            (tif, "tiff", 1, None)]:
        r = inspect_source(root, progress=False)
        assert r["layout"] == layout and r["hidden"] == n_hidden and r["unreadable"] == [], (layout, r)
        if n_items is not None:
            assert r["items"] == n_items
        code, out, err = run(["data", "inspect", root], capsys)
        assert code == 0 and f"skipped {n_hidden} hidden file(s)/folder(s)" in out, (layout, out, err)


def test_hidden_files_give_no_evidence_for_a_layout(tmp_path):
    """A folder of class sub-folders with AppleDouble ``._x.dcm`` beside it is still a folder dataset."""
    from medsim.data.sources import detect_layout

    _img(tmp_path / "a" / "x.png", _rng_rgb(4, 4))
    (tmp_path / "a" / "._x.dcm").write_bytes(b"\x00\x05\x16\x07")
    assert detect_layout(tmp_path) == "folder"


def test_sniff_format_reads_content_not_names(tmp_path):
    from medsim.files import sniff_format

    jpg = _img(tmp_path / "a.png", _rng_rgb(4, 4), format="JPEG")  # a JPEG under a .png name
    assert sniff_format(jpg) == "jpeg"
    txt = tmp_path / "BM.bmp"
    txt.write_text("BM is how this text starts")
    assert sniff_format(txt) is None
    nii = tmp_path / "no_suffix"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    nii.write_bytes((tmp_path / "v.nii.gz").read_bytes())
    assert sniff_format(nii) == "nifti"
    with pytest.raises(DataError, match="file not found"):
        sniff_format(tmp_path / "missing.png")


def test_index_build_refuses_a_split_local_paths_file(tmp_path, capsys):
    """`split.local.json` holds the paths `split.json` reads; given it directly, the command names the file to
    give instead (exit 2), rather than failing later on an image path resolved against the wrong folder."""
    from medsim.cli import main

    local = tmp_path / "split.local.json"
    local.write_text('{"dataset_dir": "/nowhere", "source": "/nowhere", "test": [{"image": "a.jpg"}]}')
    with pytest.raises(SystemExit) as e:
        main(["index", "build", "--model", str(tmp_path), "--data", str(local), "--split", "test",
              "--out", str(tmp_path / "ix")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "local paths file" in err and str(tmp_path / "split.json") in err
    assert not (tmp_path / "ix").exists()
