"""Histology TIFFs (whole-slide-like, tiled, possibly pyramidal) cut into tissue patches for MONAI.

Three entry points:

* :func:`tiff_info` -- level shapes, tile size, dtype, samples per pixel, from the TIFF header only.
* :func:`patch_grid` -- a datalist of patch items on a regular grid, background patches dropped using a
  low-resolution thumbnail (never a full decode of level 0).
* :func:`patch_dataset` -- a :class:`monai.data.PatchWSIDataset` that reads those items.

Coordinate convention (identical to MONAI's ``WSIReader`` / ``PatchWSIDataset`` with ``center_location=False``):

* ``location`` is ``[y, x]`` = ``(row, column)`` of the patch's **top-left** pixel in the **level-0** frame;
* ``size`` is ``[h, w]`` in pixels **of the requested level**;
* MONAI's tifffile reader maps a level-0 location to level ``L`` as ``round(location / ratio)`` with
  ``ratio = height_0 / height_L`` for *both* axes; :func:`patch_grid` builds level-0 locations so that this maps
  back exactly onto the grid position at level ``L``.

``PatchWSIDataset`` defaults to ``center_location=True`` (location = patch centre) and ``include_label=True``;
:func:`patch_dataset` sets both correctly for these items.

Pyramid levels are tifffile's ``series[0].levels`` (SubIFD pyramids, reduced-resolution pages, SVS). MONAI's own
tifffile reader counts ``TiffFile.pages`` instead, so it sees only level 0 of a SubIFD pyramid (and the thumbnail
page of an SVS as "level 1"), and it decodes the whole level for every patch. :class:`TiledTiffWSIReader` is a
thin subclass that fixes both: same API and output, but it reads only the tiles/strips a patch touches.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from medsim.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import tifffile
    from monai.data import PatchWSIDataset

__all__ = ["tiff_info", "patch_grid", "patch_dataset", "read_region", "TiledTiffWSIReader"]

logger = logging.getLogger(__name__)

#: the tissue thumbnail has at least this many pixels along each side of a patch footprint.
THUMB_PIXELS_PER_PATCH = 16
#: bytes of compressed tiles read from the file in one pass.
_READ_BUFFER = 1 << 24
_PHOTOMETRIC_OK = {"MINISBLACK", "MINISWHITE", "RGB", "YCBCR"}


# --------------------------------------------------------------------------------------------------------------------
# header
# --------------------------------------------------------------------------------------------------------------------
def _open(path: str | os.PathLike) -> tifffile.TiffFile:
    """Open ``path`` with tifffile, turning every failure into a one-line :class:`DataError`."""
    import tifffile

    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    if not p.is_file():
        raise DataError(p, "not a regular file")
    size = p.stat().st_size
    if size < 8:
        raise DataError(p, f"not a TIFF file (only {size} bytes)")
    try:
        return tifffile.TiffFile(p)
    except tifffile.TiffFileError as exc:
        raise DataError(p, f"not a readable TIFF file ({exc})") from exc
    except (ValueError, OSError, EOFError, struct.error, IndexError, KeyError) as exc:
        raise DataError(p, f"corrupt TIFF header ({type(exc).__name__}: {exc})") from exc


def _levels(tif: tifffile.TiffFile) -> list[Any]:
    """Pyramid levels of the first series (level 0 first); each is a tifffile ``TiffPageSeries``."""
    return list(tif.series[0].levels)


def _level_page(tif: tifffile.TiffFile, level: int) -> Any:
    return tif.series[0].levels[level].keyframe


def _validate(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise :class:`DataError` unless the file is a 2D gray/RGB(A) image whose level pages are intact."""
    try:
        if not tif.series:
            raise DataError(path, "TIFF file holds no image")
        series = tif.series[0]
        axes = series.axes
        if axes not in ("YX", "YXS", "SYX"):  # SYX: RGB stored planar (separate)
            raise DataError(path, f"not a 2D gray or RGB image (tifffile axes {axes!r}, shape {series.shape})")
        file_size = tif.filehandle.size
        for n, lvl in enumerate(series.levels):
            page = lvl.keyframe
            spp = int(page.samplesperpixel)
            if spp not in (1, 3, 4):
                raise DataError(path, f"level {n}: {spp} samples per pixel (expected 1 gray, 3 RGB or 4 RGBA)")
            photometric = page.photometric.name
            if photometric not in _PHOTOMETRIC_OK:
                raise DataError(path, f"level {n}: unsupported photometric interpretation {photometric}")
            if page.dtype is None:
                raise DataError(path, f"level {n}: unsupported sample format ({page.bitspersample}-bit)")
            if page.imagelength < 1 or page.imagewidth < 1:
                raise DataError(path, f"level {n}: empty image")
            offsets, counts = page.dataoffsets, page.databytecounts
            if not offsets or len(offsets) != len(counts):
                raise DataError(path, f"level {n}: missing tile/strip offsets")
            ends = [o + c for o, c in zip(offsets, counts) if c]
            if ends and max(ends) > file_size:
                raise DataError(path, f"truncated TIFF: level {n} image data ends at byte {max(ends)}, "
                                      f"file has {file_size} bytes")
            try:  # builds the decoder without decoding anything; raises if the codec is missing/unsupported
                page.decode(None, 0)
            except (ValueError, NotImplementedError) as exc:
                raise DataError(path, f"level {n}: cannot decode {page.compression.name} "
                                      f"compression ({exc}); `imagecodecs` may be needed") from exc
    except DataError:
        raise
    except Exception as exc:  # tifffile parses lazily: a broken IFD can surface here
        raise DataError(path, f"corrupt TIFF structure ({type(exc).__name__}: {exc})") from exc


