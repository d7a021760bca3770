"""medsim.data.dicom on pydicom's bundled files and on synthetic series: values checked numerically (HU, codecs,
VOI LUT / window, MONOCHROME1), every bad input a one-line DataError naming the file, series ordered by position
with the right spacing and RAS affine, and the MONAI reader on top."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import medsim.files
from medsim.data import dicom as D
from medsim.errors import DataError

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled with the wheel: never downloaded

MR_ENCODINGS = [  # every MR_small re-encoding the wheel ships (RLE, big endian, implicit, J2K, JPEG-LS, padded)
    "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm",
]


def bundled(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def read(path) -> np.ndarray:
    return D.dicom_to_array(D.read_dataset(path), path)


# ---------------------------------------------------------------------------------------------------------------
# synthetic datasets


def image_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **tags) -> Dataset:
    """An in-memory single-frame image (uncompressed, little endian) with ``tags`` set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


ROWS, COLS, N = 5, 4, 6  # non-square, so a transposition cannot pass
SPACING_Z = 2.5
ORIGIN = (10.0, -20.0, -30.0)  # LPS position of the lowest slice
NAME_OF = [3, 0, 5, 1, 4, 2]  # slice k (by position) is saved as f"img{NAME_OF[k]}.dcm": name order ≠ position order
INSTANCE_OF = [4, 6, 1, 3, 2, 5]  # and InstanceNumber order ≠ position order


def slice_pixels(k: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Stored values of slice k: row*10 + col + 100*k, all distinct (int16)."""
    r, c = np.mgrid[:rows, :cols]
    return (r * 10 + c + 100 * k).astype(np.int16)


def ct_slice(pixels: np.ndarray, position, *, series_uid: str | None, frame_uid: str, instance: int = 1,
             iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.8)) -> Dataset:
    ds = image_ds(pixels, "MONOCHROME2", 16)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "P001"
    ds.StudyInstanceUID = "1.2.3.4"
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 5.0  # deliberately wrong: spacing must come from the positions
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    return ds


def write_series(folder: Path, *, series_uid: str | None = "1.2.3.4.5", prefix: str = "img", n: int = N,
                 frame_uid: str = "1.2.3.4.9") -> list[Path]:
    """Write an n-slice axial series, files named and numbered out of position order; returns the files in
    position order (lowest z first)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        pos = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + SPACING_Z * k)
        ds = ct_slice(slice_pixels(k), pos, series_uid=series_uid, frame_uid=frame_uid,
                      instance=INSTANCE_OF[k % N])
        path = folder / f"{prefix}{NAME_OF[k % N] + N * (k // N)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def expected_volume(n: int = N) -> np.ndarray:
    """(columns, rows, slices) in HU, slices by position."""
    return np.stack([slice_pixels(k).T.astype(np.float32) - 1024 for k in range(n)], axis=-1)


