"""Landmark search with pixel-wise anatomical embeddings (SAM: Yan et al., "SAM: Self-supervised Learning of
Pixel-wise Anatomical Embeddings in Radiological Images", IEEE TMI 2022), torch-free.

A SAM model maps a volume to dense embedding maps — a coarse **global** one and a fine **local** one, each
L2-normalised over channels — in which the same anatomical point of two scans has the most similar vectors. To find
a template point in a target scan (the paper's inference, Fig. 11 of the review in ``shared/papers``):

1. sample the template's embedding vector of every level at the point (trilinear, between cell centres);
2. in the target, the cosine similarity of that vector with every cell of the same level;
3. put every level's similarity map on the finest level's cells (trilinear, each map where its cells sit on the
   input: :class:`~medsim.runtime.geometry.AttentionGeometry`) and average them;
4. the found point is the finest cell with the highest mean similarity; its value is the match's score.

Coordinates are continuous voxel coordinates of the model grid (voxel ``k`` spans ``[k, k + 1)``, its centre is
``k + 0.5``), axes in MONAI order (x, y, z); :func:`match_point` takes and returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medsim.runtime.errors import DeployError
from medsim.runtime.geometry import AttentionGeometry

__all__ = ["DenseEmbedding", "Match", "sample", "similarity_map", "match_point", "find_landmarks", "planes_picture"]


@dataclass(frozen=True)
class DenseEmbedding:
    """One pixel-wise embedding map of a volume: ``values`` (D, *S), L2-normalised over D, and ``geometry``
    (where its cells sit on the model input)."""

    values: np.ndarray
    geometry: AttentionGeometry

    def __post_init__(self) -> None:
        v = np.asarray(self.values)
        if v.ndim != len(self.geometry.axes) + 1:
            raise DeployError(f"a dense embedding is (D, *spatial) with {len(self.geometry.axes)} spatial axes, got "
                              f"shape {v.shape}")
        cells = tuple(a.cells for a in self.geometry.axes)
        if v.shape[1:] != cells:
            raise DeployError(f"dense embedding of spatial shape {v.shape[1:]} does not match its geometry's cells "
                              f"{cells}")
        if not np.isfinite(v).all():
            raise DeployError("dense embedding contains NaN/inf values")

    def cell_coords(self, points: np.ndarray) -> np.ndarray:
        """(N, ndim) continuous input coordinates → (N, ndim) fractional cell indices (cell i's centre → i)."""
        p = np.asarray(points, dtype=np.float64)
        centre = np.array([a.centre for a in self.geometry.axes])
        stride = np.array([a.stride for a in self.geometry.axes])
        return (p - centre) / stride

    def centres(self) -> np.ndarray:
        """(prod(S), ndim) every cell's centre in continuous input coordinates, C order of ``values[0]``."""
        grids = np.meshgrid(*[a.centres() for a in self.geometry.axes], indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1)


@dataclass(frozen=True)
class Match:
    """A found point: ``point`` (ndim,) continuous input coordinates of the target's model grid, ``score`` the mean
    cosine similarity over the levels there, ``levels`` each level's similarity there."""

    point: np.ndarray
    score: float
    levels: dict[str, float]


def _interp(values: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Multilinear interpolation of ``values`` (C, *S) at fractional cell indices ``cells`` (N, ndim), the edge
    cells' values held outside the first/last centres (SciPy ``map_coordinates``, order 1, mode "nearest")
    → (N, C)."""
    from scipy.ndimage import map_coordinates

    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(cells, dtype=np.float64).T
    return np.stack([map_coordinates(ch, c, order=1, mode="nearest") for ch in v], axis=1)


def sample(emb: DenseEmbedding, points: np.ndarray) -> np.ndarray:
    """The embedding at continuous input coordinates ``points`` (N, ndim) or (ndim,): trilinear between cell
    centres, re-normalised to unit length → (N, D) (or (D,))."""
    p = np.asarray(points, dtype=np.float64)
    one = p.ndim == 1
    vec = _interp(emb.values, emb.cell_coords(p.reshape(-1, p.shape[-1])))
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    return vec[0] if one else vec


def similarity_map(query: np.ndarray, emb: DenseEmbedding) -> np.ndarray:
    """Cosine similarity of a unit vector ``query`` (D,) with every cell of ``emb`` → (*S)."""
    q = np.asarray(query, dtype=np.float64)
    if q.shape != (emb.values.shape[0],):
        raise DeployError(f"query vector of shape {q.shape} for an embedding of {emb.values.shape[0]} channels")
    return np.tensordot(q, np.asarray(emb.values, dtype=np.float64), axes=(0, 0))


def match_point(template: Mapping[str, DenseEmbedding], point: Sequence[float],
                target: Mapping[str, DenseEmbedding], *, weights: Mapping[str, float] | None = None) -> Match:
    """The target point most similar to the template's ``point`` (continuous input coordinates of the template's
    model grid), over the levels both have (e.g. ``global`` and ``local``), averaged with ``weights`` (equal by
    default) on the finest level's cells (the one with the smallest cell volume).

    Raises:
        DeployError: no common level, or a point outside the template's grid.
    """
    levels = [k for k in template if k in target]
    if not levels:
        raise DeployError(f"template levels {sorted(template)} and target levels {sorted(target)} share none")
    p = np.asarray(point, dtype=np.float64)
    size = np.array(template[levels[0]].geometry.input_size, dtype=np.float64)
    if p.shape != size.shape or (p < 0).any() or (p > size).any():
        raise DeployError(f"point {p.tolist()} is outside the template's model grid [0, {size.tolist()}]")
    w = {k: float((weights or {}).get(k, 1.0)) for k in levels}
    if sum(w.values()) <= 0:
        raise DeployError(f"level weights {w} must sum to a positive number")
    finest = min(levels, key=lambda k: np.prod([a.stride for a in target[k].geometry.axes]))
    fine = target[finest]
    centres = fine.centres()
    total = np.zeros(len(centres))
    on_fine: dict[str, np.ndarray] = {}
    for k in levels:
        sim = similarity_map(sample(template[k], p), target[k])
        on_fine[k] = sim.ravel() if k == finest else _interp(sim[None], target[k].cell_coords(centres))[:, 0]
        total += w[k] * on_fine[k]
    total /= sum(w.values())
    best = int(np.argmax(total))
    return Match(point=centres[best], score=float(total[best]), levels={k: float(v[best]) for k, v in on_fine.items()})


# ------------------------------------------------------------------------------------ volumes → found points
def _dense_geometries(manifest: Mapping[str, object], where: str) -> dict[str, AttentionGeometry]:
    """The manifest's ``dense_geometry`` (one entry per dense output), or DeployError for a non-SAM export."""
    geoms = manifest.get("dense_geometry")
    if not isinstance(geoms, Mapping) or not geoms:
        raise DeployError(f"{where}: the export has no dense embedding maps (dense_geometry); landmark search needs a "
                          "SAM model (`medsim train bundles/ct_sam`, then `medsim export`)")
    return {str(n): AttentionGeometry.from_dict(g) for n, g in geoms.items()}


def _sized(geometry: AttentionGeometry, input_size: Sequence[int], cells: Sequence[int]) -> AttentionGeometry:
    """``geometry`` (the manifest's, at the training size) for an input of ``input_size`` whose map has ``cells``:
    the same centres and strides (checked at export, ``dynamic_spatial``), the output's own cell counts."""
    from medsim.runtime.geometry import AxisGeometry

    return AttentionGeometry(tuple(int(v) for v in input_size),
                             tuple(AxisGeometry(int(c), a.centre, a.stride, a.receptive_field)
                                   for a, c in zip(geometry.axes, cells)))


def _to_grid(point_world: np.ndarray, grid_affine: np.ndarray) -> np.ndarray:
    """RAS mm → continuous voxel coordinates of the model grid (voxel k's centre at k + 0.5)."""
    return (np.linalg.inv(grid_affine) @ np.append(point_world, 1.0))[:3] + 0.5


def _to_world(point_grid: np.ndarray, grid_affine: np.ndarray) -> np.ndarray:
    return (grid_affine @ np.append(np.asarray(point_grid, np.float64) - 0.5, 1.0))[:3]


def find_landmarks(model_dir: str, template: str, point: Sequence[float], targets: Sequence[str], *,
                   unit: str = "mm", backend: str = "auto", weights: Mapping[str, float] | None = None,
                   pictures: str | None = None, crop: bool = False) -> list[dict[str, object]]:
    """Where the template's ``point`` is in each target volume, with an exported SAM model (torch-free).

    Args:
        model_dir: the export (``medsim export`` of a ``ct_sam`` run: ``dense_geometry`` in its manifest).
        template: a NIfTI file or DICOM series folder.
        point: (x, y, z) in ``unit``: ``mm`` (world RAS coordinates, as a viewer shows them) or ``voxel`` (indices
            of the template file's own array).
        targets: NIfTI files or DICOM series folders.
        pictures: a folder for ``<name>_landmark.png`` per target: the template point and the found point on the
            three planes through them (axial, coronal, sagittal of the model grids, radiological display).
        crop: search the model's training crop of each volume (resampled and centre-cropped to its input size)
            instead of the whole volume. Exports with ``dynamic_spatial`` (every SAM export since it existed)
            embed whole volumes by default; older exports can only crop.

    Returns:
        one dict per target (in order): ``name`` (its case token), ``point_mm`` (RAS), ``point_voxel`` (indices of
        the target file's array, fractional), ``score`` (mean cosine similarity over the levels), ``levels``; and
        the template's own ``template_mm`` / ``template_grid``.

    Raises:
        DeployError: not a SAM export, an unreadable volume, a volume too large for a whole-volume grid, or a
            point outside the template's model grid (with ``crop``, or an export without ``dynamic_spatial``, the
            model sees only its centre crop of each volume).
    """
    from medsim.deploy.engine import open_engine
    from medsim.deploy.tasks import case_names
    from medsim.runtime.volume import model_grid, read_volume, whole_grid

    if unit not in ("mm", "voxel"):
        raise DeployError(f"unit must be 'mm' or 'voxel', got '{unit}'")
    p = np.asarray(point, dtype=np.float64)
    if p.shape != (3,) or not np.isfinite(p).all():
        raise DeployError(f"point must be three finite numbers x,y,z, got {list(point)}")
    with open_engine(model_dir, backend, batch_size=1) as engine:
        geoms = _dense_geometries(engine.manifest, str(model_dir))
        prep = engine.manifest["preprocessing"]
        whole = None if crop else engine.dynamic_spatial

        def levels(vol: str) -> tuple[dict[str, DenseEmbedding], np.ndarray, np.ndarray]:
            if whole:
                grid, affine = whole_grid(vol, prep, multiple=int(whole["multiple"]), min_size=whole["min_size"])
            else:
                grid, affine = model_grid(vol, prep)
            out = engine.run(grid[None, None])
            return {n: DenseEmbedding(out[n][0], _sized(g, grid.shape, out[n].shape[2:]))
                    for n, g in geoms.items()}, affine, grid

        tpl, tpl_affine, tpl_grid = levels(template)
        world = p if unit == "mm" else (read_volume(template)[1] @ np.append(p, 1.0))[:3]
        on_grid = _to_grid(world, tpl_affine)
        rows: list[dict[str, object]] = []
        names = case_names(list(targets))
        for name, target in zip(names, targets):
            tgt, tgt_affine, tgt_grid = levels(target)
            try:
                m = match_point(tpl, on_grid, tgt, weights=weights)
            except DeployError as e:
                raise DeployError(f"{template}: the point {unit} {p.tolist()} — {e}") from None
            found = _to_world(m.point, tgt_affine)
            vox = (np.linalg.inv(read_volume(target)[1]) @ np.append(found, 1.0))[:3]
            if pictures is not None:
                planes_picture(tpl_grid, on_grid, tgt_grid, m.point, Path(pictures) / f"{name}_landmark.png",
                               caption=f"similarity {m.score:.3f}")
            rows.append({"name": name, "point_mm": found.round(3).tolist(), "point_voxel": vox.round(3).tolist(),
                         "point_grid": m.point.tolist(), "score": m.score, "levels": m.levels,
                         "template_mm": world.round(3).tolist(), "template_grid": on_grid.tolist()})
    return rows


def _planes(volume: np.ndarray, point: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Axial, coronal and sagittal slices of an (x, y, z) RAS volume through ``point`` (continuous coordinates),
    radiological display (patient right on the image's left, superior up, anterior up / left), each with the
    point's (row, column) in it."""
    X, Y, Z = volume.shape
    x, y, z = (np.asarray(point, np.float64) - 0.5)
    i, j, k = (int(np.clip(round(v), 0, n - 1)) for v, n in zip((x, y, z), volume.shape))
    return [(volume[::-1, ::-1, k].T, (Y - 1 - y, X - 1 - x)),   # axial: rows anterior → posterior
            (volume[::-1, j, ::-1].T, (Z - 1 - z, X - 1 - x)),   # coronal: rows superior → inferior
            (volume[i, ::-1, ::-1].T, (Z - 1 - z, Y - 1 - y))]   # sagittal: columns anterior → posterior


def planes_picture(template: np.ndarray, template_point: np.ndarray, target: np.ndarray, found: np.ndarray,
                   path: Path, *, size: int = 160, caption: str = "") -> Path:
    """A PNG: top row the template's three planes through its point (green cross), bottom row the target's through
    the found point (red cross). Volumes are model grids (x, y, z) in [0, 1] or any range (min–max scaled)."""
    from PIL import Image, ImageDraw

    from medsim.errors import atomic_path

    tiles = []
    for vol, pt, colour in ((template, template_point, (40, 220, 40)), (target, found, (240, 40, 40))):
        lo, hi = float(vol.min()), float(vol.max())
        row = []
        for sl, (r, c) in _planes(vol, pt):
            g = ((sl - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(sl)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(g).convert("RGB")
            scale = size / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST)
            d = ImageDraw.Draw(img)
            cx, cy = (c + 0.5) * scale, (r + 0.5) * scale
            d.line([(cx - 8, cy), (cx + 8, cy)], fill=colour, width=2)
            d.line([(cx, cy - 8), (cx, cy + 8)], fill=colour, width=2)
            row.append(img)
        tiles.append(row)
    w = sum(t.width for t in tiles[0]) + 4 * 4
    h = sum(max(t.height for t in r) for r in tiles) + 3 * 4 + 16
    sheet = Image.new("RGB", (w, h), "white")
    y = 4
    for r in tiles:
        x = 4
        for t in r:
            sheet.paste(t, (x, y))
            x += t.width + 4
        y += max(t.height for t in r) + 4
    ImageDraw.Draw(sheet).text((4, y), f"template (green) / found (red): axial, coronal, sagittal  {caption}",
                               fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp)
    return path
