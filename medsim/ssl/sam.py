"""SAM: self-supervised pixel-wise anatomical embeddings (Yan et al., "SAM: Self-supervised learning of pixel-wise
anatomical embeddings in radiological images", IEEE TMI 2022, arXiv:2012.02383).

Two overlapping crops of one volume (:mod:`medsim.data.views3d`) with ``P`` positive point pairs, ``pos_0`` in view
0 and ``pos_1`` in view 1 (voxel-index coordinates, (B, P, 3), from the batch's ``target``). The encoder
(:class:`medsim.nn.SAMNet`) gives a global (coarse) and a local (fine) L2-normalised embedding map per view. The loss
is InfoNCE per map over the positive pairs:

    L = -1/N sum_i log( exp(f_i · f'_i / τ) / (exp(f_i · f'_i / τ) + sum_{n in N_i} exp(f_i · f'_n / τ)) )

with ``f_i`` view 0's embedding sampled (trilinear) at ``pos_0[i]``, ``f'_i`` view 1's at ``pos_1[i]``, and the
negatives ``N_i`` cells of view 1's map in every image of the batch, except the cells of the anchor's own image
within ``exclude_radius`` voxels of ``pos_1[i]`` (they are the same anatomy):

- global loss: every such cell of the global maps;
- local loss: the ``n_hard`` cells whose *global* embedding is most similar to the anchor's global embedding (the
  paper's hard negatives: places that look like the same body region but are not the point) plus ``n_random``
  other cells drawn at random, out of the local maps' cells (the global map sampled at each local cell's centre).

``symmetric=True`` also uses view 1's points as anchors against view 0; the total is
``global_weight · L_global + local_weight · L_local``. A landmark is found at inference as the cell of highest
``global + local`` similarity (:func:`match_points`), as in the paper.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsim.ssl.losses import SSLLoss, target_tensors
from medsim.ssl.methods import JointEmbedding

__all__ = ["SAM", "SAMLoss", "MapGrid", "map_grid", "geometry_grid", "sample_points", "cell_centres", "info_nce_logits",
           "match_points"]

#: (centre of cell 0 in voxel-index coordinates, stride in voxels), per axis (x, y, z)
MapGrid = tuple[tuple[float, ...], tuple[float, ...]]


def map_grid(encoder: nn.Module, name: str, input_size: Sequence[int]) -> MapGrid:
    """The grid of the encoder's ``name`` map on an input of spatial ``input_size``: cell ``i`` of an axis is
    centred at voxel index ``origin + stride · i`` (from ``encoder.map_geometry``; its centres are continuous
    coordinates, voxel k spanning [k, k + 1), hence the - 0.5)."""
    return geometry_grid(encoder.map_geometry(name, tuple(int(v) for v in input_size)))


def geometry_grid(geom: Any) -> MapGrid:
    """A map's :class:`~medsim.nn.geometry.AttentionGeometry` as a :data:`MapGrid` in voxel-index coordinates
    (the geometry's centres are continuous coordinates, voxel k spanning [k, k + 1): hence the - 0.5)."""
    return tuple(a.centre - 0.5 for a in geom.axes), tuple(float(a.stride) for a in geom.axes)


def _to_cells(points: torch.Tensor, grid: MapGrid) -> torch.Tensor:
    origin = torch.as_tensor(grid[0], dtype=points.dtype, device=points.device)
    stride = torch.as_tensor(grid[1], dtype=points.dtype, device=points.device)
    return (points - origin) / stride


def sample_points(emb: torch.Tensor, points: torch.Tensor, grid: MapGrid, *, normalize: bool = True
                  ) -> torch.Tensor:
    """Embeddings of ``emb`` (B, C, X, Y, Z) at voxel-index ``points`` (B, P, 3) of the input, trilinear between the
    cell centres (``grid``, :func:`map_grid`) and the edge cell held beyond them; re-normalised to unit length.

    Returns (B, P, C).
    """
    b, p = points.shape[:2]
    cells = _to_cells(points.to(emb.dtype), grid)
    sizes = torch.tensor(emb.shape[2:], dtype=emb.dtype, device=emb.device)
    norm = torch.where(sizes > 1, 2 * cells / (sizes - 1).clamp_min(1) - 1, torch.zeros_like(cells))
    grid_xyz = norm.flip(-1).reshape(b, p, 1, 1, 3)  # grid_sample reads (w, h, d) = (z, y, x)
    out = F.grid_sample(emb, grid_xyz, mode="bilinear", padding_mode="border", align_corners=True)
    out = out.reshape(b, emb.shape[1], p).transpose(1, 2)
    return F.normalize(out, dim=-1) if normalize else out


def cell_centres(spatial: Sequence[int], grid: MapGrid, device: torch.device | str | None = None) -> torch.Tensor:
    """(M, 3) voxel-index centres of every cell of a map of spatial shape ``spatial``, in ``flatten(2)`` order."""
    axes = [o + s * torch.arange(n, dtype=torch.float32, device=device) for o, s, n in zip(*grid, spatial)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def info_nce_logits(positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE from similarities: ``mean_i [-s_i+/τ + log(exp(s_i+/τ) + sum_k valid_ik exp(s_ik/τ))]``.

    Args:
        positive: (N,) similarity of each anchor to its positive.
        negatives: (N, K) similarities to its negatives.
        valid: (N, K) bool, which negatives count (all when None).
    """
    neg = negatives / temperature
    if valid is not None:
        neg = neg.masked_fill(~valid, float("-inf"))
    logits = torch.cat([positive[:, None] / temperature, neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive / temperature).mean()


class SAM(JointEmbedding):
    """SAM (Yan et al. TMI 2022): the encoder's global and local maps of both views; no projector (the maps are the
    representation that landmark search uses).

    forward: 2 views (B, C, X, Y, Z) -> ``{"global": [g_0, g_1] (B, Dg, *Sg), "local": [l_0, l_1] (B, Dl, *Sl),
    "grid": {"global": [grid_0, grid_1], "local": [...]}}`` with each grid as :func:`map_grid` gives it.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__(encoder)
        if not hasattr(encoder, "map_geometry"):
            raise ValueError(f"SAM needs an encoder with global/local maps and map_geometry (medsim.nn.SAMNet), got a "
                             f"{type(encoder).__name__}")
        self._grids: dict[tuple[str, tuple[int, ...]], MapGrid] = {}

    def grid(self, name: str, input_size: Sequence[int]) -> MapGrid:
        """:func:`map_grid` of the encoder, cached per input size."""
        key = (name, tuple(int(v) for v in input_size))
        if key not in self._grids:
            self._grids[key] = map_grid(self.encoder, name, key[1])
        return self._grids[key]

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        if len(views) != 2:
            raise ValueError(f"SAM contrasts two views with point correspondences, got {len(views)} views")
        outs = [self.encoder(v) for v in views]
        return {"global": [o["global"] for o in outs], "local": [o["local"] for o in outs],
                "grid": {n: [self.grid(n, v.shape[2:]) for v in views] for n in ("global", "local")}}


def _exclusion(candidates: torch.Tensor, owner: torch.Tensor, positives: torch.Tensor, anchor_owner: torch.Tensor,
               radius: float) -> torch.Tensor:
    """(N, M) bool: True where candidate m (centre ``candidates[m]``, image ``owner[m]``) may be a negative of anchor
    n (positive at ``positives[n]`` in image ``anchor_owner[n]``): another image, or at least ``radius`` voxels away."""
    same = anchor_owner[:, None] == owner[None, :]
    near = torch.cdist(positives, candidates) < radius
    return ~(same & near)


class SAMLoss(SSLLoss):
    """SAM's global + local InfoNCE over positive voxel pairs with hard negatives (module docstring).

    Args:
        temperature: τ (SAM: 0.5).
        n_hard: local negatives per anchor chosen by global-embedding similarity.
        n_random: further local negatives per anchor drawn at random.
        global_weight, local_weight: weights of the two terms.
        exclude_radius: candidates of the anchor's own image nearer than this (voxels of the view) to the positive
            are not negatives; ``None``: one stride of each map (the cells around the positive).
        symmetric: also anchor on view 1's points against view 0.
        pos_keys: the target's keys of the (B, P, 3) point coordinates of view 0 and view 1.

    pred: :class:`SAM`'s output; target: ``{"pos_0": (B, P, 3), "pos_1": (B, P, 3), ...}``. After each call
    :attr:`last` holds the two terms (floats) for logging.
    """

    required_outputs = ("global", "local", "grid")

    def __init__(self, temperature: float = 0.5, n_hard: int = 64, n_random: int = 64, global_weight: float = 1.0,
                 local_weight: float = 1.0, exclude_radius: float | None = None, symmetric: bool = True,
                 pos_keys: Sequence[str] = ("pos_0", "pos_1")):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}")
        if n_hard < 0 or n_random < 0 or n_hard + n_random < 1:
            raise ValueError(f"the local loss needs negatives: n_hard + n_random >= 1, got n_hard={n_hard} "
                             f"n_random={n_random}")
        self.temperature, self.n_hard, self.n_random = float(temperature), int(n_hard), int(n_random)
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)
        self.exclude_radius, self.symmetric, self.pos_keys = exclude_radius, symmetric, tuple(pos_keys)
        self.last: dict[str, float] = {}

    def forward(self, pred: Mapping[str, Any], target: Mapping[str, Any] | torch.Tensor | None = None
                ) -> torch.Tensor:
        self._pos = target_tensors(target, self.pos_keys, "SAMLoss", "the point pairs", "the batch of "
                                   "medsim.data.views3d.sam_view_transforms through views_prepare_batch")
        for p in self._pos:
            if p.ndim != 3 or p.shape[-1] != 3:
                raise ValueError(f"point coordinates must be (B, P, 3), got shape {tuple(p.shape)}")
        return super().forward(pred, target)

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        directions = [(0, 1), (1, 0)] if self.symmetric else [(0, 1)]
        glob = sum(self.global_loss(pred, self._pos, a, b) for a, b in directions) / len(directions)
        loc = sum(self.local_loss(pred, self._pos, a, b) for a, b in directions) / len(directions)
        self.last = {"global": float(glob.detach()), "local": float(loc.detach())}
        return self.global_weight * glob + self.local_weight * loc

    def _radius(self, grid: MapGrid) -> float:
        return float(self.exclude_radius) if self.exclude_radius is not None else max(grid[1])

    def _candidates(self, emb: torch.Tensor, grid: MapGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every cell of a view's maps in the batch: (B·M, C) embeddings, (B·M, 3) centres, (B·M,) image index."""
        b, c, m = emb.shape[0], emb.shape[1], emb[0, 0].numel()
        centres = cell_centres(emb.shape[2:], grid, emb.device)
        return (emb.flatten(2).transpose(1, 2).reshape(b * m, c), centres.repeat(b, 1),
                torch.arange(b, device=emb.device).repeat_interleave(m))

    def global_loss(self, pred: Mapping[str, Any], pos: Sequence[torch.Tensor], a: int, b: int) -> torch.Tensor:
        """InfoNCE of the global maps, anchors in view ``a``, positives and negatives in view ``b``; ``pos`` the
        (B, P, 3) points of each view."""
        maps, grids = pred["global"], pred["grid"]["global"]
        anchor = sample_points(maps[a], pos[a], grids[a]).flatten(0, 1)  # (N, Dg)
        positive = sample_points(maps[b], pos[b], grids[b]).flatten(0, 1)
        cand, centres, owner = self._candidates(maps[b], grids[b])
        n_per = pos[a].shape[1]
        anchor_owner = torch.arange(maps[a].shape[0], device=anchor.device).repeat_interleave(n_per)
        valid = _exclusion(centres, owner, pos[b].flatten(0, 1).to(centres), anchor_owner, self._radius(grids[b]))
        return info_nce_logits((anchor * positive).sum(-1), anchor @ cand.T, self.temperature, valid)

    def local_loss(self, pred: Mapping[str, Any], pos: Sequence[torch.Tensor], a: int, b: int) -> torch.Tensor:
        """InfoNCE of the local maps with hard negatives chosen by global similarity (module docstring)."""
        gmaps, lmaps, grids = pred["global"], pred["local"], pred["grid"]
        anchor = sample_points(lmaps[a], pos[a], grids["local"][a]).flatten(0, 1)  # (N, Dl)
        positive = sample_points(lmaps[b], pos[b], grids["local"][b]).flatten(0, 1)
        cand, centres, owner = self._candidates(lmaps[b], grids["local"][b])  # (B·M, Dl)
        bsz, n_per = lmaps[b].shape[0], pos[a].shape[1]
        anchor_owner = torch.arange(bsz, device=anchor.device).repeat_interleave(n_per)
        valid = _exclusion(centres, owner, pos[b].flatten(0, 1).to(centres), anchor_owner,
                           self._radius(grids["local"][b]))
        with torch.no_grad():  # choosing the negatives is not differentiated
            g_anchor = sample_points(gmaps[a], pos[a], grids["global"][a]).flatten(0, 1)  # (N, Dg)
            # the global map at each local cell, not re-normalised: g_anchor · g_cand is then the global
            # similarity map upsampled (trilinear) to the local grid, as the paper ranks the hard negatives
            g_cand = sample_points(gmaps[b], centres[: centres.shape[0] // bsz].expand(bsz, -1, -1),
                                   grids["global"][b], normalize=False).flatten(0, 1)
            hard_score = (g_anchor @ g_cand.T).masked_fill(~valid, float("-inf"))
            k_hard = min(self.n_hard, hard_score.shape[1])
            chosen = hard_score.topk(k_hard, dim=1).indices if k_hard else hard_score.new_zeros((len(anchor), 0),
                                                                                                dtype=torch.long)
            taken = torch.zeros_like(valid).scatter_(1, chosen, True) if k_hard else torch.zeros_like(valid)
            rand_score = torch.rand(valid.shape, device=valid.device).masked_fill(~valid | taken, float("-inf"))
            k_rand = min(self.n_random, rand_score.shape[1] - k_hard)
            picked = torch.cat([chosen, rand_score.topk(k_rand, dim=1).indices], dim=1)
            picked_valid = torch.cat([hard_score.gather(1, chosen), rand_score.gather(1, picked[:, k_hard:])],
                                     dim=1) > float("-inf")
        negatives = torch.einsum("nd,nkd->nk", anchor, cand[picked])
        return info_nce_logits((anchor * positive).sum(-1), negatives, self.temperature, picked_valid)


@torch.no_grad()
def match_points(pred: Mapping[str, Any], points: torch.Tensor, *, source: int = 0, target: int = 1,
                 use_global: bool = True) -> torch.Tensor:
    """SAM's landmark search between the two views of each item: for every point of view ``source`` (voxel indices
    (B, P, 3)), the centre of the local cell of view ``target`` (same item) with the highest similarity
    ``local · local' (+ global · global' when use_global``: the global similarity map trilinearly upsampled to the
    local cells) — the rule of the torch-free :func:`medsim.deploy.landmark.match_point` (argmax of the mean of
    the two maps).

    Returns (B, P, 3) voxel-index coordinates in view ``target``.
    """
    grids = pred["grid"]
    lmap = pred["local"][target]
    centres = cell_centres(lmap.shape[2:], grids["local"][target], lmap.device)  # (M, 3)
    bsz = lmap.shape[0]
    q_local = sample_points(pred["local"][source], points, grids["local"][source])  # (B, P, Dl)
    score = torch.einsum("bpd,bdm->bpm", q_local, lmap.flatten(2))
    if use_global:
        q_global = sample_points(pred["global"][source], points, grids["global"][source])
        g_cells = sample_points(pred["global"][target], centres.expand(bsz, -1, -1), grids["global"][target],
                                normalize=False)  # linear in the map: the global similarity map, upsampled
        score = score + torch.einsum("bpd,bmd->bpm", q_global, g_cells)
    return centres[score.argmax(-1)]