EXPECTED_AFFINE = np.array([  # RAS = diag(-1, -1, 1) @ LPS; LPS columns: 0.8·x̂ (i=column), 0.7·ŷ (j=row), 2.5·ẑ
    [-0.8, 0.0, 0.0, -10.0],
    [0.0, -0.7, 0.0, 20.0],
    [0.0, 0.0, 2.5, -30.0],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.fixture
def series_dir(tmp_path) -> Path:
    write_series(tmp_path / "series")
    return tmp_path / "series"


# ---------------------------------------------------------------------------------------------------------------
# 1. bundled files: values


def test_ct_small_hounsfield_units_exact():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = read(path)
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024.0  # the file really is rescaled
    np.testing.assert_array_equal(hu, expected)


def test_ct_small_as_single_file_volume():
    path = bundled("CT_small.dcm")
    vol, affine, series = D.load_dicom(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (128, 128) and series.n_slices == 1
    np.testing.assert_array_equal(vol, read(path).T)
    ps = [float(v) for v in ds.PixelSpacing]
    assert series.spacing == (ps[1], ps[0])
    np.testing.assert_allclose(affine[:3, 3], [-float(ds.ImagePositionPatient[0]),
                                               -float(ds.ImagePositionPatient[1]), float(ds.ImagePositionPatient[2])])


@pytest.mark.parametrize("name", MR_ENCODINGS)
def test_mr_small_every_encoding_decodes_identically(name):
    reference = read(bundled("MR_small.dcm"))
    assert reference.shape == (64, 64) and reference.std() > 0
    np.testing.assert_array_equal(read(bundled(name)), reference)


def test_window_formula_hand_computed():
    """PS3.3 C.11.2.1.2.1 with c=40, w=400 on HU = 2·stored − 1100 (modality LUT first)."""
    hu = np.array([[-1000, -160, -158, 0], [40, 238, 240, 1000]], dtype=np.float64)
    stored = ((hu + 1100) / 2).astype(np.uint16)  # hu chosen even, so that this is exact
    np.testing.assert_array_equal(stored * 2.0 - 1100, hu)
    ds = image_ds(stored, RescaleSlope=2, RescaleIntercept=-1100, WindowCenter=40, WindowWidth=400)
    np.testing.assert_array_equal(D.dicom_to_array(ds, "syn.dcm"), hu)
    out = D.dicom_to_array(ds, "syn.dcm", display=True)
    # x ≤ c − 0.5 − (w−1)/2 = −160 → 0; x > c − 0.5 + (w−1)/2 = 239 → 1; else (x − 39.5)/399 + 0.5
    expected = [[0.0, 0.0, 0.5 - 197.5 / 399, 0.5 - 39.5 / 399],
                [0.5 + 0.5 / 399, 0.5 + 198.5 / 399, 1.0, 1.0]]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(out[0, 3], 0.40100250626, atol=1e-6)  # by hand: 0.5 − 39.5/399
    np.testing.assert_allclose(out[1, 0], 0.50125313283, atol=1e-6)
    np.testing.assert_allclose(out[0, 2], 0.00501253133, atol=1e-6)
    # multi-valued window: the first pair is used
    ds.WindowCenter, ds.WindowWidth = [40, 300], [400, 1500]
    np.testing.assert_allclose(D.dicom_to_array(ds, "syn.dcm", display=True), expected, atol=1e-6)


def test_no_window_is_min_max():
    stored = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    out = D.dicom_to_array(image_ds(stored), "syn.dcm", display=True)
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])


def _voi_ds(stored: np.ndarray, table: np.ndarray, first_map: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table) % 65536, first_map, bits]
    item.LUTData = [int(v) for v in table]
    item.LUTExplanation = "synthetic"
    ds = image_ds(stored)
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 10, 2  # a VOI LUT Sequence takes precedence over the window
    return ds


def test_voi_lut_sequence_bundled_or_synthetic():
    """No bundled file has a VOI LUT Sequence (checked: none of the test files), so a 12-bit sigmoid LUT."""
    raw = np.arange(0, 1200, dtype=np.uint16).reshape(30, 40)
    first_map = 100
    x = np.arange(1024)
    table = np.round(4095 / (1 + np.exp(-(x - 512) / 100.0))).astype(np.int64)
    out = D.dicom_to_array(_voi_ds(raw, table, first_map, 12), "voi.dcm", display=True)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    flat = out.ravel()  # raw values increase along the flattened array
    assert np.all(np.diff(flat) >= 0) and flat[-1] > flat[0]
    idx = np.clip(raw.astype(np.int64) - first_map, 0, 1023)
    np.testing.assert_allclose(out, table[idx] / 4095.0, atol=1e-6)
    assert out[0, 0] == pytest.approx(table[0] / 4095) and out[-1, -1] == pytest.approx(table[-1] / 4095)


def test_voi_lut_8bit_with_more_than_256_entries():
    """An 8-bit VOI LUT of 1024 entries (CR/DX style): indices must not wrap at 256."""
    raw = np.arange(0, 1024, dtype=np.uint16).reshape(32, 32)
    table = np.round(np.linspace(0, 255, 1024)).astype(np.int64)
    out = D.dicom_to_array(_voi_ds(raw, table, 0, 8), "voi8.dcm", display=True)
    np.testing.assert_allclose(out.ravel(), table / 255.0, atol=1e-6)
    assert np.all(np.diff(out.ravel()) >= 0)


