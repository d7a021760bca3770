"""The attention modules of Fan et al.'s Table 2 ("Microscopic fine-grained instance classification through deep
attention", MICCAI 2020): their gated module and the modules it is compared with.

They follow medsim's attention contract (:mod:`medsim.nn.attention`, which registers them): ``Module(in_channels,
spatial_dims=2, **kw)``, ``forward(x) -> (features, attention)`` with ``features`` shaped like ``x`` (B, C, *s) and
``attention`` (B, 1, *s) in [0, 1]. For every module here the map is the same function of its output features,

    Ω = (1/C) Σ_k features_k          (Eq. 2 of the paper for the gated module, whose features are X_k ⊙ gate_k)

scaled to [0, 1] per image by min–max (:func:`minmax_normalize`; a constant map becomes 0), so Table 2's
comparison changes only how the features are re-weighted, not how the map is read out. The raw Ω is what
:func:`channel_mean_map` returns; :class:`~medsim.nn.fine_grained_mil.FineGrainedMIL` reads Ω out of any module's
features this way (so with the ``none`` module its map is the channel mean of the trunk features).

=============  ===================================================================================================
registry name  module
=============  ===================================================================================================
``fan_gated``  :class:`GatedAttention` — the paper's module (Eq. 1–2); old name ``gated``
``se``         :class:`SEAttention` — squeeze-and-excitation (Hu et al., CVPR 2018; MONAI ``ChannelSELayer``)
``spatial``    :class:`PositionAttention` — non-local / position self-attention (Wang et al., CVPR 2018; the
               paper's "spatial attention [18]"; DANet's PAM has the same form)
``channel``    :class:`ChannelAttention` — channel self-attention on X Xᵀ (DANet CAM, Fu et al., CVPR 2019; stands
               in for the paper's "channel-wise attention [23]", the trilinear X Xᵀ attention of Zheng et al. 2019)
``dual``       :class:`DualAttention` — position + channel (DANet, Fu et al., CVPR 2019)
``gc``         :class:`GlobalContextAttention` — global context block (GCNet, Cao et al., arXiv:1904.11492, 2019)
=============  ===================================================================================================
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.layers.factories import Conv
from torch import nn

from medsim.nn.base import check_batch

__all__ = ["GatedAttention", "SEAttention", "PositionAttention", "ChannelAttention", "DualAttention",
           "GlobalContextAttention", "minmax_normalize", "channel_mean_map"]


def minmax_normalize(a: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image min–max scaling of a map (B, 1, *s) to [0, 1]: (a − min) / max(max − min, eps); a constant map
    becomes 0."""
    flat = a.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (a.ndim - 1)))
    hi = flat.amax(1).view(-1, *([1] * (a.ndim - 1)))
    return (a - lo) / (hi - lo).clamp_min(eps)


def channel_mean_map(features: torch.Tensor) -> torch.Tensor:
    """Ω = (1/C) Σ_k features_k: (B, C, *s) -> (B, 1, *s) (Eq. 2 when ``features`` = X ⊙ gate)."""
    return features.mean(1, keepdim=True)


class _MapFromFeatures(nn.Module):
    """Base: subclasses implement ``features(x)``; ``forward`` adds the normalised channel-mean map."""

    spatial_dims: int = 2

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(x, self.spatial_dims)
        f = self.features(x)
        return f, minmax_normalize(channel_mean_map(f))


class GatedAttention(_MapFromFeatures):
    """The gated attention module of Fan et al. (MICCAI 2020, Sec. 2.1).

    - Semantic map (Eq. 1): two dilated 3×3 conv blocks (conv–BN–ReLU, DeepLab-style, run in parallel on X for
      multi-scale context) → sum over all their output channels, M = Σ_k Wᵀ X_k → spatial softmax over all
      positions, S ∈ R^{h·w}, Σ S = 1.
    - Gates: g_k = ReLU(tanh(X_kᵀ S)): X_kᵀ S is the S-weighted mean of channel k (one number per channel: the
      1-D coefficient vector Xᵀ S ∈ R^{C×1}, not the C×C of channel self-attention).
    - Attention (Eq. 2): Ω = (1/C) Σ_k X_k ⊙ g_k, the gated average of the channels.

    Features returned: X ⊙ g (the confounding channels filtered out); attention: Ω min–max scaled per image.
    The paper leaves the dilation rates and block widths open; defaults suit the 1/16 feature maps of small
    inputs (6×6 for 96 px).

    Args:
        in_channels: C.
        spatial_dims: 2 or 3.
        dilation: dilation of each of the two blocks.
        hidden: output channels of each block (default max(8, C // 4)).

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s); :meth:`maps` gives S, g and raw Ω.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2, dilation: Sequence[int] = (2, 3),
                 hidden: int | None = None):
        super().__init__()
        dilation = tuple(int(d) for d in dilation)
        if len(dilation) != 2 or min(dilation) < 1:
            raise ValueError(f"dilation must be two positive rates (one per block), got dilation={dilation}")
        hidden = hidden or max(8, in_channels // 4)
        self.blocks = nn.ModuleList(
            Convolution(spatial_dims, in_channels, hidden, kernel_size=3, dilation=d, padding=d, act="RELU",
                        norm="BATCH") for d in dilation)
        self.spatial_dims = spatial_dims

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"semantic": S (B, 1, *s), "gate": g (B, C), "omega": Ω (B, 1, *s), "features": X ⊙ g}``."""
        check_batch(x, self.spatial_dims)
        m = sum(block(x).sum(1, keepdim=True) for block in self.blocks)  # M = Σ_k Wᵀ X_k, (B, 1, *s)
        s = torch.softmax(m.flatten(1), dim=1)  # Eq. 1: softmax over all h·w positions
        gate = torch.relu(torch.tanh(torch.einsum("bcp,bp->bc", x.flatten(2), s)))  # ReLU(tanh(Xᵀ S))
        feats = x * gate.view(*gate.shape, *([1] * self.spatial_dims))
        return {"semantic": s.view_as(m), "gate": gate, "omega": channel_mean_map(feats), "features": feats}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps(x)["features"]


