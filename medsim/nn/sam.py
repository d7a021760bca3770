"""SAM's network: a 3-D ResNet with a feature pyramid giving a global (coarse) and a local (fine) pixel-wise
anatomical embedding.

Yan et al., "SAM: Self-supervised learning of pixel-wise anatomical embeddings in radiological images", IEEE TMI
2022 (arXiv:2012.02383): a 3-D ResNet-18 with a feature pyramid; the coarsest pyramid level gives the *global*
embedding (which part of the body a voxel is in), the finest the *local* one (the exact point); both are L2-normalised
per voxel, so the dot product of two voxels' embeddings is their cosine similarity. A landmark in one scan is found
in another as the voxel of highest similarity.

On medsim's Embedder contract (:class:`~medsim.nn.base.EmbedderBase`)::

    out = SAMNet(...)(x)           # x (B, C, X, Y, Z)
    out["global"]                  # (B, Dg, *Sg) per-voxel global embedding, L2-normalised over channels
    out["local"]                   # (B, Dl, *Sl) per-voxel local embedding, L2-normalised over channels
    out["embedding"]               # (B, Dg) the global map averaged over space, L2-normalised (case retrieval)
    out["attention"]               # (B, 1, *Sl) in [0, 1]: (1 - cos(local voxel, the crop's mean local)) / 2,
                                   # how unlike the crop's average anatomy each local cell is (its distinctiveness)
    model.map_geometry("local", input_size)   # where each cell of a map sits on the input (strides, centres)

With the usual stem (``conv1_t_stride=2``, max-pool) the ResNet's ``layer1..layer4`` are at strides 4, 8, 16, 32;
the default levels (local ``layer1``, global ``layer3``) give a local map at stride 4 and a global map at stride 16;
``conv1_t_stride=1`` halves both (2 and 8), for small crops.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import FeaturePyramidNetwork
from monai.utils import look_up_option
from torch import nn

from medsim.nn.backbones import CUTS, make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.geometry import AttentionGeometry, trace_geometry

__all__ = ["SAMNet", "SAM_MAPS"]

#: the dense outputs of :class:`SAMNet`
SAM_MAPS = ("global", "local")
_STEM = 4  # conv1, bn1, act, maxpool: the trunk's modules before layer1


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return int((last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels)


class SAMNet(EmbedderBase):
    """Global + local pixel-wise anatomical embeddings (SAM, Yan et al. TMI 2022) on a MONAI 3-D ResNet with
    MONAI's ``FeaturePyramidNetwork``.

    Args:
        backbone: ``monai.networks.nets`` ResNet name (``resnet10/18/34/50``; SAM uses ResNet-18).
        in_channels: input channels (1 for CT / MR).
        global_dim: Dg, channels of the global embedding (and of ``embedding``).
        local_dim: Dl, channels of the local embedding.
        fpn_channels: channels of the feature pyramid (default: the global level's backbone channels).
        local_level, global_level: the ResNet stages whose pyramid outputs give the local and the global map
            (``layer1`` ... ``layer4``, local before global).
        widen_factor: backbone width multiplier.
        conv1_t_stride: stride of the ResNet's first convolution (2: the usual stem; 1: maps twice as fine).
        return_features: also return ``features``, the global level's backbone output (B, F, *Sg).
        backbone_weights: a local state_dict file the ResNet starts from (initialisation only; not recorded into a
            rebuilt network, :attr:`init_only_args`).

    Shapes: x (B, in_channels, X, Y, Z) -> global (B, Dg, X/sg, Y/sg, Z/sg), local (B, Dl, X/sl, ...),
    embedding (B, Dg), attention (B, 1, *Sl) (sizes rounded as the strided convolutions round them; see
    :meth:`map_geometry`).
    """

    trunk_key = "backbone"
    init_only_args = ("backbone_weights",)

    def __init__(self, backbone: str = "resnet18", *, in_channels: int = 1, global_dim: int = 128,
                 local_dim: int = 128, fpn_channels: int | None = None, local_level: str = "layer1",
                 global_level: str = "layer3", widen_factor: float = 1.0, conv1_t_stride: int = 2,
                 return_features: bool = False, backbone_weights: str | os.PathLike | None = None):
        super().__init__(return_features=return_features)
        local_level, global_level = look_up_option(local_level, CUTS), look_up_option(global_level, CUTS)
        lo, hi = CUTS.index(local_level), CUTS.index(global_level)
        if lo >= hi:
            raise ValueError(f"the local level must come before the global level, got local_level={local_level!r} "
                             f"global_level={global_level!r}")
        self.backbone, channels = make_backbone(backbone, spatial_dims=3, in_channels=in_channels, cut=global_level,
                                                widen_factor=widen_factor, conv1_t_stride=conv1_t_stride,
                                                weights=backbone_weights)
        self.levels = list(CUTS[lo: hi + 1])
        level_channels = [_out_channels(self.backbone[_STEM + CUTS.index(n)]) for n in self.levels]
        fpn_channels = int(fpn_channels or channels)
        self.fpn = FeaturePyramidNetwork(3, level_channels, fpn_channels)
        self.global_head = nn.Conv3d(fpn_channels, global_dim, kernel_size=1)
        self.local_head = nn.Conv3d(fpn_channels, local_dim, kernel_size=1)
        self.spatial_dims, self.in_channels = 3, in_channels
        self.embedding_dim, self.global_dim, self.local_dim = global_dim, global_dim, local_dim
        self._first = _STEM + lo  # index in the trunk of the local level

    def compute(self, x: torch.Tensor) -> EmbedderOutput:
        h = self.backbone[: self._first](x)
        pyramid: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage in zip(self.levels, self.backbone[self._first:]):
            h = stage(h)
            pyramid[name] = h
        fpn = list(self.fpn(pyramid).values())  # finest first
        glob = F.normalize(self.global_head(fpn[-1]), dim=1)
        loc = F.normalize(self.local_head(fpn[0]), dim=1)
        embedding = F.normalize(glob.flatten(2).mean(-1), dim=1)
        mean_local = F.normalize(loc.flatten(2).mean(-1), dim=1)
        attention = (1 - torch.einsum("bc...,bc->b...", loc, mean_local)).unsqueeze(1) / 2
        out: EmbedderOutput = {"embedding": embedding, "attention": attention.clamp(0, 1),
                               "global": glob, "local": loc}  # type: ignore[typeddict-unknown-key]
        return self.add_features(out, h)

    def map_geometry(self, name: str, input_size: Sequence[int]) -> AttentionGeometry:
        """Where the cells of the ``"global"`` or ``"local"`` map sit on an input of spatial ``input_size``
        (x, y, z): traced through the ResNet stages up to the map's level (:mod:`medsim.nn.geometry`). The pyramid's
        1x1 / 3x3 "same" convolutions and heads keep that grid; its nearest-neighbour top-down path adds coarser
        context (not counted in the receptive field).

        In voxel-index coordinates (voxel k centred at k) cell ``i`` of an axis is centred at
        ``axis.centre - 0.5 + axis.stride * i``."""
        level = self.levels[-1] if look_up_option(name, SAM_MAPS) == "global" else self.levels[0]
        return trace_geometry(input_size, self.backbone[: _STEM + CUTS.index(level) + 1])

    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:
        """The ``attention`` map is on the local map's grid (:meth:`map_geometry`)."""
        return self.map_geometry("local", input_size)