def tiff_info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a histology TIFF from its header only (no pixel data is decoded).

    Returns:
        ``{"path": str, "height": int, "width": int,  # level 0
        "levels": int, "level_shapes": [[h, w], ...], "downsamples": [float, ...],  # height_0 / height_L
        "tile_size": [th, tw] | None (stripped), "dtype": "uint8", "samples_per_pixel": 1 | 3 | 4,
        "photometric": "RGB", "compression": "ADOBE_DEFLATE"}``

    Raises:
        DataError: missing file, not a TIFF, corrupt or truncated header/data offsets, not a 2D gray/RGB(A) image,
            or a compression tifffile cannot decode here.
    """
    p = Path(path)
    with _open(p) as tif:
        _validate(tif, p)
        pages = [lvl.keyframe for lvl in _levels(tif)]
        p0 = pages[0]
        shapes = [[int(pg.imagelength), int(pg.imagewidth)] for pg in pages]
        return {
            "path": str(p),
            "height": shapes[0][0],
            "width": shapes[0][1],
            "levels": len(pages),
            "level_shapes": shapes,
            "downsamples": [float(shapes[0][0]) / float(h) for h, _ in shapes],
            "tile_size": [int(p0.tilelength), int(p0.tilewidth)] if p0.is_tiled else None,
            "dtype": str(p0.dtype),
            "samples_per_pixel": int(p0.samplesperpixel),
            "photometric": p0.photometric.name,
            "compression": p0.compression.name,
        }


# --------------------------------------------------------------------------------------------------------------------
# region reads (only the tiles / strips that intersect)
# --------------------------------------------------------------------------------------------------------------------
def _memmap(page: Any) -> np.ndarray | None:
    """Uncompressed contiguous page as a read-only ``(H, W, S)`` memmap, or None when that is not possible."""
    try:
        if not (page.is_contiguous and page.is_memmappable and page.parent.filehandle.is_file):
            return None
        fh = page.parent.filehandle
        dtype = np.dtype(page.parent.byteorder + page.dtype.char)
        sep, depth, length, width, contig = page.shaped
        if depth != 1:
            return None
        arr = np.memmap(fh.path, dtype=dtype, mode="r", offset=page.dataoffsets[0],
                        shape=(sep, depth, length, width, contig))
        return arr[:, 0].transpose(1, 2, 0, 3).reshape(length, width, sep * contig)
    except Exception:  # noqa: BLE001 - any oddity: use the segment path instead
        return None


def _segments(page: Any, y0: int, y1: int, x0: int, x1: int) -> Iterator[tuple[np.ndarray | None, tuple, tuple]]:
    """Decode the tiles/strips of ``page`` that intersect rows ``[y0, y1)`` and columns ``[x0, x1)``.

    Yields ``(segment (depth, h, w, contig_samples) | None, (sample, z, row, col, 0), shape)`` as tifffile's
    ``TiffPage.decode`` does.
    """
    if page.is_tiled:
        th, tw = int(page.tilelength), int(page.tilewidth)
        nty, ntx = math.ceil(page.imagelength / th), math.ceil(page.imagewidth / tw)
        rows = range(y0 // th, min(nty, math.ceil(y1 / th)))
        cols = range(x0 // tw, min(ntx, math.ceil(x1 / tw)))
        per_plane = nty * ntx
        wanted = [r * ntx + c for r in rows for c in cols]
    else:
        rps = int(min(page.rowsperstrip, page.imagelength))
        nstrips = math.ceil(page.imagelength / rps)
        per_plane = nstrips
        wanted = list(range(y0 // rps, min(nstrips, math.ceil(y1 / rps))))
    nsep = int(page.samplesperpixel) if page.planarconfig == 2 else 1
    indices = [s * per_plane + i for s in range(nsep) for i in wanted]
    kwargs: dict[str, Any] = {}
    if page.compression in (6, 7, 34892, 33007):  # JPEG flavours
        kwargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
    fh = page.parent.filehandle
    offsets = [page.dataoffsets[i] for i in indices]
    counts = [page.databytecounts[i] for i in indices]
    for data, k in fh.read_segments(offsets, counts, indices=indices, sort=True, lock=fh.lock,
                                    buffersize=_READ_BUFFER):
        yield page.decode(data, k, **kwargs)


def _read_page_region(page: Any, y: int, x: int, h: int, w: int, step: int = 1) -> np.ndarray:
    """Pixels ``[y:y+h:step, x:x+w:step]`` of one TIFF page as ``(h', w', S)``, decoding only what intersects.

    The region must lie inside the page. Empty (sparse) tiles read as 0.
    """
    mm = _memmap(page)
    if mm is not None:
        return np.ascontiguousarray(mm[y:y + h:step, x:x + w:step])
    spp = int(page.samplesperpixel)
    oh, ow = len(range(0, h, step)), len(range(0, w, step))
    out = np.zeros((oh, ow, spp), dtype=page.dtype)
    contig = page.planarconfig == 1 or spp == 1
    for seg, idx, shape in _segments(page, y, y + h, x, x + w):
        if seg is None:
            continue
        sample, _, sy, sx, _ = idx
        seg = seg[0]  # (h, w, contig samples)
        # intersection in page coordinates, aligned to the output sampling grid
        ys = max(y, sy)
        ys += (-(ys - y)) % step
        xs = max(x, sx)
        xs += (-(xs - x)) % step
        ye, xe = min(y + h, sy + seg.shape[0]), min(x + w, sx + seg.shape[1])
        if ys >= ye or xs >= xe:
            continue
        part = seg[ys - sy:ye - sy:step, xs - sx:xe - sx:step]
        oy, ox = (ys - y) // step, (xs - x) // step
        chans = slice(None) if contig else slice(sample, sample + 1)
        out[oy:oy + part.shape[0], ox:ox + part.shape[1], chans] = part
    return out


def read_region(path: str | os.PathLike, location: Sequence[int], size: Sequence[int], level: int = 0) -> np.ndarray:
    """Read one patch the way :class:`TiledTiffWSIReader` does, as ``(h, w, S)`` channel-last (no RGB fix-up).

    Args:
        location: ``(y, x)`` top-left in level-0 pixels.
        size: ``(h, w)`` at ``level``.
    """
    p = Path(path)
    with _open(p) as tif:
        _validate(tif, p)
        page = _level_page(tif, level)
        ratio = float(_level_page(tif, 0).imagelength) / float(page.imagelength)
        ly, lx = (round(v / ratio) for v in location)
        h = max(0, min(int(size[0]), page.imagelength - ly))
        w = max(0, min(int(size[1]), page.imagewidth - lx))
        return _read_page_region(page, ly, lx, h, w)


# --------------------------------------------------------------------------------------------------------------------
# patch grid
# --------------------------------------------------------------------------------------------------------------------
def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def _tissue_mask(thumb: np.ndarray, background_level: float) -> np.ndarray:
    """``(h, w, S)`` thumbnail -> ``(h, w)`` bool: a pixel is tissue when *any* colour channel is darker than
    ``background_level`` (alpha ignored)."""
    color = thumb[..., :3] if thumb.shape[-1] >= 3 else thumb[..., :1]
    return (color < background_level).any(axis=-1)


def _thumbnail(tif: tifffile.TiffFile, path: Path, max_downsample: float) -> tuple[np.ndarray, float, float]:
    """A low-resolution view of the slide: the coarsest pyramid level with downsample ``<= max_downsample``,
    read with an extra integer stride (tile by tile, so level 0 is never held in memory in full).

    Returns ``(thumb (h, w, S), scale_y, scale_x)`` where thumbnail pixel ``(i, j)`` sits at level-0 pixel
    ``(i * scale_y, j * scale_x)``.
    """
    pages = [lvl.keyframe for lvl in _levels(tif)]
    h0, w0 = pages[0].imagelength, pages[0].imagewidth
    downsamples = [max(h0 / pg.imagelength, w0 / pg.imagewidth) for pg in pages]
    best = max((n for n, d in enumerate(downsamples) if d <= max_downsample), key=lambda n: downsamples[n],
               default=0)
    page = pages[best]
    dy, dx = h0 / page.imagelength, w0 / page.imagewidth
    step = max(1, int(max_downsample // max(dy, dx)))
    try:
        thumb = _read_page_region(page, 0, 0, page.imagelength, page.imagewidth, step=step)
    except Exception as exc:  # codec errors, corrupt tile data
        raise DataError(path, f"cannot decode level {best} ({type(exc).__name__}: {exc})") from exc
    if page.photometric.name == "MINISWHITE" and thumb.dtype.kind == "u":
        thumb = np.iinfo(thumb.dtype).max - thumb  # 0 is white: flip so that "dark" means tissue
    logger.debug("%s: tissue thumbnail from level %d, stride %d -> %s", path, best, step, thumb.shape[:2])
    return thumb, dy * step, dx * step


def patch_grid(path: str | os.PathLike, patch_size: int | Sequence[int] = (256, 256), *, level: int = 0,
               stride: int | Sequence[int] | None = None, tissue_threshold: float = 0.1,
               background_level: float = 220) -> list[dict[str, Any]]:
    """Regular grid of patches over a histology TIFF, keeping those with enough tissue.

    Patches are laid out at ``level``: positions ``0, stride, 2*stride, ...`` (level pixels) such that the whole
    ``patch_size`` fits inside the level image (the partial strip at the right/bottom edge is not used).

    Tissue: a thumbnail pixel is tissue when any RGB channel (the gray value for gray images) is
    ``< background_level`` (same units as the image, 220 suits 8-bit brightfield). A patch's ``tissue_fraction``
    is the fraction of tissue pixels in its footprint on the thumbnail (the coarsest pyramid level giving at least
    :data:`THUMB_PIXELS_PER_PATCH` pixels per patch side, read tile by tile with a stride if needed).

    Args:
        path: the TIFF file.
        patch_size: ``(h, w)`` (or one int) in pixels of ``level``.
        level: pyramid level (tifffile ``series[0].levels`` index) the patches are read at.
        stride: ``(sy, sx)`` in pixels of ``level``; defaults to ``patch_size`` (no overlap).
        tissue_threshold: keep patches with ``tissue_fraction >= tissue_threshold`` (0 keeps every patch).
        background_level: intensity at or above which a channel counts as background.

    Returns:
        datalist items ``{"image": str(path), "location": [y, x] (level-0 top-left), "size": [h, w],
        "level": level, "tissue_fraction": float, "id": f"{stem}_y{y}_x{x}"}``, row-major order.

    Raises:
        DataError: unusable file (see :func:`tiff_info`) or a level the file does not have.
    """
    ph, pw = _pair(patch_size, "patch_size")
    sh, sw = _pair(stride if stride is not None else (ph, pw), "stride")
    if not 0.0 <= float(tissue_threshold) <= 1.0:
        raise ValueError(f"tissue_threshold must be in [0, 1], got {tissue_threshold}")
    p = Path(path)
    with _open(p) as tif:
        _validate(tif, p)
        levels = _levels(tif)
        if not 0 <= level < len(levels):
            raise DataError(p, f"level {level} requested, file has {len(levels)} level(s) (0..{len(levels) - 1})")
        p0, pl = levels[0].keyframe, levels[level].keyframe
        h0 = int(p0.imagelength)
        hl, wl = int(pl.imagelength), int(pl.imagewidth)
        ratio = float(h0) / float(hl)  # MONAI TiffFileWSIReader.get_downsample_ratio: height ratio for both axes
        ys = list(range(0, hl - ph + 1, sh))
        xs = list(range(0, wl - pw + 1, sw))
        if not ys or not xs:
            logger.warning("%s: level %d is %dx%d, smaller than patch %dx%d: no patches", p, level, hl, wl, ph, pw)
            return []
        max_ds = max(1.0, min(ph, pw) * ratio / THUMB_PIXELS_PER_PATCH)
        thumb, sy, sx = _thumbnail(tif, p, max_ds)

    mask = _tissue_mask(thumb, background_level)
    th, tw = mask.shape
    integral = np.zeros((th + 1, tw + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)

    stem = p.stem
    items: list[dict[str, Any]] = []
    for yl in ys:
        y = int(round(yl * ratio))
        assert round(y / ratio) == yl, (y, yl, ratio)
        r0 = min(th - 1, int(math.floor(y / sy)))
        r1 = max(r0 + 1, min(th, int(math.ceil((y + ph * ratio) / sy))))
        for xl in xs:
            x = int(round(xl * ratio))
            assert round(x / ratio) == xl, (x, xl, ratio)
            c0 = min(tw - 1, int(math.floor(x / sx)))
            c1 = max(c0 + 1, min(tw, int(math.ceil((x + pw * ratio) / sx))))
            n = int(integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0])
            frac = n / float((r1 - r0) * (c1 - c0))
            if frac >= tissue_threshold:
                items.append({"image": str(p), "location": [y, x], "size": [ph, pw], "level": int(level),
                              "tissue_fraction": round(frac, 6), "id": f"{stem}_y{y}_x{x}"})
    logger.info("%s: %d of %d patches (%dx%d at level %d) have tissue fraction >= %g", p, len(items),
                len(ys) * len(xs), ph, pw, level, tissue_threshold)
    return items


# --------------------------------------------------------------------------------------------------------------------
# MONAI reader / dataset
# --------------------------------------------------------------------------------------------------------------------
def _reader_class() -> type:
    """Build :class:`TiledTiffWSIReader` lazily (MONAI is a heavy import)."""
    from monai.data.wsi_reader import TiffFileWSIReader

    class _TiledTiffWSIReader(TiffFileWSIReader):
        """MONAI's tifffile WSI reader, reading only the tiles a patch touches and counting pyramid levels as
        tifffile's ``series[0].levels`` (SubIFD pyramids, SVS). Output is identical to MONAI's for level 0 and
        for pyramids stored as reduced-resolution pages. Gray images are repeated to 3 channels in ``RGB`` mode.
        """

        @staticmethod
        def get_level_count(wsi) -> int:
            return len(wsi.series[0].levels)

        def get_size(self, wsi, level: int) -> tuple[int, int]:
            page = _level_page(wsi, level)
            return (int(page.imagelength), int(page.imagewidth))

        def get_downsample_ratio(self, wsi, level: int) -> float:
            return float(_level_page(wsi, 0).imagelength) / float(_level_page(wsi, level).imagelength)

        def get_mpp(self, wsi, level: int) -> tuple[float, float]:
            # MONAI's implementation reads the tags of wsi.pages[level]; hand it the pyramid level's page instead
            pages = [_level_page(wsi, n) for n in range(level + 1)]
            return super().get_mpp(SimpleNamespace(pages=pages), level)

        def _get_patch(self, wsi, location: tuple[int, int], size: tuple[int, int], level: int, dtype,
                       mode: str) -> np.ndarray:
            page = _level_page(wsi, level)
            ratio = self.get_downsample_ratio(wsi=wsi, level=level)
            ly, lx = (round(location[i] / ratio) for i in range(2))
            # same clipping as MONAI's slicing of the full level: patches past the edge come back smaller
            h = max(0, min(int(size[0]), int(page.imagelength) - ly))
            w = max(0, min(int(size[1]), int(page.imagewidth) - lx))
            src = _read_page_region(page, ly, lx, h, w)
            dst = np.dtype(dtype)
            if not np.can_cast(src.dtype, dst, "safe"):
                raise ValueError(f"{self.get_file_path(wsi)}: image dtype {src.dtype} would be truncated to "
                                 f"{dst}; pass dtype= to the reader")
            patch = src.astype(dst, copy=False)
            if mode in ("RGB", "RGBA") and patch.shape[-1] == 1:
                patch = np.repeat(patch, 3, axis=-1)
            patch = np.moveaxis(patch, -1, self.channel_dim)
            if mode in "RGB":
                if patch.shape[self.channel_dim] not in (3, 4):
                    raise ValueError(f"The image is expected to have three or four color channels in '{mode}' mode "
                                     f"but has {patch.shape[self.channel_dim]}.")
                patch = np.take(patch, [0, 1, 2], self.channel_dim)
            return patch

    _TiledTiffWSIReader.__name__ = _TiledTiffWSIReader.__qualname__ = "TiledTiffWSIReader"
    _TiledTiffWSIReader.__module__ = __name__
    return _TiledTiffWSIReader


_READER_CLS: type | None = None


def __getattr__(name: str) -> Any:  # lazy module attribute: medsim.data.histology.TiledTiffWSIReader
    global _READER_CLS
    if name == "TiledTiffWSIReader":
        if _READER_CLS is None:
            _READER_CLS = _reader_class()
        return _READER_CLS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_dataset(items: Sequence[dict[str, Any]], transform: Callable | None = None, *,
                  reader: Any = "tifffile", **reader_kwargs: Any) -> PatchWSIDataset:
    """A :class:`monai.data.PatchWSIDataset` over :func:`patch_grid` items.

    Each sample is ``{"image": MetaTensor (C=3, h, w) uint8, "label": tensor (if every item has "label")}``; the
    MetaTensor's meta holds MONAI's ``location`` (level-0 ``[y, x]`` top-left), ``size``, ``level``, ``path``,
    plus the item's ``id`` and ``tissue_fraction``.

    Args:
        items: datalist from :func:`patch_grid` (``location`` is the top-left corner, not the centre).
        transform: MONAI transform applied to the sample dict.
        reader: ``"tifffile"`` (default) uses :class:`TiledTiffWSIReader` (tile-wise reads, tifffile levels);
            any other value (``"cuCIM"``, ``"OpenSlide"``, a ``BaseWSIReader`` class or instance) is passed to
            ``PatchWSIDataset`` unchanged.
        reader_kwargs: passed to the reader (e.g. ``dtype=np.uint16`` for 16-bit images, ``mode="RGBA"``).
    """
    from monai.data import PatchWSIDataset

    if isinstance(reader, str) and reader.lower() == "tifffile":
        reader = __getattr__("TiledTiffWSIReader")
    items = list(items)
    meta_keys = [k for k in ("id", "tissue_fraction") if items and all(k in it for it in items)]
    return PatchWSIDataset(
        items,
        patch_size=None,  # per item "size"
        patch_level=None,  # per item "level"
        transform=transform,
        include_label=bool(items) and all("label" in it for it in items),
        center_location=False,  # our "location" is the top-left corner
        additional_meta_keys=meta_keys,
        reader=reader,
        **reader_kwargs,
    )
