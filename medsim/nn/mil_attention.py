"""Attention-based multiple-instance pooling (Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance
Learning", ICML 2018), on medsim's attention contract: every cell of a (B, C, *s) feature map is an instance.

``Module(in_channels, spatial_dims=2, hidden=128)``, ``forward(x) -> (features, attention)``: ``features`` is
``x`` unchanged and ``attention`` (B, 1, *s) holds the instance weights, ≥ 0 and summing to 1 over the cells of
each image (a softmax over all positions), so ``Σ_cells attention · features`` is the bag representation.
Registered in :mod:`medsim.nn.attention` as ``mil_attention`` and ``mil_gated`` (loss-based attention's
``pooling="attention"`` / ``"gated"``).
"""

from __future__ import annotations

import torch
from torch import nn

from medsim.nn.base import check_batch

__all__ = ["MILAttention", "MILGatedAttention"]


class MILAttention(nn.Module):
    """Attention MIL pooling (Ilse et al. 2018, Eq. 8): ``a_k = softmax_k(wᵀ tanh(V h_k))`` over the cells k.

    Shapes: x (B, C, *s) -> features x, attention (B, 1, *s) summing to 1 per image."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, hidden: int = 128):
        super().__init__()
        self.V = nn.Linear(in_channels, hidden)
        self.w = nn.Linear(hidden, 1)
        self.spatial_dims = spatial_dims

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Instance scores before the softmax: h (B, M, C) -> (B, M)."""
        return self.w(torch.tanh(self.V(h))).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, self.spatial_dims)
        weights = torch.softmax(self.scores(x.flatten(2).transpose(1, 2)), dim=1)  # (B, M)
        return x, weights.view(x.shape[0], 1, *x.shape[2:])


class MILGatedAttention(MILAttention):
    """Gated attention MIL pooling (Ilse et al. 2018, Eq. 9): ``a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigm(U h_k)))``.

    Shapes: x (B, C, *s) -> features x, attention (B, 1, *s) summing to 1 per image."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, hidden: int = 128):
        nn.Module.__init__(self)  # V, U, w in this order: the state_dict of the original pooling module
        self.V = nn.Linear(in_channels, hidden)
        self.U = nn.Linear(in_channels, hidden)
        self.w = nn.Linear(hidden, 1)
        self.spatial_dims = spatial_dims

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
