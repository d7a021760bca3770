"""Attention modules. One contract: ``Module(in_channels, spatial_dims=2, **kw)``, ``forward(x) -> (features,
attention)`` with ``features`` the same shape as ``x`` (B, C, *spatial) and ``attention`` (B, 1, *spatial) in [0, 1].

``create_attention(name, ...)`` builds one from :data:`ATTENTIONS` and answers "did you mean" for typos.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from monai.utils import look_up_option
from torch import nn

__all__ = ["DSLAttention", "NoAttention", "ATTENTIONS", "create_attention"]


class DSLAttention(nn.Module):
    """Spatial attention of Dynamic Subspace Learners (Adiga Vasudeva et al., MIDL 2022, "Dynamic Subspace
    Learners with attention"): a small conv stack ending in a sigmoid gives one map A(x) ∈ [0, 1]^(h×w[×d]) that
    is multiplied element-wise into every feature map before global average pooling.

    Args:
        in_channels: C of the backbone feature maps.
        spatial_dims: 2 or 3.
        hidden: channels of the hidden conv layers (default C // 4, at least 8).
        n_layers: number of conv layers (the authors use 3: two 3×3 with ReLU, one 1×1 to a single map).

    Shapes: x (B, C, *S) -> features (B, C, *S), attention (B, 1, *S).
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, hidden: int | None = None, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got n_layers={n_layers}")
        conv = Conv[Conv.CONV, spatial_dims]
        hidden = hidden or max(8, in_channels // 4)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(n_layers - 1):
            layers += [conv(c, hidden, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = hidden
        layers.append(conv(c, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}-D (B, C, *spatial) batch, got shape {tuple(x.shape)}")
        a = torch.sigmoid(self.net(x))
        return x * a, a


class NoAttention(nn.Module):
    """Identity features and a uniform attention map of ones (for baselines without attention)."""

    def __init__(self, in_channels: int = 0, spatial_dims: int = 2, **_: object):
        super().__init__()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.ones_like(x[:, :1])


ATTENTIONS: dict[str, type[nn.Module]] = {"dsl": DSLAttention, "none": NoAttention}


def create_attention(name: str, in_channels: int, spatial_dims: int = 2, **kwargs: object) -> nn.Module:
    """Build the attention module registered as ``name`` (see :data:`ATTENTIONS`)."""
    return look_up_option(name, ATTENTIONS)(in_channels, spatial_dims=spatial_dims, **kwargs)
