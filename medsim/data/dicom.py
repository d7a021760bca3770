"""DICOM files and series: validated reading on pydicom, with a MONAI ``ImageReader`` on top.

- Single files (X-ray, CR/DX/MG): modality LUT (RescaleSlope/Intercept), then for display-normalised reading the
  VOI LUT or window (WindowCenter/Width, DICOM PS3.3 C.11.2.1.2) and MONOCHROME1 inversion, giving [0, 1].
- Directories: files grouped by SeriesInstanceUID, sorted by position along the slice normal (not by file name,
  not by InstanceNumber), spacing taken from the positions (SliceThickness is often wrong), slices that do not
  belong (other size / orientation / frame of reference, duplicate positions) reported as foreign.
- Every problem is a :class:`~medsim.errors.BadItem` naming the file and the reason; nothing is read twice and
  nothing identifying (names, birth dates, UIDs) leaves this module except through an :class:`Anonymizer`.

Volumes follow MONAI's conventions: array axes (i=column, j=row, k=slice), RAS affine (DICOM is LPS).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import BadItem, DataError
from medsim.files import check_pixel_count, sniff_format, visible_files

__all__ = ["DicomSeries", "DicomScan", "read_dataset", "check_pixels", "dicom_to_array",
           "apply_window", "scan_dicom", "load_series", "load_dicom", "DicomReader", "is_dicom_path"]

logger = logging.getLogger(__name__)
# MONAI's optional nvImageCodec plugin logs a warning on every import where it is absent (always, on CPU hosts)
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_path(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``-like file name or a directory (which may hold a series)."""
    p = Path(path)
    return p.suffix.lower() in DICOM_SUFFIXES or p.is_dir()


def read_dataset(path: str | os.PathLike, *, header_only: bool = False):
    """``pydicom.dcmread`` with every failure turned into one :class:`DataError` line naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(path)
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(path, "empty file (0 bytes)")
        # a data set without the 128-byte preamble (sniffed by content) is read the way pydicom can: forced
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=sniff_format(path) == "dicom")
        cut = _truncation(ds, size, header_only)
        if cut:
            raise DataError(path, f"unreadable DICOM: {cut}")
        return ds
    except DataError:
        raise
    except InvalidDicomError as e:
        raise DataError(path, f"not a DICOM file ({e})") from e
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except Exception as e:  # truncated headers raise EOFError/OSError/struct.error/ValueError inside pydicom
        raise DataError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e


def _truncation(ds, size: int, header_only: bool) -> str | None:
    """Why a dataset pydicom read without an error is cut short, or None. pydicom keeps a value shorter than its
    declared length, stops quietly when the file ends inside an element header, and drops every element (with
    only a warning) when it ends inside an undefined-length element such as encapsulated pixel data."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import keyword_for_tag

    def name(e) -> str:
        return f"{e.tag} {keyword_for_tag(e.tag)}".strip()

    if len(ds) == 0:
        return "file truncated: no data elements after the file meta information"
    meta = getattr(ds, "file_meta", None)
    elems = [*(meta.elements() if meta is not None else ()), *ds.elements()]
    for e in elems:
        if isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF and e.value is not None \
                and len(e.value) < e.length:
            return f"file truncated in {name(e)}: {len(e.value)} of {e.length} bytes"
    last = max(ds.elements(), key=lambda e: getattr(e, "value_tell", None) or getattr(e, "file_tell", None) or 0)
    if not header_only and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) \
            and isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF and last.value_tell is not None:
        stray = size - (last.value_tell + last.length)
        if 0 < stray < 8:  # a partial tag / VR / length: the file ends inside the next element's header
            return f"file truncated after {name(last)} ({stray} bytes of a cut element)"
    return None


