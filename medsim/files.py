"""What medsim reads from disk: which files a folder holds, what each file is by its content, how many
pixels one file may decode to, and how a PyTorch file is read as data.

Torch-free at import (NumPy-free too), so the data layer (:mod:`medsim.data`) and the runtime (:mod:`medsim.deploy`)
share one answer to each question:

- :data:`MAX_PIXELS` — the one decompression-bomb limit (pixels × frames × samples, or voxels) for every image,
  mask, DICOM and NIfTI file, in training and at inference. ``$MEDSIM_MAX_PIXELS`` overrides it.
- :func:`sniff_format` — PNG / JPEG / TIFF / BMP / NIfTI / DICOM from the first bytes, never from the name;
  :func:`file_format` falls back on the name only when the content matches nothing.
- :func:`open_image` — ``PIL.Image.open`` + ``load`` under that limit; every failure is one
  :class:`~medsim.errors.DataError` naming the file ("truncated JPEG file", "image too large", …);
  :func:`raise_pil_limit` lets MONAI's PIL reader load what that accepted.
- :func:`visible_files` — the files under a folder, with hidden ones (``.DS_Store``, AppleDouble ``._*``,
  ``.git/``) skipped and counted.
- :func:`load_torch_file` — medsim's one ``torch.load``, weights-only (torch imported inside it): checkpoints
  (:func:`medsim.engines.runs.load_checkpoint`) and backbone weights (:func:`medsim.nn.make_backbone`) are data,
  and a pickle that would import or call anything is refused before any of it runs.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medsim.errors import DataError, MedsimError

__all__ = ["MAX_PIXELS", "check_pixel_count", "sniff_format", "file_format", "FORMAT_NAMES", "open_image",
           "raise_pil_limit", "VisibleFiles", "visible_files", "load_torch_file"]

#: upper bound on decoded pixels per file (rows × columns × frames × samples, or voxels of a volume); larger files
#: are refused as possible decompression bombs. 2**28 = a 16384 × 16384 image. Override with ``$MEDSIM_MAX_PIXELS``.
MAX_PIXELS = int(os.environ.get("MEDSIM_MAX_PIXELS", 2**28))

#: how each format :func:`sniff_format` returns is spelled in messages
FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "webp": "WebP",
                "nifti": "NIfTI", "dicom": "DICOM"}

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
          (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"), (b"GIF87a", "gif"), (b"GIF89a", "gif"))


def check_pixel_count(n: int, path: str | os.PathLike, what: str, *, limit: int | None = None) -> None:
    """Raise :class:`DataError` naming ``path`` when ``n`` decoded pixels (described by ``what``, e.g.
    ``"512x512x3"``) exceed ``limit`` (default :data:`MAX_PIXELS`)."""
    limit = _limit() if limit is None else limit
    if n > limit:
        raise DataError(path, f"{what} = {n} pixels exceeds the limit of {limit} (possible decompression bomb; "
                              "raise MEDSIM_MAX_PIXELS if it is genuine)")


def _limit() -> int:
    # read at call time, so a test (or a caller) can lower medsim.files.MAX_PIXELS
    return int(globals()["MAX_PIXELS"])


# ------------------------------------------------------------------------------------------------- formats
def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1 (sizeof_hdr 348, magic ``n+1``/``ni1`` at 344) or NIfTI-2 (540, magic ``n+2``/``ni2`` at 4)."""
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order) if len(head) >= 4 else 0
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def _is_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble and ``DICM`` prefix (old ACR-NEMA style files, which
    pydicom reads with ``force=True``): it opens with a little-endian tag of group 0002 or 0008 followed by
    an explicit VR (two capitals) or a 4-byte implicit-VR length that fits the header."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return int.from_bytes(head[4:8], "little") < 1024


