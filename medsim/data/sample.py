"""A small, fully synthetic demo dataset, generated deterministically from a seed.

``make_sample(out_dir)`` writes three folders that mimic real sources, so every reader and the CLI can be tried
without downloading anything:

* ``derm/``: HAM10000 layout (``images/*.png``, ``masks/*_segmentation.png``, ``HAM10000_metadata.csv``) with four
  lesion classes drawn on skin (``round``, ``ring``, ``lobed``, ``streaks``); masks are exactly the painted pixels,
  and about a third of the images come in pairs sharing a ``lesion_id``.
* ``dicom/``: single-frame chest-like CR images of 2-3 fake patients with 2 studies each, one of them MONOCHROME1.
* ``ct/``: a CT-like NIfTI volume in HU with a label map (1 liver, 2 kidney, 3 spine).

Nothing here is real patient data; names and identifiers are invented. The same seed gives identical pixel arrays.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.uid import ComputedRadiographyImageStorage as CR_STORAGE

from medsim.errors import atomic_path

__all__ = ["DERM_CLASSES", "CT_LABELS", "make_sample", "default_sample_dir", "ensure_sample"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: lesion class -> base RGB colour of the lesion.
DERM_CLASSES: dict[str, tuple[int, int, int]] = {
    "round": (95, 58, 38), "ring": (130, 80, 55), "lobed": (165, 70, 95), "streaks": (60, 42, 38)}
CT_LABELS = {1: "liver", 2: "kidney", 3: "spine"}
_CT_HU = {0: 10.0, 1: 60.0, 2: 30.0, 3: 700.0}  # body soft tissue, then each label
DERM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
_SITES = ["back", "trunk", "lower extremity", "upper extremity", "abdomen", "face", "chest"]
_PATIENTS = [("DOE^JANE", "F", "19700101"), ("ROE^JOHN", "M", "19650315"), ("POE^MARY", "F", "19820722")]
DICOM_SIZE = 64


def default_sample_dir() -> Path:
    """Where :func:`ensure_sample` keeps the sample: ``$MEDSIM_SAMPLE_DIR`` or ``~/.cache/medsim/sample``."""
    return Path(os.environ.get("MEDSIM_SAMPLE_DIR", "~/.cache/medsim/sample")).expanduser()


def ensure_sample(seed: int = 0) -> Path:
    """Make (or reuse) the default sample in :func:`default_sample_dir` and return its root."""
    root = default_sample_dir()
    make_sample(root, seed=seed)
    return root


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary name next to ``path`` (same extension), then rename it into place."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        write(tmp)


def _write_text(path: Path, text: str) -> None:
    _atomic(path, lambda t: t.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- dermatology
def _lesion_mask(cls: str, p: dict[str, float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean mask (size, size) of one lesion and its normalised radius map (size, size), 0 at the centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = np.cos(p["theta"]), np.sin(p["theta"])
    u = (xx - p["cx"]) * c + (yy - p["cy"]) * s
    v = -(xx - p["cx"]) * s + (yy - p["cy"]) * c
    r, b = p["r"], p["r"] * p["aspect"]
    rho = np.sqrt((u / r) ** 2 + (v / b) ** 2)
    if cls == "round":
        mask = rho <= 1.0
    elif cls == "ring":
        mask = (rho <= 1.0) & (rho > p["inner"])
    elif cls == "lobed":
        phi = np.arctan2(v, u)
        edge = 1.0 + p["amp"] * np.sin(p["k"] * phi + p["phase"]) + 0.5 * p["amp"] * np.sin((p["k"] + 2) * phi)
        mask = rho <= edge
    elif cls == "streaks":
        mask = np.hypot(u, v) <= 0.35 * r
        width = max(1.0, size * 0.018)
        for i in range(int(p["k"])):
            a = p["phase"] + 2 * np.pi * i / p["k"]
            along = u * np.cos(a) + v * np.sin(a)
            mask |= (along >= 0) & (along <= 1.1 * r) & (np.abs(-u * np.sin(a) + v * np.cos(a)) <= width)
        rho = np.hypot(u, v) / (1.1 * r)
    else:
        raise ValueError(f"unknown lesion class {cls!r}")
    return mask, rho


def _draw_derm(cls: str, p: dict[str, Any], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image (size, size, 3) uint8 and its mask (size, size) uint8 in {0, 255}.

    The mask is computed first; the lesion colour is then painted through it, so the mask is pixel-exact."""
    mask, rho = _lesion_mask(cls, p, size)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    shade = 1.0 + p["grad"][0] * xx + p["grad"][1] * yy + 0.04 * np.sin(2 * np.pi * (xx * p["wave"] + p["wphase"]))
    img = np.asarray(p["skin"])[None, None, :] * shade[..., None]
    lesion = np.asarray(p["colour"])[None, None, :] * (0.85 + 0.3 * np.clip(rho, 0, 1.5))[..., None]
    img[mask] = lesion[mask]
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _derm_params(cls: str, size: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random geometry and colours of one lesion (positions in pixels, angles in radians)."""
    colour = np.asarray(DERM_CLASSES[cls]) * rng.uniform(0.85, 1.15) + rng.uniform(-10, 10, 3)
    return {"cx": size * rng.uniform(0.32, 0.68), "cy": size * rng.uniform(0.32, 0.68),
            "r": size * rng.uniform(0.14, 0.26), "aspect": rng.uniform(0.7, 1.0), "theta": rng.uniform(0, np.pi),
            "inner": rng.uniform(0.45, 0.6), "amp": rng.uniform(0.22, 0.32),
            "k": int(rng.integers(3, 6)) + 3 * (cls == "streaks"), "phase": rng.uniform(0, 2 * np.pi),
            "colour": np.clip(colour, 0, 255), "skin": np.asarray([224.0, 172.0, 140.0]) * rng.uniform(0.88, 1.06)
            + rng.uniform(-8, 8, 3),
            "grad": rng.uniform(-0.12, 0.12, 2), "wave": rng.uniform(0.5, 1.5), "wphase": rng.uniform(0, 1)}


def _redraw(p: dict[str, Any], size: int, rng: np.random.Generator) -> dict[str, Any]:
    """The same lesion photographed again: slightly shifted, rotated, scaled and lit differently."""
    q = dict(p)
    q["cx"] = p["cx"] + rng.uniform(-3, 3) * size / 64
    q["cy"] = p["cy"] + rng.uniform(-3, 3) * size / 64
    q["theta"], q["r"] = p["theta"] + rng.uniform(-0.3, 0.3), p["r"] * rng.uniform(0.93, 1.07)
    q["colour"], q["skin"] = p["colour"] * rng.uniform(0.97, 1.03), p["skin"] * rng.uniform(0.97, 1.03)
    q["grad"] = rng.uniform(-0.12, 0.12, 2)
    return q


def _make_derm(root: Path, seed: int, n_per_class: int, size: int) -> list[str]:
    """Write the HAM10000-style folder; returns the image ids."""
    rng = np.random.default_rng([seed, 1])
    shots: list[tuple[str, int, dict[str, Any]]] = []  # (class, lesion number, params)
    n_lesions = 0
    for cls in DERM_CLASSES:
        n_pairs = round(n_per_class / 6)
        for i in range(n_per_class - n_pairs):
            p = _derm_params(cls, size, rng)
            shots.append((cls, n_lesions, p))
            if i < n_pairs:
                shots.append((cls, n_lesions, _redraw(p, size, rng)))
            n_lesions += 1
    lesion_ids = rng.permutation(n_lesions)  # lesion numbers do not follow the class order
    lesion_meta = {n: {"dx_type": str(rng.choice(["histo", "follow_up", "consensus", "confocal"])),
                       "age": f"{5 * int(rng.integers(4, 18))}.0", "sex": str(rng.choice(["male", "female"])),
                       "localization": str(rng.choice(_SITES))} for n in range(n_lesions)}
    rows = []
    for number, k in enumerate(rng.permutation(len(shots))):
        cls, lesion, p = shots[k]
        image_id = f"SAMPLE_{number:07d}"
        img, mask = _draw_derm(cls, p, size, np.random.default_rng([seed, 2, number]))
        for path, arr in ((root / "images" / f"{image_id}.png", img),
                          (root / "masks" / f"{image_id}_segmentation.png", mask)):
            _atomic(path, lambda t: Image.fromarray(arr).save(t, format="PNG"))
        ys, xs = np.nonzero(mask)
        rows.append({"lesion_id": f"SLES_{lesion_ids[lesion]:07d}", "image_id": image_id, "dx": cls,
                     **lesion_meta[lesion], "top": int(ys.min()), "bottom": int(ys.max()),
                     "left": int(xs.min()), "right": int(xs.max())})
    _write_csv(root / "HAM10000_metadata.csv", DERM_COLUMNS, rows)
    _write_csv(root / "HAM10000_metadata_ext.csv", DERM_COLUMNS + ["top", "bottom", "left", "right"], rows)
    _write_text(root / "classes.txt", "".join(f"{c}\n" for c in DERM_CLASSES))  # the label vocabulary
    return [r["image_id"] for r in rows]


# ----------------------------------------------------------------------------------------------------- DICOM
def _chest(rng: np.random.Generator, view: str) -> np.ndarray:
    """A chest-radiograph-like image (64, 64) float in [0, 4095], bright = dense (MONOCHROME2 appearance)."""
    y, x = np.mgrid[-1:1:DICOM_SIZE * 1j, -1:1:DICOM_SIZE * 1j]
    x = (x - rng.uniform(-0.06, 0.06)) * rng.uniform(0.95, 1.05)
    y = (y - rng.uniform(-0.06, 0.06)) * rng.uniform(0.95, 1.05)

    def soft(e: np.ndarray) -> np.ndarray:  # ~1 inside the unit level set, smooth 0..1 edge
        return 1.0 / (1.0 + np.exp(np.clip((e - 1.0) / 0.06, -50, 50)))

    body = soft((x / 0.85) ** 2 + ((y - 0.1) / 1.05) ** 2)
    lungs = soft(((np.abs(x) - 0.4) / 0.27) ** 2 + ((y + 0.05) / 0.55) ** 2)
    heart_r = 0.27 if view == "AP" else 0.24  # AP magnifies the heart
    heart = soft(((x - 0.12) / heart_r) ** 2 + ((y - 0.3) / 0.22) ** 2)
    spine = soft((x / 0.1) ** 2)
    ribs = (np.cos(2 * np.pi * 5 * (y + 0.3 * x ** 2)) > 0.6) * lungs
    img = 250 + 1600 * body - 1000 * lungs * (1 - heart) + 600 * heart * body + 900 * spine * body + 350 * ribs
    img = img * rng.uniform(0.95, 1.05) + rng.normal(0, 30, img.shape)
    return np.clip(img, 0, 4095)


def _uid(seed: int, *parts: object) -> UID:
    """A UID derived from the seed and ``parts`` only. (pydicom ignores ``entropy_srcs`` when ``prefix=None`` and
    draws a uuid4, so its default prefix is kept; it joins the sources without a separator, hence one string.)"""
    return generate_uid(entropy_srcs=["|".join(map(str, ("medsim-sample", seed, *parts)))])


def _make_dicom(root: Path, seed: int, n_dicom: int) -> list[str]:
    """Write ``n_dicom`` CR files; returns the file names. One (index 1, or 0 if alone) is MONOCHROME1."""
    rng = np.random.default_rng([seed, 3])
    n_patients = 2 if n_dicom < 6 else 3
    mono1 = min(1, n_dicom - 1)
    for i in range(n_dicom):
        pat, study, image = i % n_patients, (i // n_patients) % 2, i // (2 * n_patients)
        name, sex, birth = _PATIENTS[pat]
        view = "AP" if (pat + study) % 2 else "PA"
        values = np.rint(_chest(rng, view)).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_STORAGE, _uid(seed, "sop", i)
        meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta, ds.SpecificCharacterSet = meta, "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, "study", pat, study), _uid(seed, "series", pat, study)
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = name, f"SAMPLE-PAT-{pat + 1:03d}", sex, birth
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"20{20 + study:02d}{pat + 1:02d}15"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{9 + pat:02d}3000"
        ds.AccessionNumber, ds.StudyID = f"SACC{pat + 1}{study + 1}", str(study + 1)
        ds.SeriesNumber, ds.InstanceNumber = 1, image + 1
        ds.Modality, ds.Manufacturer, ds.InstitutionName = "CR", "medsim synthetic", "SAMPLE HOSPITAL"
        ds.BodyPartExamined, ds.ViewPosition, ds.ImageLaterality = "CHEST", view, "B"
        ds.Rows = ds.Columns = DICOM_SIZE
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
        ds.PixelSpacing = ds.ImagerPixelSpacing = [5.5, 5.5]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        mono = i == mono1  # MONOCHROME1 is stored inverted: a reader honouring it shows the same picture
        ds.PhotometricInterpretation = "MONOCHROME1" if mono else "MONOCHROME2"
        ds.PixelData = (4095 - values if mono else values).astype("<u2").tobytes()
        _atomic(root / f"sample_{i:03d}.dcm", lambda t: ds.save_as(t, enforce_file_format=True))
    return [f"sample_{i:03d}.dcm" for i in range(n_dicom)]


# -------------------------------------------------------------------------------------------------------- CT
def _make_ct(root: Path, seed: int, shape: tuple[int, int, int]) -> None:
    """Write ``ct.nii.gz`` (int16 HU, ``shape`` as (x, y, z) in RAS, 1.5 x 1.5 x 2.0 mm) and ``labels.nii.gz``."""
    rng = np.random.default_rng([seed, 4])
    n = np.asarray(shape, dtype=np.float64)
    i, j, k = np.meshgrid(*(np.arange(s) - (s - 1) / 2 for s in shape), indexing="ij")
    taper = 1.0 - 0.1 * (2 * k / n[2]) ** 2
    body = (i / (0.42 * n[0] * taper)) ** 2 + (j / (0.33 * n[1] * taper)) ** 2 <= 1.0

    def blob(c: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
        c_ = np.asarray(c) * n + rng.uniform(-1, 1, 3)
        e = sum(((g - cc) / (s * nn)) ** 2 for g, cc, s, nn in zip((i, j, k), c_, semi, n))
        return e <= 1.0 + 0.15 * np.sin(3 * np.arctan2(j - c_[1], i - c_[0]) + rng.uniform(0, 2 * np.pi))

    labels = np.zeros(shape, np.uint8)
    labels[blob((0.18, 0.08, 0.15), (0.16, 0.13, 0.25)) & body] = 1  # liver, patient's right (+x), anterior
    for side in (-1, 1):
        labels[blob((side * 0.21, -0.12, -0.1), (0.07, 0.08, 0.18)) & body] = 2  # kidneys
    spine_x, spine_y = rng.uniform(-0.5, 0.5, 2)
    labels[((i - spine_x) ** 2 + (j + 0.22 * n[1] - spine_y) ** 2 <= (0.06 * n[0]) ** 2) & body] = 3
    hu = np.where(body, _CT_HU[0], -1000.0)
    for lab in CT_LABELS:
        hu[labels == lab] = _CT_HU[lab]
    hu += np.where(body, rng.normal(0, 8, shape), rng.normal(0, 3, shape))
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = -(n - 1) / 2 * np.array([1.5, 1.5, 2.0])
    for name, arr in (("ct.nii.gz", np.clip(np.rint(hu), -1024, 3071).astype(np.int16)), ("labels.nii.gz", labels)):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        _atomic(root / name, lambda t: nib.save(img, t))
    _write_text(root / "label_names.json", json.dumps({str(k_): v for k_, v in CT_LABELS.items()}, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ top level
def _complete(out: Path, params: dict[str, Any]) -> bool:
    """Whether ``out`` already holds a full sample made with ``params``."""
    try:
        if json.loads((out / "sample.json").read_text()) != params:
            return False
        with open(out / "derm" / "HAM10000_metadata.csv", newline="") as f:
            ids = [r["image_id"] for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return False
    files = [out / "derm" / "HAM10000_metadata_ext.csv", out / "README.md",
             *(out / "ct" / n for n in ("ct.nii.gz", "labels.nii.gz", "label_names.json")),
             *(out / "dicom" / f"sample_{i:03d}.dcm" for i in range(params["n_dicom"])),
             *(out / "derm" / "images" / f"{d}.png" for d in ids),
             *(out / "derm" / "masks" / f"{d}_segmentation.png" for d in ids)]
    return len(ids) == len(DERM_CLASSES) * params["n_per_class"] and all(p.is_file() for p in files)


def _prune(folder: Path, pattern: str, keep: set[str]) -> None:
    """Delete files of an earlier sample (matching ``pattern``) that this one did not write."""
    for p in folder.glob(pattern):
        if p.name not in keep:
            p.unlink()


def make_sample(out_dir: str | os.PathLike, *, seed: int = 0, n_per_class: int = 40, size: int = 64,
                n_dicom: int = 6, volume_shape: tuple[int, int, int] = (48, 48, 32)) -> dict[str, Path]:
    """Write the synthetic sample under ``out_dir`` and return ``{"derm": ..., "dicom": ..., "ct": ...}``.

    ``n_per_class`` RGB images (size, size, 3) per lesion class, ``n_dicom`` CR files (64, 64) uint16, one CT
    volume of ``volume_shape`` (x, y, z). If ``out_dir/sample.json`` shows a complete sample with the same
    parameters, nothing is rewritten."""
    if n_per_class < 1 or size < 16 or n_dicom < 1 or min(volume_shape) < 8:
        raise ValueError("make_sample needs n_per_class >= 1, size >= 16, n_dicom >= 1, volume sides >= 8")
    out = Path(out_dir)
    dirs = {"derm": out / "derm", "dicom": out / "dicom", "ct": out / "ct"}
    params = {"format": FORMAT_VERSION, "seed": int(seed), "n_per_class": int(n_per_class), "size": int(size),
              "n_dicom": int(n_dicom), "volume_shape": [int(s) for s in volume_shape]}
    if _complete(out, params):
        log.debug("reusing the sample in %s", out)
        return dirs
    log.info("writing the synthetic sample (seed %d) to %s", seed, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sample.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    ids = _make_derm(dirs["derm"], seed, n_per_class, size)
    _prune(dirs["derm"] / "images", "SAMPLE_*.png", {f"{d}.png" for d in ids})
    _prune(dirs["derm"] / "masks", "SAMPLE_*_segmentation.png", {f"{d}_segmentation.png" for d in ids})
    _prune(dirs["dicom"], "sample_*.dcm", set(_make_dicom(dirs["dicom"], seed, n_dicom)))
    _make_ct(dirs["ct"], seed, tuple(volume_shape))
    _write_text(out / "README.md", f"""# medsim synthetic sample (seed {seed})

Everything here is SYNTHETIC, generated by `medsim.data.sample.make_sample(seed={seed})`; no real patient data.

- `derm/`: HAM10000 layout. `images/SAMPLE_*.png` (RGB {size}x{size}), `masks/*_segmentation.png` (0/255, exactly
  the lesion pixels), `HAM10000_metadata.csv` (dx = {", ".join(DERM_CLASSES)}; some lesion_ids have two images),
  `HAM10000_metadata_ext.csv` (plus the mask bounding box top/bottom/left/right, inclusive).
- `dicom/`: {n_dicom} chest-like CR images (64x64, 12 bit) of invented patients (2 studies each); one is MONOCHROME1.
- `ct/`: `ct.nii.gz` (HU, {"x".join(map(str, volume_shape))} voxels of 1.5x1.5x2.0 mm, RAS), `labels.nii.gz`
  and `label_names.json` ({", ".join(f"{k} {v}" for k, v in CT_LABELS.items())}).
""")
    _write_text(out / "sample.json", json.dumps(params, indent=1) + "\n")
    return dirs