def _n_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def check_pixels(ds, path: str | os.PathLike, *, max_pixels: int | None = None) -> None:
    """Check, without decoding, that ``ds`` holds pixel data this machine can decode.

    Raises :class:`DataError` for: no PixelData, no decoder for the transfer syntax (naming it and what to
    install), more than ``max_pixels`` pixels (decompression bomb), or native pixel data shorter than
    Rows × Columns × frames × samples × BitsAllocated / 8 (a truncated file).
    """
    from pydicom.pixels import get_decoder

    path = str(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        what = f" (SOP class {sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise DataError(path, f"no PixelData element: not an image{what}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(path, "missing or invalid Rows/Columns") from e
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    n_pixels = rows * cols * _n_frames(ds) * samples
    check_pixel_count(n_pixels, path, f"{rows}x{cols}x{_n_frames(ds)}x{samples}", limit=max_pixels)
    ts = getattr(ds.get("file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        from pydicom.uid import ImplicitVRLittleEndian as ts  # dcmread's own assumption without file meta
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise DataError(path, f"transfer syntax {ts} ({ts.name}) has no pixel decoder in pydicom") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise DataError(path, f"transfer syntax {ts} ({ts.name}) needs a decoder that is not installed: "
                                  f"{missing}")
    elif "PixelData" in ds:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = n_pixels * bits // 8
        got = len(ds.PixelData)
        if got < expected:
            raise DataError(path, f"truncated pixel data: {got} of {expected} bytes")


def apply_window(arr: np.ndarray, ds) -> np.ndarray:
    """Display-normalise modality values to [0, 1]: VOI LUT Sequence if present, else the first
    WindowCenter/WindowWidth (linear function of PS3.3 C.11.2.1.2.1), else min–max."""
    if "VOILUTSequence" in ds:
        # looked up here rather than with pydicom's apply_voi, which indexes the LUT with an array of the LUT's
        # *output* dtype: an 8-bit LUT of more than 256 entries (common in CR/DX) wraps around at input 256
        lut = ds.VOILUTSequence[0]
        n_entries, first_map, bits = (int(v) for v in lut.LUTDescriptor)
        data = lut["LUTData"].value
        if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
            ts = getattr(ds.get("file_meta", None), "TransferSyntaxUID", None)
            table = np.frombuffer(data, dtype="<u2" if ts is None or ts.is_little_endian else ">u2")
        else:  # US: integers
            table = np.atleast_1d(np.asarray(data, dtype=np.float64))
        table = table[: n_entries or 2**16].astype(np.float32)
        idx = np.clip(np.floor(arr) - first_map, 0, len(table) - 1).astype(np.int64)
        return np.clip(table[idx] / float(2**bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        wc = ds.WindowCenter
        ww = ds.WindowWidth
        c = float(wc[0] if hasattr(wc, "__len__") and not isinstance(wc, str) else wc)
        w = float(ww[0] if hasattr(ww, "__len__") and not isinstance(ww, str) else ww)
        if w >= 1:
            return np.clip((arr - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5, 0.0, 1.0).astype(np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)


def dicom_to_array(ds, path: str | os.PathLike, *, display: bool = False) -> np.ndarray:
    """Decoded pixels as float32 (rows, cols[, samples]) for one frame, (frames, rows, cols[, samples]) for more.

    ``display=False`` gives modality values (HU for CT) after RescaleSlope/Intercept or the Modality LUT.
    ``display=True`` additionally applies the VOI LUT/window and MONOCHROME1 inversion, giving [0, 1] as a
    radiologist would see it (grayscale only).
    """
    from pydicom.pixels import apply_modality_lut

    check_pixels(ds, path)
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise DataError(str(path), f"pixel data could not be decoded ({type(e).__name__}: {e})") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    arr = raw.astype(np.float32) if photometric.startswith("RGB") or photometric.startswith("YBR") else \
        np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(str(path), f"{int((~np.isfinite(arr)).sum())} pixels are NaN or infinite")
    if display and photometric.startswith("MONOCHROME"):
        arr = apply_window(arr, ds)
        if photometric == "MONOCHROME1":
            arr = 1.0 - arr
    return arr


@dataclass
class DicomSeries:
    """One series found on disk: its files in slice order and its geometry (no pixels read)."""

    series_uid: str
    files: list[str]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm, as in the DICOM tag
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines), LPS
    positions: list[tuple[float, float, float]] = field(default_factory=list)  # IPP per slice, LPS
    modality: str = ""
    patient_id: str | None = None  # raw: anonymise before it leaves the process
    study_uid: str | None = None
    view: str | None = None
    laterality: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self.files)

    @property
    def slice_spacing(self) -> float:
        """Median distance between consecutive slice positions along the normal (mm); 1.0 for one slice."""
        if len(self.positions) < 2 or self.orientation is None:
            return 1.0
        n = _normal(self.orientation)
        d = np.diff([np.dot(n, p) for p in self.positions])
        return float(np.median(np.abs(d)))

    @property
    def shape(self) -> tuple[int, ...]:
        """MONAI order (columns, rows[, slices])."""
        return (self.columns, self.rows, self.n_slices) if self.n_slices > 1 else (self.columns, self.rows)

    @property
    def spacing(self) -> tuple[float, ...]:
        sp = (float(self.pixel_spacing[1]), float(self.pixel_spacing[0]))
        return (*sp, self.slice_spacing) if self.n_slices > 1 else sp

    def affine(self) -> np.ndarray:
        """4×4 voxel (i=column, j=row, k=slice) → RAS mm."""
        lps = np.eye(4)
        iop = np.asarray(self.orientation if self.orientation is not None else (1, 0, 0, 0, 1, 0), dtype=float)
        dr, dc = self.pixel_spacing
        lps[:3, 0] = iop[:3] * dc
        lps[:3, 1] = iop[3:] * dr
        if self.n_slices > 1:
            p0, p1 = np.asarray(self.positions[0]), np.asarray(self.positions[-1])
            lps[:3, 2] = (p1 - p0) / (self.n_slices - 1)
        else:
            lps[:3, 2] = _normal(iop)
        if self.positions:
            lps[:3, 3] = self.positions[0]
        return LPS_TO_RAS @ lps


@dataclass
class DicomScan:
    """What a file or directory holds: series (geometry only) and the files that cannot be used."""

    root: str
    series: list[DicomSeries]
    bad: list[BadItem]
    n_files: int
    #: hidden files and folders (``.DS_Store``, ``._*``, ``.git/``) skipped by the directory scan
    hidden: int = 0


def _normal(iop: Sequence[float]) -> np.ndarray:
    iop = np.asarray(iop, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _list_files(path: Path) -> tuple[list[Path], int]:
    """The candidate DICOM files under ``path`` and how many hidden entries were skipped."""
    if path.is_file():
        return [path], 0
    if not path.exists():
        raise DataError(str(path), "no such file or directory")
    found = visible_files(path)
    return [p for p in found.files if p.name.upper() != "DICOMDIR"
            and not p.name.lower().endswith((".nii", ".nii.gz", ".json"))], found.hidden


def scan_dicom(path: str | os.PathLike | Sequence[str | os.PathLike]) -> DicomScan:
    """Read the headers of every file under ``path`` (a file, a directory, or a list of files) and group them
    into series.

    Files that are not DICOM, have no decodable pixels, or do not fit the series they claim to belong to
    (foreign slices: other Rows/Columns, orientation, pixel spacing or frame of reference than the majority;
    duplicate positions) go to ``bad`` with the reason; the rest form :class:`DicomSeries` sorted by position.
    """
    if isinstance(path, (list, tuple)):
        files, hidden = [Path(p) for p in path], 0
        root = files[0].parent if files else Path(".")
        missing = [BadItem(str(f), "file not found") for f in files if not f.is_file()]
        if missing:
            raise DataError(items=missing)
    else:
        root = Path(path)
        files, hidden = _list_files(root)
    bad: list[BadItem] = []
    groups: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for f in files:
        try:
            ds = read_dataset(f)
            check_pixels(ds, f)
        except DataError as e:
            bad.extend(e.items)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:  # anonymised data often blanks the UIDs: slices of one directory with one geometry
            uid = (f"no-series-uid:{f.parent}:{_geometry_key(ds)}" if "ImagePositionPatient" in ds
                   else f"no-series-uid:{f}")
        ds.PixelData = b""  # keep the header only; pixels are decoded when a series is loaded
        groups[uid].append((str(f), ds))
    bad.extend(_strays_beside_uidless_series(groups))
    series = []
    for uid, members in groups.items():
        s, rejected = _make_series(uid, members)
        bad.extend(rejected)
        if s is not None:
            series.append(s)
    series.sort(key=lambda s: s.files[0])
    return DicomScan(str(root), series, bad, len(files), hidden)


def _strays_beside_uidless_series(groups: dict[str, list[tuple[str, Any]]]) -> list[BadItem]:
    """Without SeriesInstanceUID, slices are grouped by folder and geometry; a file whose geometry differs from a
    folder's multi-slice series would then become a "series" of its own, silently. When a folder holds one such
    series (≥ 3 slices), its other UID-less, positioned files are foreign slices: removed from ``groups`` and
    returned as bad items naming how they differ."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for key in groups:
        if key.startswith("no-series-uid:") and "ImagePositionPatient" in groups[key][0][1]:
            by_folder[str(Path(groups[key][0][0]).parent)].append(key)
    bad: list[BadItem] = []
    for keys in by_folder.values():
        if len(keys) < 2:
            continue
        keys.sort(key=lambda k: -len(groups[k]))
        main = groups[keys[0]]
        if len(main) < 3 or len(groups[keys[1]]) == len(main):
            continue  # no single dominant series: leave the groups as they are
        ref = _geometry_key(main[0][1])
        for k in keys[1:]:
            for f, ds in groups.pop(k):
                bad.append(BadItem(f, _describe_mismatch(_geometry_key(ds), ref)
                                   + f" (no SeriesInstanceUID; beside a {len(main)}-slice series in the same folder)"))
    return bad


def _geometry_key(ds) -> tuple:
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing", ds.get("ImagerPixelSpacing")), 2)
    return (int(ds.Rows), int(ds.Columns), tuple(round(v, 4) for v in iop) if iop else None,
            tuple(round(v, 4) for v in ps) if ps else None, str(ds.get("FrameOfReferenceUID", "")),
            str(ds.get("Modality", "")))


def _describe_mismatch(key: tuple, ref: tuple) -> str:
    names = ("Rows", "Columns", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID", "Modality")
    diffs = [f"{n} {a} (series: {b})" for n, a, b in zip(names, key, ref) if a != b and n != "FrameOfReferenceUID"]
    if key[4] != ref[4]:
        diffs.append("another FrameOfReferenceUID")
    return "foreign slice in series: " + ", ".join(diffs)


def _make_series(uid: str, members: list[tuple[str, Any]]) -> tuple[DicomSeries | None, list[BadItem]]:
    keys = [_geometry_key(ds) for _, ds in members]
    ref, _ = Counter(keys).most_common(1)[0]
    bad = [BadItem(f, _describe_mismatch(k, ref)) for (f, _), k in zip(members, keys) if k != ref]
    good = [(f, ds) for (f, ds), k in zip(members, keys) if k == ref]
    first = good[0][1]
    iop = _floats(first.get("ImageOrientationPatient"), 6)
    ps = _floats(first.get("PixelSpacing", first.get("ImagerPixelSpacing")), 2) or (1.0, 1.0)
    positioned = [(f, ds, _floats(ds.get("ImagePositionPatient"), 3)) for f, ds in good]
    if len(good) > 1:
        if iop is None or any(p is None for _, _, p in positioned):
            return None, bad + [BadItem(f, "series slices lack ImagePositionPatient/ImageOrientationPatient; "
                                           "cannot order them") for f, _ in good]
        n = _normal(iop)
        positioned.sort(key=lambda t: float(np.dot(n, t[2])))
        seen: dict[float, str] = {}
        unique = []
        for f, ds, p in positioned:
            z = round(float(np.dot(n, p)), 3)
            if z in seen:
                bad.append(BadItem(f, f"duplicate slice position {z} mm (same as {Path(seen[z]).name})"))
                continue
            seen[z] = f
            unique.append((f, ds, p))
        positioned = unique
        z = np.array([np.dot(n, p) for _, _, p in positioned])
        gaps = np.diff(z)
        if len(gaps) and gaps.max() > 1.5 * np.median(gaps):
            k = int(np.argmax(gaps))
            logger.warning("series sha256:%s: uneven slice spacing, %.2f mm gap after slice %d (median %.2f mm): "
                           "a slice may be missing", hashlib.sha256(uid.encode()).hexdigest()[:12], gaps[k], k,
                           np.median(gaps))
    s = DicomSeries(
        series_uid=uid, files=[f for f, _, _ in positioned], rows=int(first.Rows), columns=int(first.Columns),
        pixel_spacing=(ps[0], ps[1]), orientation=iop, positions=[p for _, _, p in positioned if p is not None],
        modality=str(first.get("Modality", "")), patient_id=str(first.get("PatientID", "")) or None,
        study_uid=str(first.get("StudyInstanceUID", "")) or None, view=str(first.get("ViewPosition", "")) or None,
        laterality=str(first.get("ImageLaterality", first.get("Laterality", ""))) or None)
    return s, bad


def load_series(series: DicomSeries, *, display: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode a series: (volume float32 (columns, rows, slices) — or (columns, rows) for one file —, RAS affine).

    Values are modality values (HU for CT) unless ``display``; see :func:`dicom_to_array`.
    """
    planes = []
    for f in series.files:
        arr = dicom_to_array(read_dataset(f), f, display=display)
        if arr.ndim != 2:
            raise DataError(f, f"expected one grayscale frame, got pixel array of shape {arr.shape} "
                               "(multi-frame and colour DICOM are not supported as volumes)")
        planes.append(arr.T)  # (rows, cols) -> (i=column, j=row)
    vol = planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)
    return vol, series.affine()


def load_dicom(path: str | os.PathLike | Sequence[str], *, display: bool = False
               ) -> tuple[np.ndarray, np.ndarray, DicomSeries]:
    """Load one DICOM file, a list of files of one series, or a directory holding exactly one series.

    Raises :class:`DataError` listing every bad file, or when the directory holds several series.
    """
    scan = scan_dicom(path)
    if scan.bad:
        raise DataError(items=scan.bad, header=f"{len(scan.bad)} unusable DICOM file(s) in {scan.root}:")
    if len(scan.series) != 1:
        raise DataError(scan.root, f"expected one series, found {len(scan.series)}"
                        + (" (pass one series' files, or use `medsim data inspect` to list them)"
                           if scan.series else ""))
    vol, affine = load_series(scan.series[0], display=display)
    return vol, affine, scan.series[0]


@functools.lru_cache(maxsize=None)
def _reader_class() -> type:
    """Build :class:`DicomReader` on first use, so importing this module needs neither MONAI nor torch (the
    torch-free deploy runtime reuses the windowing functions above)."""
    from monai.data import ImageReader

    class DicomReader(ImageReader):  # type: ignore[misc,valid-type]
        """MONAI ``ImageReader`` for DICOM files and series, built on :func:`load_dicom`.

        Use with ``LoadImage(reader=DicomReader(display=True))`` for X-rays (VOI window + MONOCHROME1, [0, 1]) or
        ``DicomReader()`` for CT (Hounsfield units). Accepts a file, a directory with one series, or a list of
        a series' files. Output: channel-less array (columns, rows[, slices]) with a RAS ``affine`` in the meta.
        """

        def __init__(self, display: bool = False):
            super().__init__()
            self.display = display

        def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
            names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
            return bool(names) and all(is_dicom_path(n) for n in names)

        def read(self, data, **kwargs):
            if isinstance(data, (list, tuple)) and len(data) == 1:
                data = data[0]
            return [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)

        def get_data(self, img) -> tuple[np.ndarray, dict]:
            vol, affine, series = load_dicom(img, display=self.display)
            meta = {
                "affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray(vol.shape),
                "original_channel_dim": float("nan"), "spacing": np.asarray(series.spacing),
                "filename_or_obj": img if isinstance(img, str) else os.path.dirname(img[0]),
                "modality": series.modality,
            }
            return vol, meta

    DicomReader.__qualname__ = "DicomReader"
    return DicomReader


def __getattr__(name: str) -> Any:
    if name == "DicomReader":
        return _reader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