def sniff_format(path: str | os.PathLike) -> str | None:
    """The format of the file at ``path`` from its content: ``"png"``, ``"jpeg"``, ``"tiff"``, ``"bmp"``,
    ``"gif"``, ``"webp"``, ``"nifti"`` (``.nii`` or gzipped ``.nii.gz``) or ``"dicom"`` (``DICM`` at offset
    128, or a data set without preamble); None for anything else (empty, text, a corrupt header).

    Raises:
        DataError: the file cannot be opened (missing, a folder, no permission).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(544)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e})") from None
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself be a TIFF header (dual-personality files)
        return "dicom"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:2] == b"BM" and len(head) >= 26 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64,
                                                                                           108, 124):
        return "bmp"  # "BM" + a known DIB header size, so a text file starting with "BM" is not taken for one
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _is_nifti_header(head):
        return "nifti"
    if head[:2] == b"\x1f\x8b":  # gzip: a .nii.gz looks like any other gzip file until it is opened
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(544)
        except (OSError, EOFError):
            return None
        return "nifti" if _is_nifti_header(inner) else None
    if _is_bare_dicom(head):
        return "dicom"
    return None


#: what a name says when the content says nothing (empty, corrupt header): the reader for that format then
#: reports the file with the reason
_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp",
              ".gif": "gif", ".webp": "webp", ".nii": "nifti", ".gz": "nifti", ".dcm": "dicom", ".dicom": "dicom",
              ".dic": "dicom", ".ima": "dicom"}


def file_format(path: str | os.PathLike) -> str | None:
    """The format a single file is read as: :func:`sniff_format` (its content) first, its name only when the
    content matches no format (so a ``.png`` holding text goes to the image reader, which says so, and a
    ``.nii.gz`` with a broken header to the NIfTI reader). None when neither tells."""
    fmt = sniff_format(path)
    if fmt is not None:
        return fmt
    name = Path(path).name.lower()
    if name.endswith(".gz") and not name.endswith(".nii.gz"):
        return None
    return _BY_SUFFIX.get(Path(name).suffix)


# ------------------------------------------------------------------------------------------------- decoding
def open_image(path: str | os.PathLike):
    """Open and decode an image file with PIL, refusing more than :data:`MAX_PIXELS` pixels.

    Returns the loaded ``PIL.Image.Image`` (use it in a ``with`` block). Every failure is one
    :class:`DataError` naming the file: not found, empty, a decompression bomb, a truncated or corrupt
    PNG/JPEG/… (the format named from the file's content), or content that is no image format at all.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(p, "empty file (0 bytes)")
    fmt = sniff_format(p)
    name = FORMAT_NAMES.get(fmt or "", "")
    limit = _limit()
    with warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises only above twice that: both are a bomb here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        im = None
        try:
            im = Image.open(p)
            im.load()
            return im
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            if im is not None:
                im.close()
            raise DataError(p, f"{name or 'image'} too large, possible decompression bomb ({e}); limit "
                               f"{limit} pixels, raise MEDSIM_MAX_PIXELS if it is genuine") from None
        except UnidentifiedImageError:
            if fmt is None:
                suffix = f" despite its '{p.suffix}' name" if p.suffix else ""
                raise DataError(p, f"not a readable image: its content is no PNG, JPEG, TIFF, BMP, NIfTI or "
                                   f"DICOM file{suffix}") from None
            raise DataError(p, f"corrupt or truncated {name} file: its header cannot be read") from None
        except Exception as e:  # OSError (truncated data, decoder errors), SyntaxError/ValueError from plugins
            if im is not None:
                im.close()
            what = name or (im.format if im is not None and im.format else "image")
            if "truncated" in str(e).lower():
                raise DataError(p, f"truncated {what} file ({e})") from None
            raise DataError(p, f"corrupt {what} file ({type(e).__name__}: {e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


def raise_pil_limit() -> None:
    """Let PIL itself (and so MONAI's ``PILReader`` in training transforms) decode every image :func:`open_image`
    accepts: PIL's own default refuses above 178,956,970 pixels, below :data:`MAX_PIXELS`. Images above the limit
    are refused by validation (:func:`open_image`) before any training starts."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _limit():
        Image.MAX_IMAGE_PIXELS = _limit()


# ------------------------------------------------------------------------------------------------- folders
@dataclass
class VisibleFiles:
    """The files a folder scan uses (sorted) and how many hidden entries it skipped."""

    files: list[Path] = field(default_factory=list)
    hidden: int = 0


def visible_files(root: str | os.PathLike, suffixes: Iterable[str] | None = None) -> VisibleFiles:
    """Every file under ``root`` (recursively, sorted) whose path below ``root`` has no part starting with
    ``"."``; each hidden file and hidden folder (not its contents) counts once in ``hidden``. ``suffixes``
    keeps only names ending with one of them (case-insensitive)."""
    root = Path(root)
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    out = VisibleFiles()
    seen = {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):  # linked folders are followed, as rglob did
        keep = [d for d in dirs if not d.startswith(".")]
        out.hidden += len(dirs) - len(keep)
        real = [os.path.realpath(os.path.join(folder, d)) for d in keep]
        keep = [d for d, r in zip(keep, real) if r not in seen]  # a link back up the tree would never end
        seen.update(real)
        dirs[:] = keep
        for n in files:
            if n.startswith("."):
                out.hidden += 1
            elif ends is None or n.lower().endswith(ends):
                out.files.append(Path(folder) / n)
    out.files.sort()
    return out


# ------------------------------------------------------------------------------------------------- torch files
def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """Read a PyTorch file (``torch.save``) as data: ``torch.load(weights_only=True)`` on CPU, so only tensors,
    numbers, strings and plain containers come back. This is the one ``torch.load`` in medsim.

    Args:
        path: the file.
        what: what the file is, for messages (``"checkpoint"``, ``"backbone weights file"``).

    Raises:
        MedsimError: the file is missing or not a PyTorch file, or its pickle asks for anything beyond plain data
            (e.g. ``os.system``) — refused before any of it runs, naming the file and what it asked for.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise MedsimError(f"{p}: {what} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise MedsimError(f"{p}: refused: not a weights-only {what} (its pickle asks for {m.group(1)}); "
                              f"medsim loads a {what} as data and never runs code from it — re-save it with "
                              "plain tensors/dicts only") from e
        raise MedsimError(f"{p}: not a readable PyTorch {what} ({str(e).strip().splitlines()[0][:200]})") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MedsimError(f"{p}: not a readable PyTorch {what} ({type(e).__name__}: {first})") from e