@pytest.mark.parametrize("endian", ["little", "big"])
def test_voi_lut_ow_data_from_file(tmp_path, endian):
    """LUT Data stored as OW (raw 16-bit words) in a little- or big-endian file, read back from disk."""
    from pydicom.uid import ExplicitVRBigEndian

    raw = np.arange(0, 1024, dtype=np.uint16).reshape(32, 32)
    table = np.round(np.linspace(0, 4095, 1024) ** 2 / 4095).astype(np.uint16)
    order = "<u2" if endian == "little" else ">u2"
    ds = image_ds(raw)
    ds.SOPInstanceUID = generate_uid()
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 12]
    item.add_new(0x00283006, "OW", table.astype(order).tobytes())
    ds.VOILUTSequence = [item]
    if endian == "big":
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = raw.astype(order).tobytes()
    p = tmp_path / f"voi_{endian}.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert pydicom.dcmread(p).VOILUTSequence[0]["LUTData"].VR == "OW"
    out = D.dicom_to_array(D.read_dataset(p), p, display=True)
    np.testing.assert_allclose(out.ravel(), table / 4095.0, atol=1e-6)
    np.testing.assert_array_equal(read(p), raw)  # display=False: the LUT is not applied


# ---------------------------------------------------------------------------------------------------------------
# 2. MONOCHROME1