class SEAttention(_MapFromFeatures):
    """Squeeze-and-excitation (Hu, Shen, Sun, CVPR 2018; Table 2 "Squeeze-Excitation attention [9]"): channel
    weights from global average pooling → FC (C/r) → ReLU → FC → sigmoid, via MONAI's ``ChannelSELayer``.

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, reduction: int = 4):
        super().__init__()
        self.se = ChannelSELayer(spatial_dims, in_channels, r=reduction)
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(x)


class PositionAttention(_MapFromFeatures):
    """Position (spatial) self-attention: the embedded-Gaussian non-local block (Wang, Girshick, Gupta, He,
    CVPR 2018; Table 2 "Spatial attention [18]"), in DANet's form (PAM, Fu et al. 2019): y_i = Σ_j softmax_j(
    θ(x_i)ᵀ φ(x_j)) g(x_j), out = x + γ·y with γ learnable and 0 at the start (the block begins as identity).

    Args:
        reduction: θ and φ embed to C // reduction channels (8 in DANet, 2 in the non-local paper).

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, reduction: int = 8):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        inner = max(1, in_channels // reduction)
        self.theta, self.phi = conv(in_channels, inner, 1), conv(in_channels, inner, 1)
        self.g = conv(in_channels, in_channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.theta(x).flatten(2), self.phi(x).flatten(2), self.g(x).flatten(2)
        att = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, P, P): row i attends over positions j
        return x + self.gamma * (v @ att.transpose(1, 2)).view_as(x)


class ChannelAttention(_MapFromFeatures):
    """Channel self-attention (DANet CAM, Fu et al., CVPR 2019): A = softmax(max(XXᵀ) − XXᵀ) over channels
    (C×C), out = x + γ·(A X), γ learnable and 0 at the start. Table 2's "channel-wise attention [23]" (Zheng et
    al. 2019) is also built on the C×C matrix XXᵀ that the gated module replaces by the C×1 vector XᵀS.

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s)."""

    def __init__(self, in_channels: int = 0, spatial_dims: int = 2):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(2)
        energy = f @ f.transpose(1, 2)  # (B, C, C)
        att = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
        return x + self.gamma * (att @ f).view_as(x)


class DualAttention(_MapFromFeatures):
    """Dual attention (DANet, Fu et al., CVPR 2019; Table 2 "Dual attention [6]"): the mean of the position
    (:class:`PositionAttention`) and channel (:class:`ChannelAttention`) branches, each with its own residual.

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, reduction: int = 8):
        super().__init__()
        self.position = PositionAttention(in_channels, spatial_dims, reduction=reduction)
        self.channel = ChannelAttention(in_channels, spatial_dims)
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.position.features(x) + self.channel.features(x))


class GlobalContextAttention(_MapFromFeatures):
    """Global context block (GCNet, Cao, Xu, Lin, Wei, Hu, arXiv:1904.11492; Table 2 "Global Context attention
    [3]"): context = Σ_j softmax_j(W_k x_j) x_j (one query-independent spatial softmax), transform = 1×1 conv to
    C/r → LayerNorm → ReLU → 1×1 conv to C (last conv zero-initialised), fusion by addition: out = x + transform.

    Shapes: x (B, C, *s) -> features (B, C, *s), attention (B, 1, *s)."""

    def __init__(self, in_channels: int, spatial_dims: int = 2, reduction: int = 4):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        inner = max(1, in_channels // reduction)
        self.key = conv(in_channels, 1, 1)
        self.transform = nn.Sequential(conv(in_channels, inner, 1), nn.LayerNorm([inner] + [1] * spatial_dims),
                                       nn.ReLU(inplace=True), conv(inner, in_channels, 1))
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.key(x).flatten(1), dim=1)  # (B, P)
        context = torch.einsum("bcp,bp->bc", x.flatten(2), w).view(*x.shape[:2], *([1] * self.spatial_dims))
        return x + self.transform(context)
