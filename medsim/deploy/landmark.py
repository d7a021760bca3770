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
from typing import Mapping, Sequence

import numpy as np

from medsim.runtime.errors import DeployError
from medsim.runtime.geometry import AttentionGeometry

__all__ = ["DenseEmbedding", "Match", "sample", "similarity_map", "match_point"]


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
    """Multilinear interpolation of ``values`` (C, *S) at fractional cell indices ``cells`` (N, ndim), clamped to
    the grid (the edge cells' values are held outside the first/last centres) → (N, C)."""
    v = np.asarray(values, dtype=np.float64)
    shape = np.array(v.shape[1:])
    c = np.clip(np.asarray(cells, dtype=np.float64), 0.0, shape - 1)
    lo = np.floor(c).astype(np.int64)
    lo = np.minimum(lo, np.maximum(shape - 2, 0))
    frac = c - lo
    out = np.zeros((len(c), v.shape[0]))
    ndim = len(shape)
    for corner in range(2 ** ndim):
        bits = [(corner >> d) & 1 for d in range(ndim)]
        idx = tuple(np.minimum(lo[:, d] + bits[d], shape[d] - 1) for d in range(ndim))
        w = np.prod([frac[:, d] if bits[d] else 1.0 - frac[:, d] for d in range(ndim)], axis=0)
        out += w[:, None] * v[(slice(None),) + idx].T
    return out


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