@pytest.mark.parametrize("window", [False, True])
def test_monochrome1_looks_like_monochrome2(window):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, size=(16, 12)).astype(np.uint16)
    values[0, 0], values[0, 1] = 0, 4095
    top = 4095
    tags2, tags1 = {}, {}
    if window:  # the same window on the inverted scale: centre c ↦ top − c, width unchanged
        tags2 = {"WindowCenter": 1500, "WindowWidth": 2001}
        tags1 = {"WindowCenter": top - 1500, "WindowWidth": 2001}
    mono2 = D.dicom_to_array(image_ds(values, "MONOCHROME2", **tags2), "m2.dcm", display=True)
    mono1 = D.dicom_to_array(image_ds((top - values).astype(np.uint16), "MONOCHROME1", **tags1), "m1.dcm",
                             display=True)
    assert mono2.min() == 0 and mono2.max() == 1
    # the window's half-pixel offset (c − 0.5) makes the inverted scale differ by exactly 1/(w−1)
    np.testing.assert_allclose(mono1, mono2, atol=(1 / 2000 + 1e-6) if window else 1e-6)
    # and modality values are not inverted: display=False returns what is stored
    np.testing.assert_array_equal(D.dicom_to_array(image_ds((top - values).astype(np.uint16), "MONOCHROME1"),
                                                   "m1.dcm"), top - values.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# 3. bad input: one DataError line per file, naming it and the reason


def assert_bad(path: Path, word: str, *, at_scan: bool = True) -> DataError:
    """Bad for single-file reading, for scanning (unless only decoding can tell: ``at_scan=False``) and for
    load_dicom; returns the load_dicom error."""
    with pytest.raises(DataError) as e:
        read(path)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith(str(path)) and word in msg, msg
    assert [i.path for i in e.value.items] == [str(path)] and word in e.value.reason

    scan = D.scan_dicom(path)
    if at_scan:
        assert scan.series == [] and [b.path for b in scan.bad] == [str(path)] and word in scan.bad[0].reason
    else:  # headers only: the file looks fine until its pixels are decoded
        assert scan.bad == [] and scan.series[0].files == [str(path)]

    with pytest.raises(DataError) as e:
        D.load_dicom(path)
    assert f"{path}: " in str(e.value) and word in str(e.value)
    assert [i.path for i in e.value.items] == [str(path)]
    return e.value


def test_empty_file(tmp_path):
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    assert_bad(p, "empty")


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.dcm"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_bad(p, "not a DICOM")


def test_text_file_renamed(tmp_path):
    p = tmp_path / "notes.dcm"
    p.write_text("PatientName: nobody\nthis is not DICOM\n" * 20, encoding="utf-8")
    assert_bad(p, "not a DICOM")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        D.load_dicom(tmp_path / "absent.dcm")
    with pytest.raises(DataError, match="file not found"):
        D.load_dicom([tmp_path / "absent.dcm"])


def _pixel_offset(path: Path) -> int:
    """Byte offset of the Pixel Data value in an explicit-VR little-endian file."""
    raw = path.read_bytes()
    i = raw.rfind(b"\xe0\x7f\x10\x00OW")
    assert i > 0
    return i + 12


def test_truncated_in_pixel_data(tmp_path):
    src = bundled("CT_small.dcm")
    start = _pixel_offset(src)
    p = tmp_path / "ct_cut_pixels.dcm"
    p.write_bytes(src.read_bytes()[: start + 10000])  # 10000 of the 32768 pixel bytes
    err = assert_bad(p, "truncated")
    assert "10000" in str(err)


def test_pydicom_truncated_mr():
    assert_bad(bundled("MR_truncated.dcm"), "truncated")


@pytest.mark.parametrize("where", ["element value", "element header", "file meta", "encapsulated pixels"])
def test_truncated_in_header(tmp_path, where):
    """pydicom reads a cut file silently (short last value, or nothing at all): it must not pass for a
    non-image or a good file."""
    if where == "encapsulated pixels":
        src = bundled("MR_small_RLE.dcm")
        raw = src.read_bytes()
        cut = raw.rfind(b"\xe0\x7f\x10\x00") + 200
    else:
        src = bundled("CT_small.dcm")
        raw = src.read_bytes()
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        tell = ds["PatientName"].value_tell if hasattr(ds["PatientName"], "value_tell") else None
        offset = raw.find(str(ds.PatientName).encode())  # the value's bytes
        assert offset > 0 and (tell is None or tell == offset)
        cut = {"element value": offset + 3, "element header": offset - 5, "file meta": 200}[where]
    p = tmp_path / "cut_header.dcm"
    p.write_bytes(raw[:cut])
    assert_bad(p, "unreadable")


def test_trailing_element_cut_after_complete_pixels(tmp_path):
    """CT_small has a Data Set Trailing Padding element after the pixels: a copy cut inside it is still a
    truncated file."""
    src = bundled("CT_small.dcm")
    raw = src.read_bytes()
    assert len(raw) > _pixel_offset(src) + 32768 + 20
    p = tmp_path / "ct_cut_tail.dcm"
    p.write_bytes(raw[:-10])
    assert_bad(p, "truncated")


def test_no_pixel_data(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    del ds.PixelData
    p = tmp_path / "no_pixels.dcm"
    ds.save_as(p)
    err = assert_bad(p, "no PixelData")
    assert "CT Image Storage" in str(err)


def test_transfer_syntax_without_decoder(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    p = tmp_path / "mpeg2.dcm"
    ds.save_as(p)
    err = assert_bad(p, "no pixel decoder")
    assert "1.2.840.10008.1.2.4.100" in str(err) and "MPEG2" in str(err)


def test_decompression_bomb_header(tmp_path):
    """Rows × Columns claim 4·10⁹ pixels over 128 stored bytes: refused before any decoding."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 128
    p = tmp_path / "bomb.dcm"
    ds.save_as(p)
    err = assert_bad(p, "exceeds the limit")
    assert "65535x65535" in str(err)


def test_decompression_bomb_compressed_small_limit(monkeypatch):
    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 64 * 64 - 1)
    path = bundled("MR_small_jp2klossless.dcm")
    with pytest.raises(DataError, match="exceeds the limit of 4095") as e:
        read(path)
    assert str(e.value).startswith(str(path))
    monkeypatch.setattr(medsim.files, "MAX_PIXELS", 64 * 64)
    assert read(path).shape == (64, 64)


def test_nan_float_pixels(tmp_path):
    """Float Pixel Data (7FE0,0008) holding NaN and inf is refused, naming how many pixels."""
    ds = image_ds(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    values = np.arange(16, dtype="<f4").reshape(4, 4)
    values[1, 2] = np.nan
    values[3, 3] = np.inf
    ds.FloatPixelData = values.tobytes()
    ds.SOPInstanceUID = generate_uid()
    p = tmp_path / "float_nan.dcm"
    ds.save_as(p, enforce_file_format=True)
    try:
        pydicom.dcmread(p).pixel_array
    except Exception as e:  # pragma: no cover - depends on pydicom's float support
        pytest.skip(f"pydicom cannot decode Float Pixel Data here: {e}")
    assert_bad(p, "2 pixels are NaN or infinite", at_scan=False)
    values[1, 2] = values[3, 3] = 7.5
    ds.FloatPixelData = values.tobytes()
    ds.save_as(p, enforce_file_format=True)
    np.testing.assert_array_equal(read(p), values)


# ---------------------------------------------------------------------------------------------------------------
# 4. series


def test_series_sorted_by_position_with_geometry(series_dir):
    files = sorted(series_dir.iterdir())
    assert len(files) == N
    # neither name order nor InstanceNumber order is the position order
    z_by_name = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)

    vol, affine, series = D.load_dicom(series_dir)
    assert vol.shape == (COLS, ROWS, N) == series.shape
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol, expected_volume())
    for k in range(N):  # slice k (lowest z first) holds 100·k + row·10 + col − 1024 at vol[col, row, k]
        assert vol[3, 2, k] == 100 * k + 2 * 10 + 3 - 1024
    assert series.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert series.slice_spacing == pytest.approx(2.5)  # not SliceThickness (5.0)
    assert [p[2] for p in series.positions] == [ORIGIN[2] + SPACING_Z * k for k in range(N)]
    assert [Path(f).name for f in series.files] == [f"img{NAME_OF[k]}.dcm" for k in range(N)]
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, atol=1e-9)
    # the affine maps voxel (i, j, k) to the RAS form of that slice's IPP shifted by i columns / j rows
    for k in (0, 3, 5):
        lps = np.array(series.positions[k]) + 2 * 0.8 * np.array([1, 0, 0]) + 1 * 0.7 * np.array([0, 1, 0])
        ras = affine @ np.array([2, 1, k, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    assert series.modality == "CT" and series.n_slices == N


def test_series_from_list_of_files_in_any_order(series_dir):
    files = sorted(series_dir.iterdir(), reverse=True)
    vol, affine, series = D.load_dicom([str(f) for f in files])
    np.testing.assert_array_equal(vol, expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, atol=1e-9)


def test_series_display_mode_is_unit_range(series_dir):
    vol, _, _ = D.load_dicom(series_dir, display=True)
    assert vol.shape == (COLS, ROWS, N) and vol.min() >= 0 and vol.max() <= 1


def test_sagittal_series_sorted_along_the_normal(tmp_path):
    """IOP (0,1,0, 0,0,−1): normal = row × col = (−1, 0, 0), so slice order is by decreasing LPS x."""
    folder = tmp_path / "sag"
    folder.mkdir()
    xs = [5.0, -2.5, 0.0, 2.5, -5.0]  # written in this order, positions along x
    for n, x in enumerate(xs):
        ds = ct_slice(slice_pixels(int(x * 10) + 100), (x, 1.0, 2.0), series_uid="9.9", frame_uid="9.8",
                      iop=(0, 1, 0, 0, 0, -1), spacing=(0.5, 0.6))
        ds.save_as(folder / f"s{n}.dcm", enforce_file_format=True)
    vol, affine, series = D.load_dicom(folder)
    assert [p[0] for p in series.positions] == [5.0, 2.5, 0.0, -2.5, -5.0]
    for k, x in enumerate([5.0, 2.5, 0.0, -2.5, -5.0]):
        np.testing.assert_array_equal(vol[..., k], slice_pixels(int(x * 10) + 100).T - 1024.0)
    lps = np.array([[0, 0, -2.5, 5.0], [0.6, 0, 0, 1.0], [0, -0.5, 0, 2.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-9)
    assert series.spacing == pytest.approx((0.6, 0.5, 2.5))


@pytest.mark.parametrize("kind", ["size", "orientation", "frame of reference"])
def test_foreign_slice(series_dir, kind):
    if kind == "size":
        ds = ct_slice(slice_pixels(9, rows=6, cols=6), (*ORIGIN[:2], ORIGIN[2] + 100), series_uid="1.2.3.4.5",
                      frame_uid="1.2.3.4.9")
    elif kind == "orientation":
        ds = ct_slice(slice_pixels(9), (*ORIGIN[:2], ORIGIN[2] + 100), series_uid="1.2.3.4.5",
                      frame_uid="1.2.3.4.9", iop=(0, 1, 0, 0, 0, -1))
    else:
        ds = ct_slice(slice_pixels(9), (*ORIGIN[:2], ORIGIN[2] + 100), series_uid="1.2.3.4.5",
                      frame_uid="1.2.3.4.777")
    foreign = series_dir / "zz_foreign.dcm"
    ds.save_as(foreign, enforce_file_format=True)

    scan = D.scan_dicom(series_dir)
    assert scan.n_files == N + 1
    assert [b.path for b in scan.bad] == [str(foreign)]
    assert "foreign slice" in scan.bad[0].reason
    expected_word = {"size": "Rows 6", "orientation": "ImageOrientationPatient",
                     "frame of reference": "FrameOfReferenceUID"}[kind]
    assert expected_word in scan.bad[0].reason
    assert len(scan.series) == 1 and scan.series[0].n_slices == N
    assert str(foreign) not in scan.series[0].files
    # the good slices still load as a series
    vol, _ = D.load_series(scan.series[0])
    np.testing.assert_array_equal(vol, expected_volume())

    with pytest.raises(DataError) as e:
        D.load_dicom(series_dir)
    assert [i.path for i in e.value.items] == [str(foreign)]
    assert f"{foreign}: foreign slice" in str(e.value)


def test_duplicate_position(series_dir):
    ds = ct_slice(slice_pixels(2), (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 2 * SPACING_Z), series_uid="1.2.3.4.5",
                  frame_uid="1.2.3.4.9")
    dup = series_dir / "zz_dup.dcm"
    ds.save_as(dup, enforce_file_format=True)
    scan = D.scan_dicom(series_dir)
    assert len(scan.bad) == 1 and "duplicate slice position -25.0 mm" in scan.bad[0].reason
    assert scan.bad[0].path in (str(dup), str(series_dir / f"img{NAME_OF[2]}.dcm"))
    assert scan.series[0].n_slices == N
    with pytest.raises(DataError, match="duplicate slice position"):
        D.load_dicom(series_dir)


def test_two_series_in_one_directory(series_dir):
    write_series(series_dir, series_uid="1.2.3.4.6", prefix="other", n=3)
    scan = D.scan_dicom(series_dir)
    assert scan.bad == [] and scan.n_files == N + 3
    assert sorted(s.n_slices for s in scan.series) == [3, N]
    assert {s.series_uid for s in scan.series} == {"1.2.3.4.5", "1.2.3.4.6"}
    with pytest.raises(DataError) as e:
        D.load_dicom(series_dir)
    assert "expected one series, found 2" in str(e.value) and str(series_dir) in str(e.value)
    assert str(e.value).count("\n") == 0


@pytest.mark.parametrize("uid", ["", None], ids=["blank", "absent"])
def test_anonymised_series_without_uid_groups_by_folder_and_geometry(tmp_path, uid):
    write_series(tmp_path / "a", series_uid=uid)
    vol, affine, series = D.load_dicom(tmp_path / "a")
    np.testing.assert_array_equal(vol, expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, atol=1e-9)
    # two anonymised series in two folders are two series, not one of 12 slices with duplicate positions
    write_series(tmp_path / "b", series_uid=uid)
    scan = D.scan_dicom(tmp_path)
    assert scan.bad == [] and [s.n_slices for s in scan.series] == [N, N]
    assert {Path(s.files[0]).parent.name for s in scan.series} == {"a", "b"}


def test_foreign_file_beside_an_anonymised_series_is_reported(tmp_path):
    import shutil

    write_series(tmp_path / "a", series_uid="")
    stray = tmp_path / "a" / "zz_stray.dcm"
    shutil.copy(bundled("CT_small.dcm"), stray)  # a 128x128 CT slice; blank its UID like the series'
    ds = pydicom.dcmread(stray)
    ds.SeriesInstanceUID = ""
    ds.save_as(stray)
    scan = D.scan_dicom(tmp_path / "a")
    assert [s.n_slices for s in scan.series] == [N]
    (b,) = scan.bad
    assert b.path == str(stray) and "foreign slice in series: Rows 128" in b.reason and "no SeriesInstanceUID" in b.reason
    with pytest.raises(DataError, match="zz_stray.dcm"):
        D.load_dicom(tmp_path / "a")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected one series, found 0"):
        D.load_dicom(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# 5. MONAI LoadImage


def test_monai_load_image_directory_and_list(series_dir):
    import torch
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    loader = LoadImage(reader=D.DicomReader(), image_only=True, ensure_channel_first=True)
    img = loader(str(series_dir))
    assert isinstance(img, MetaTensor)
    assert tuple(img.shape) == (1, COLS, ROWS, N)
    np.testing.assert_array_equal(img[0].numpy(), expected_volume())
    np.testing.assert_allclose(img.affine.numpy(), EXPECTED_AFFINE, atol=1e-6)
    np.testing.assert_allclose(img.pixdim.numpy() if isinstance(img.pixdim, torch.Tensor) else img.pixdim,
                               [0.8, 0.7, 2.5], atol=1e-6)
    assert img.meta["filename_or_obj"] == str(series_dir)

    files = [str(f) for f in sorted(series_dir.iterdir(), reverse=True)]
    img2 = loader(files)
    assert tuple(img2.shape) == (1, COLS, ROWS, N)
    np.testing.assert_array_equal(img2.numpy(), img.numpy())
    np.testing.assert_allclose(img2.affine.numpy(), EXPECTED_AFFINE, atol=1e-6)


def test_monai_load_image_single_file_and_bad_input(tmp_path):
    from monai.transforms import LoadImage

    loader = LoadImage(reader=D.DicomReader(), image_only=True, ensure_channel_first=True)
    path = bundled("CT_small.dcm")
    img = loader(str(path))
    assert tuple(img.shape) == (1, 128, 128)
    np.testing.assert_array_equal(img[0].numpy(), read(path).T)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match="not a DICOM"):
        loader(str(bad))


def test_dicom_reader_suffixes(tmp_path):
    r = D.DicomReader()
    assert r.verify_suffix("a.dcm") and r.verify_suffix("A.DCM") and r.verify_suffix(["a.dcm", "b.ima"])
    assert r.verify_suffix(str(tmp_path))  # a directory may hold a series
    assert not r.verify_suffix("a.nii.gz") and not r.verify_suffix([])


# ---------------------------------------------------------------------------------------------------------------
# 6. unicode and spaces


def test_unicode_and_spaces_in_paths(tmp_path):
    from monai.transforms import LoadImage

    folder = tmp_path / "Patiént data" / "série 1"
    write_series(folder)
    vol, affine, series = D.load_dicom(folder)
    np.testing.assert_array_equal(vol, expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, atol=1e-9)
    assert all("série 1" in f for f in series.files)
    img = LoadImage(reader=D.DicomReader(), image_only=True, ensure_channel_first=True)(folder)
    assert tuple(img.shape) == (1, COLS, ROWS, N)
    # and a bad file there is named with its unicode path
    bad = folder / "défaut ü.dcm"
    bad.write_bytes(b"")
    with pytest.raises(DataError) as e:
        D.load_dicom(folder)
    assert f"{bad}: empty file" in str(e.value)


def test_series_folder_with_a_nifti_label_map_is_a_dicom_source(tmp_path):
    import nibabel as nib

    from medsim.data.sources import open_source

    write_series(tmp_path / "case" / "slices")
    nib.save(nib.Nifti1Image(np.zeros((COLS, ROWS, N), np.uint8), np.eye(4)), str(tmp_path / "case" / "labels.nii.gz"))
    src = open_source(tmp_path / "case")
    assert src.layout == "dicom" and src.bad == []
    (item,) = src.items
    assert len(item["image"]) == N and item["mask"] == str(tmp_path / "case" / "labels.nii.gz")
