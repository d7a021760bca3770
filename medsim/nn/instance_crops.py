"""Instances from an attention map, traceably: connected components of a thresholded grid, the largest ones' boxes,
and bilinear crops of those boxes (no data-dependent Python control flow, so PyTorch and the exported ONNX graph
select and crop the same instances). Used by :class:`medsim.nn.fine_grained_mil.FineGrainedMIL`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["label_components", "largest_components", "crop_boxes"]


def _neighbour_max(lab: torch.Tensor, connectivity: int) -> torch.Tensor:
    if connectivity == 8:
        return F.max_pool2d(lab, 3, stride=1, padding=1)
    return torch.maximum(F.max_pool2d(lab, (1, 3), stride=1, padding=(0, 1)),
                         F.max_pool2d(lab, (3, 1), stride=1, padding=(1, 0)))


def label_components(mask: torch.Tensor, *, connectivity: int = 8, iterations: int | None = None) -> torch.Tensor:
    """Connected components of binary grids by label propagation, with no data-dependent control flow.

    Every foreground cell starts with its own label 1 + (row-major flat index); each of ``iterations`` steps
    replaces it by the largest label among itself and its foreground neighbours (a masked 3×3 max-pool, or the
    4-neighbour cross). After as many steps as the longest shortest path inside a component, every cell holds
    the component's largest starting label. That path has at most (cells − 1) steps, so the default
    ``iterations = h·w − 1`` is exact for any grid (h + w is not: a spiral needs more); on the 6×6 – 12×12
    feature grids this is 35–143 tiny max-pools.

    Args:
        mask: (B, h, w) bool (or 0/1).
        connectivity: 8 (3×3 neighbourhood, ``scipy.ndimage.label`` with a 3×3 structure) or 4 (its default).
        iterations: propagation steps (default h·w − 1).

    Returns:
        (B, h, w) float labels: 0 background, else the component's id (1 + its largest flat index).
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a (B, h, w) mask, got shape {tuple(mask.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got connectivity={connectivity}")
    _, h, w = mask.shape
    m = mask.to(torch.float32).unsqueeze(1)
    lab = m * torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w)
    for _ in range(h * w - 1 if iterations is None else iterations):
        lab = _neighbour_max(lab, connectivity) * m
    return lab[:, 0]


def largest_components(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` largest components of a label grid and their boxes, in grid cells.

    Sizes come from a one-hot count over all possible labels; ties break towards the larger label (a unique
    integer score ``size·(P + 1) + label``, so PyTorch and ONNX TopK agree).

    Args:
        labels: (B, h, w) from :func:`label_components` (values 0 … h·w).
        n: components to return (<= h·w).

    Returns:
        boxes (B, n, 4) float ``(r0, c0, r1, c1)`` half-open cell ranges along dims 1 and 2 of ``labels``,
        sizes (B, n) cell counts, valid (B, n) bool (False where the grid has fewer than n components; those
        boxes are garbage and must be replaced by the caller).
    """
    b, h, w = labels.shape
    p = h * w
    if not 1 <= n <= p:
        raise ValueError(f"n must be in [1, h·w = {p}], got n={n}")
    flat = labels.reshape(b, p)
    ids = torch.arange(1, p + 1, dtype=labels.dtype, device=labels.device)
    onehot = (flat.unsqueeze(2) == ids).to(torch.float32)  # (B, P cells, P labels)
    sizes = onehot.sum(1)  # (B, P labels)
    top = (sizes * (p + 1) + ids).topk(n, dim=1).indices  # (B, n) label slots, largest first
    size = sizes.gather(1, top)
    member = onehot.gather(2, top.unsqueeze(1).expand(-1, p, -1)) > 0  # (B, P, n)
    cell = torch.arange(p, device=labels.device)
    rows = torch.div(cell, w, rounding_mode="floor").to(torch.float32).view(1, p, 1)
    cols = (cell % w).to(torch.float32).view(1, p, 1)
    big = float(p)
    r0 = torch.where(member, rows, big).amin(1)
    c0 = torch.where(member, cols, big).amin(1)
    r1 = torch.where(member, rows, -1.0).amax(1) + 1
    c1 = torch.where(member, cols, -1.0).amax(1) + 1
    return torch.stack([r0, c0, r1, c1], -1), size, size > 0


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear crops of boxes from a batch, resized to ``size``, with ``grid_sample`` on grids built from the
    boxes (traceable; no Python loop over boxes).

    Args:
        x: (B, C, X, Y) images (MONAI order: X along dim 2, Y along dim 3).
        boxes: (B, N, 4) ``(x0, y0, x1, y1)`` pixel edges, x along dim 2 and y along dim 3 of ``x``, half-open.
        size: (sx, sy) output size.

    Returns:
        (B·N, C, sx, sy), crop n of image b at row b·N + n; sample i sits at the centre of the i-th of ``sx``
        equal parts of [x0, x1) (``align_corners=False``; out-of-image samples repeat the border).
    """
    if x.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (B, C, X, Y) and boxes (B, N, 4), got {tuple(x.shape)} and "
                         f"{tuple(boxes.shape)}")
    _, c, nx, ny = x.shape
    n = boxes.shape[1]
    sx, sy = (int(s) for s in size)
    u = (torch.arange(sx, device=x.device, dtype=x.dtype) * 2 + 1) / sx - 1  # output centres in [-1, 1]
    v = (torch.arange(sy, device=x.device, dtype=x.dtype) * 2 + 1) / sy - 1
    x0, y0, x1, y1 = (boxes[..., i].unsqueeze(-1) for i in range(4))  # (B, N, 1)
    gx = (x0 + x1) / nx - 1 + (x1 - x0) / nx * u  # (B, N, sx): normalised coordinates along X
    gy = (y0 + y1) / ny - 1 + (y1 - y0) / ny * v  # (B, N, sy)
    # grid_sample: grid[..., 0] indexes the last input dim (Y), grid[..., 1] the one before (X)
    grid = torch.stack([gy.unsqueeze(2).expand(-1, -1, sx, -1), gx.unsqueeze(3).expand(-1, -1, -1, sy)], -1)
    src = x.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(-1, c, nx, ny)
    return F.grid_sample(src, grid.reshape(-1, sx, sy, 2), mode="bilinear", padding_mode="border",
                         align_corners=False)
