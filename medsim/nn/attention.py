"""Attention modules and the one factory that builds them (timm's ``create_attn`` is the model).

One contract: ``Module(in_channels, spatial_dims=2, **kw)``, ``forward(x) -> (features, attention)`` with
``features`` the same shape as ``x`` (B, C, *spatial) and ``attention`` (B, 1, *spatial) in [0, 1] — channels first,
2-D or 3-D. Every module is registered once in :data:`ATTENTIONS`; ``create_attention(name, in_channels,
spatial_dims, **kw)`` builds one and answers "did you mean" for typos (MONAI ``look_up_option``).

==================  ==================================================================================================
name                module
==================  ==================================================================================================
``dsl``             :class:`DSLAttention` — DSL's sigmoid conv-stack map (Adiga Vasudeva et al., MIDL 2022)
``none``            :class:`NoAttention` — features unchanged, a map of ones
``fan_gated``       :class:`~medsim.nn.fine_grained_attention.GatedAttention` — Fan et al.'s gated module (MICCAI '20)
``se``, ``spatial``, ``channel``, ``dual``, ``gc``   the other modules of Fan et al.'s Table 2
                    (:mod:`medsim.nn.fine_grained_attention`)
``mil_attention``   :class:`~medsim.nn.mil_attention.MILAttention` — Ilse et al.'s attention MIL pooling (Eq. 8)
``mil_gated``       :class:`~medsim.nn.mil_attention.MILGatedAttention` — Ilse et al.'s gated MIL pooling (Eq. 9)
==================  ==================================================================================================

Old names stay accepted (:data:`ATTENTION_ALIASES`): ``gated`` is Fan et al.'s module (what it meant for
``FineGrainedMIL(attention=...)``); for ``LossAttentionNet(pooling=...)`` the old ``gated`` / ``attention`` name the
MIL poolings (:data:`medsim.nn.loss_attention.POOLINGS`).
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from monai.utils import look_up_option
from torch import nn

from medsim.nn.base import check_batch
from medsim.nn.fine_grained_attention import (ChannelAttention, DualAttention, GatedAttention, GlobalContextAttention,
                                              PositionAttention, SEAttention)
from medsim.nn.mil_attention import MILAttention, MILGatedAttention

__all__ = ["DSLAttention", "NoAttention", "ATTENTIONS", "ATTENTION_ALIASES", "create_attention"]


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
        check_batch(x, self.spatial_dims)
        a = torch.sigmoid(self.net(x))
        return x * a, a


class NoAttention(nn.Module):
    """No attention (the one ``none`` module): features unchanged and a uniform map of ones. A model that reads
    its map out of the features (FineGrainedMIL's Ω) gets the channel mean of the trunk features from it.

    Shapes: x (B, C, *S) -> x, ones (B, 1, *S)."""

    def __init__(self, in_channels: int = 0, spatial_dims: int = 2, **_: object):
        super().__init__()
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, self.spatial_dims)
        return x, torch.ones_like(x[:, :1])


ATTENTIONS: dict[str, type[nn.Module]] = {
    "dsl": DSLAttention, "none": NoAttention,
    "fan_gated": GatedAttention, "se": SEAttention, "spatial": PositionAttention, "channel": ChannelAttention,
    "dual": DualAttention, "gc": GlobalContextAttention,
    "mil_attention": MILAttention, "mil_gated": MILGatedAttention}

#: old names still accepted by :func:`create_attention` (bundle configs and run.json records use them)
ATTENTION_ALIASES: dict[str, str] = {"gated": "fan_gated"}


def create_attention(name: str, in_channels: int, spatial_dims: int = 2, **kwargs: object) -> nn.Module:
    """Build the attention module registered as ``name`` in :data:`ATTENTIONS` (or an old name in
    :data:`ATTENTION_ALIASES`); an unknown name raises ``ValueError`` with "did you mean"."""
    name = ATTENTION_ALIASES.get(name, name)
    return look_up_option(name, ATTENTIONS)(in_channels, spatial_dims=spatial_dims, **kwargs)
