"""PGL: BYOL in 3-D plus a local consistency loss between the features of the same region in two views.

Xie, Zhang, Liao, Xia, Shen, "PGL: Prior-Guided Local Self-supervised Learning for 3D Medical Image Segmentation",
arXiv:2011.12640 (2020). BYOL (Grill et al. 2020) only asks the two views' *global* representations to agree; PGL
uses the known spatial transforms between the two augmented views (the "prior") to find the same region in both and
adds a term that asks the *local* features of that region to agree, so the encoder learns features that are
consistent voxel-region by voxel-region — what a segmentation network's encoder needs.

The views are :mod:`medsim.data.views3d`'s paired 3-D crops with their correspondence: ``pos_0`` (B, R, 3) region
centres in view 0 (voxel indices), ``pos_1`` (B, R, 3) the same points in view 1 and ``scale`` (B, 3) view 1's zoom,
so every view-0 coordinate maps to view 1 by ``x_1 = s · x_0 + t`` with ``t = pos_1 - s · pos_0``.

Networks (:class:`PGL`): BYOL's online encoder f, projector g and predictor q on the encoder's pooled embedding, its
EMA target (f', g'), and a *local* projector g_l and predictor q_l (same Linear-BN-ReLU-Linear MLPs) applied at every
cell of the encoder's dense feature map (B, F, *s): online maps ``q_l(g_l(f(x)))`` and target maps ``g'_l(f'(x))``.

Loss (:class:`PGLLoss`), for views a, b = (1, 2) and (2, 1) (symmetrised, as BYOL):

    L = L_global + λ · L_local
    L_global = Σ_(a,b) mean_i (2 - 2 cos(q(g(f(x_a,i))), g'(f'(x_b,i))))                      (BYOL)
    L_local  = Σ_(a,b) mean_(i,r) (2 - 2 cos(ROI_a(q_l g_l f(x_a,i), r), ROI_b(g'_l f'(x_b,i), r)))

where ``ROI_v(M, r)`` is the RoI-align average of the map ``M`` over region r's box in view v: the box of side
``region_size`` voxels of view 0 centred on ``pos_0[r]`` (clipped to the overlap of both views), and in view 1 its
image under the known transform (side ``s · region_size``); the average is over a k×k×k lattice of trilinear samples
(:func:`region_points`, :func:`medsim.ssl.sam.sample_points` on the map's grid). The target branch gets no gradient.

What is medsim's reading, not the paper's text: the local heads are applied per cell before the pooling (pooling and
the MLP do not commute; per-cell heads let every region of a batch share one pass), regions are boxes around the
correspondence points the crops already provide, and the local loss reads one feature level (the encoder's output).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from medsim.ssl.losses import BYOLLoss, byol_regression, target_tensors
from medsim.ssl.methods import BYOL, _frozen_copy, ema_update, projection_head
from medsim.ssl.sam import MapGrid, geometry_grid, sample_points

__all__ = ["PGL", "PGLLoss", "region_points", "pool_regions", "dense_head_apply"]


def dense_head_apply(head: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """An MLP head (B·M, C) -> (B·M, P) applied at every cell of ``maps`` (B, C, *s) -> (B, P, *s) (its BatchNorm
    then normalises over the batch's cells, as a 1×1×1 convolution head with BatchNorm3d would)."""
    b, c, *s = maps.shape
    out = head(maps.flatten(2).transpose(1, 2).reshape(-1, c))  # (B·M, P), the cells of one item contiguous
    return out.reshape(b, -1, out.shape[-1]).transpose(1, 2).reshape(b, -1, *s)


def region_points(pos_0: torch.Tensor, pos_1: torch.Tensor, scale: torch.Tensor, size_0: Sequence[int],
                  size_1: Sequence[int], region_size: float, samples: int = 3
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample lattice of each region's box in both views.

    Region r of item i is the box of side ``region_size`` (voxels of view 0) centred on ``pos_0[i, r]``, clipped to
    view 0 (``size_0``) and to the part of view 0 that view 1 (``size_1``) shows; its image in view 1 under
    ``x_1 = s · x_0 + t`` (``t = pos_1 - s · pos_0``) is the same anatomy. Each box is sampled on a
    ``samples``³ lattice of evenly spaced points (its corners and centre for 3; the centre alone for 1).

    Args:
        pos_0, pos_1: (B, R, 3) the region centres in view 0 and view 1 (voxel indices, x, y, z).
        scale: (B, 3) view 1's zoom per axis (positive).

    Returns:
        (pts_0, pts_1), each (B, R, samples³, 3): corresponding points of view 0 and view 1.
    """
    s = scale[:, None, :].to(pos_0.dtype)  # (B, 1, 3)
    t = pos_1 - s * pos_0
    hi0 = torch.as_tensor([float(v) - 1 for v in size_0], dtype=pos_0.dtype, device=pos_0.device)
    hi1 = torch.as_tensor([float(v) - 1 for v in size_1], dtype=pos_0.dtype, device=pos_0.device)
    half = float(region_size) / 2
    lo = torch.maximum(torch.maximum(pos_0 - half, torch.zeros_like(pos_0)), -t / s)
    hi = torch.minimum(torch.minimum(pos_0 + half, hi0.expand_as(pos_0)), (hi1 - t) / s)
    hi = torch.maximum(hi, lo)  # pos_0 lies in the overlap, so the box is never empty; guard rounding
    frac = torch.linspace(0, 1, samples, dtype=pos_0.dtype, device=pos_0.device) if samples > 1 else \
        torch.full((1,), 0.5, dtype=pos_0.dtype, device=pos_0.device)
    lattice = torch.stack(torch.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3)  # (k³, 3)
    pts_0 = lo[:, :, None] + lattice * (hi - lo)[:, :, None]
    return pts_0, s[:, :, None] * pts_0 + t[:, :, None]


def pool_regions(maps: torch.Tensor, points: torch.Tensor, grid: MapGrid) -> torch.Tensor:
    """RoI-align average of ``maps`` (B, C, *s) over each region's lattice ``points`` (B, R, K, 3) (trilinear
    between the cell centres of ``grid``). Returns (B, R, C)."""
    b, r, k, _ = points.shape
    vals = sample_points(maps, points.reshape(b, r * k, 3), grid, normalize=False)  # (B, R·K, C)
    return vals.reshape(b, r, k, -1).mean(2)


class PGL(BYOL):
    """PGL (Xie et al. 2020): BYOL (online encoder, projector, predictor; EMA target) plus per-cell local projector
    and predictor on the encoder's dense features and their EMA target (module docstring).

    Args:
        encoder: a 3-D Embedder whose output can carry its trunk's ``features`` (:class:`medsim.nn.Embedder`, e.g.
            ``attention="none"``) and whose ``attention_geometry`` places the feature cells (the trunk's grid).
        projection_dim, hidden_dim, momentum: BYOL's global heads and EMA rate τ.
        local_dim, local_hidden_dim: the local heads' output and hidden widths (default: the global ones).

    forward: 2 views (B, C, X, Y, Z) -> BYOL's ``{"p", "z_target"}`` plus ``"p_local": [(B, P_l, *s) × 2]`` (online
    predictions per cell), ``"z_local_target": [(B, P_l, *s) × 2]`` (no grad), ``"grid": [MapGrid × 2]`` and
    ``"input_size": [(X, Y, Z) × 2]``.
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 128, hidden_dim: int = 512, momentum: float = 0.99,
                 local_dim: int | None = None, local_hidden_dim: int | None = None):
        if not hasattr(encoder, "return_features") or not hasattr(encoder, "attention_geometry"):
            raise ValueError(f"PGL needs an encoder with dense features and their geometry (medsim.nn.Embedder), got "
                             f"a {type(encoder).__name__}")
        encoder.return_features = True  # before BYOL copies it into the target
        super().__init__(encoder, projection_dim, hidden_dim, momentum)
        convs = [m for m in encoder.trunk.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        if not convs:
            raise ValueError("PGL: the encoder's trunk has no convolution to read its feature channels from")
        channels = int(convs[-1].out_channels)
        local_dim, local_hidden_dim = int(local_dim or projection_dim), int(local_hidden_dim or hidden_dim)
        self.local_projector = projection_head(channels, local_hidden_dim, local_dim)
        self.local_predictor = projection_head(local_dim, local_hidden_dim, local_dim)
        self.target_local_projector = _frozen_copy(self.local_projector)
        self._grids: dict[tuple[int, ...], MapGrid] = {}

    def grid(self, input_size: Sequence[int]) -> MapGrid:
        """The feature map's grid on an input of spatial ``input_size`` (cached per size)."""
        key = tuple(int(v) for v in input_size)
        if key not in self._grids:
            self._grids[key] = geometry_grid(self.encoder.attention_geometry(key))
        return self._grids[key]

    def update_target(self) -> None:
        super().update_target()
        if self.training:
            ema_update(self.target_local_projector, self.local_projector, self.momentum)

    def forward(self, views: list[torch.Tensor]) -> dict:
        self.check_views(views)
        if len(views) != 2:
            raise ValueError(f"PGL relates two views through their crop transform, got {len(views)} views")
        self.update_target()
        outs = [self.encoder(v) for v in views]
        p = [self.predictor(self.projector(o["embedding"])) for o in outs]
        p_local = [dense_head_apply(self.local_predictor, dense_head_apply(self.local_projector, o["features"]))
                   for o in outs]
        with torch.no_grad():
            targets = [self.target_encoder(v) for v in views]
            z_target = [self.target_projector(o["embedding"]) for o in targets]
            z_local = [dense_head_apply(self.target_local_projector, o["features"]) for o in targets]
        return {"p": p, "z_target": z_target, "p_local": p_local, "z_local_target": z_local,
                "grid": [self.grid(v.shape[2:]) for v in views], "input_size": [tuple(v.shape[2:]) for v in views]}


class PGLLoss(BYOLLoss):
    """PGL's loss ``L_global + local_weight · L_local`` (module docstring).

    Args:
        local_weight: λ (PGL: 1; 0 leaves BYOL's loss alone, though the local heads still run — the ``byol3d``
            baseline uses :class:`~medsim.ssl.BYOL` instead).
        region_size: side of a region's box in voxels of view 0 (default: one cell of the feature map, its stride).
        samples: k, lattice points per axis of a box (k³ trilinear samples averaged).
        keys: the target's keys of ``pos_0``, ``pos_1`` (B, R, 3) and view 1's ``scale`` (B, 3).

    pred: :class:`PGL`'s output; target: ``{"pos_0", "pos_1", "scale", ...}`` (the batch of
    ``sam_view_transforms(..., scale_key="scale")`` through ``views_prepare_batch``). After each call :attr:`last`
    holds both terms (floats).
    """

    required_outputs = ("p", "z_target", "p_local", "z_local_target", "grid", "input_size")

    def __init__(self, local_weight: float = 1.0, region_size: float | None = None, samples: int = 3,
                 keys: Sequence[str] = ("pos_0", "pos_1", "scale")):
        super().__init__()
        if local_weight < 0:
            raise ValueError(f"local_weight must be >= 0, got local_weight={local_weight}")
        if region_size is not None and not region_size > 0:
            raise ValueError(f"region_size must be > 0 voxels, got region_size={region_size}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1 per axis, got samples={samples}")
        self.local_weight, self.region_size, self.samples = float(local_weight), region_size, int(samples)
        self.keys = tuple(keys)
        self.last: dict[str, float] = {}

    def forward(self, pred: Mapping[str, Any], target: Mapping[str, Any] | torch.Tensor | None = None
                ) -> torch.Tensor:
        pos_0, pos_1, scale = (t.float() for t in target_tensors(
            target, self.keys, "PGLLoss", "the crop correspondence",
            "the batch of sam_view_transforms(..., scale_key='scale') through views_prepare_batch"))
        if pos_0.ndim != 3 or pos_0.shape[-1] != 3 or pos_1.shape != pos_0.shape or scale.shape != (len(pos_0), 3):
            raise ValueError(f"expected pos_0, pos_1 (B, R, 3) and scale (B, 3), got shapes {tuple(pos_0.shape)}, "
                             f"{tuple(pos_1.shape)}, {tuple(scale.shape)}")
        self._regions = (pos_0, pos_1, scale)
        return super().forward(pred, target)

    def compute_loss(self, pred: Mapping[str, Any]) -> torch.Tensor:
        glob = super().compute_loss(pred)
        loc = self.local_loss(pred, *self._regions)
        self.last = {"global": float(glob.detach()), "local": float(loc.detach())}
        return glob + self.local_weight * loc

    def local_loss(self, pred: Mapping[str, Any], pos_0: torch.Tensor, pos_1: torch.Tensor, scale: torch.Tensor
                   ) -> torch.Tensor:
        """``L_local``: both directions of BYOL's regression between the pooled regions (module docstring)."""
        grids, sizes = pred["grid"], pred["input_size"]
        region = float(self.region_size) if self.region_size is not None else max(grids[0][1])
        pts = region_points(pos_0, pos_1, scale, sizes[0], sizes[1], region, self.samples)
        q = [pool_regions(pred["p_local"][v], pts[v], grids[v]).flatten(0, 1) for v in (0, 1)]  # (B·R, P_l)
        z = [pool_regions(pred["z_local_target"][v], pts[v], grids[v]).flatten(0, 1) for v in (0, 1)]
        return byol_regression(q[0], z[1]) + byol_regression(q[1], z[0])
