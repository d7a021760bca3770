"""A 3-D segmentation network whose encoder is medsim's MONAI ResNet trunk, so self-supervised weights load into it.

PGL (Xie et al., "PGL: Prior-Guided Local Self-supervised Learning for 3D Medical Image Segmentation", arXiv:2011.12640,
2020) pretrains an encoder and fine-tunes it inside a U-Net-shaped segmentation network. Here the encoder is the
very module a pretraining run trains, :func:`medsim.nn.backbones.make_backbone`'s ResNet trunk (``conv1, bn1, act,
maxpool, layer1 … cut``, state_dict keys ``0.weight``, ``4.0.conv1.weight`` …, any ``widen_factor``), and the
decoder is MONAI's own: ``monai.networks.nets.flexible_unet.UNetDecoder`` + ``SegmentationHead``, FlexibleUNet's decoder.

Why not MONAI's ``FlexibleUNet(backbone="resnet18")`` itself: its ResNet encoder has a fixed width (64…512 channels,
no ``widen_factor``), too heavy for the CPU budgets medsim trains on and not the trunk the SSL bundles pretrain; and
MONAI's UNet / SegResNet have encoders of their own layout, into which a ResNet's weights do not load. Reusing
FlexibleUNet's decoder over medsim's trunk keeps the pretrained tensors exactly (the trunk's state_dict keys are the
pretraining encoder's).

Skip features (FlexibleUNet's contract, each level half the previous resolution): the input, the stem after its
activation (stride 2), ``layer1`` after the max-pool (stride 4), ``layer2`` (8), ``layer3`` (16) [, ``layer4`` (32)].

Shapes: x (B, in_channels, X, Y, Z) with X, Y, Z multiples of the deepest stride (:attr:`ResNetUNet.stride`: 16 for
``cut="layer3"``) -> logits (B, out_channels, X, Y, Z).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from monai.utils import look_up_option
from torch import nn

from medsim.nn.backbones import CUTS, STAGES, make_backbone

__all__ = ["ResNetUNet"]

#: trunk indices whose outputs are the skip features (after ``act``, then every ResNet stage)
_SKIPS = (STAGES.index("act"), *(STAGES.index(c) for c in CUTS))


def _out_channels(module: nn.Module) -> int:
    """Channels a trunk prefix outputs: its last convolution's (a ResNet block's shortcut has the same width)."""
    return int([m for m in module.modules() if isinstance(m, nn.Conv3d)][-1].out_channels)


class ResNetUNet(nn.Module):
    """MONAI ResNet trunk (the SSL bundles' encoder) + MONAI FlexibleUNet decoder and segmentation head.

    Args:
        backbone: ``resnet10/18/34/50`` (``monai.networks.nets``).
        in_channels: input channels (1 for CT / MR).
        out_channels: classes, background included.
        cut: the deepest ResNet stage used (``layer1`` … ``layer4``): the same as the pretraining encoder's.
        widen_factor: the trunk's width multiplier (the same as the pretraining encoder's).
        decoder_channels: one width per decoder stage, deepest first; as FlexibleUNet, the first ``n`` are used
            (``n`` = number of skip levels: 3 + the index of ``cut``).
        backbone_weights: a local state_dict of the trunk or of the MONAI ResNet (e.g. a pretraining run's encoder
            trunk) to start from, checked strictly (:func:`make_backbone`).

    Attributes:
        backbone: the trunk (``nn.Sequential``); :attr:`trunk` reads it (the name :func:`medsim.engines.pretrained.
            load_pretrained` copies into).
    """

    def __init__(self, backbone: str = "resnet18", *, in_channels: int = 1, out_channels: int = 2,
                 cut: str = "layer3", widen_factor: float = 1.0,
                 decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
                 backbone_weights: str | os.PathLike | None = None):
        super().__init__()
        cut = look_up_option(cut, CUTS)
        self.backbone, _ = make_backbone(backbone, spatial_dims=3, in_channels=in_channels, cut=cut,
                                         widen_factor=widen_factor, conv1_t_stride=2, weights=backbone_weights)
        self._skips = _SKIPS[: 2 + CUTS.index(cut)]
        chans = [int(in_channels)] + [_out_channels(self.backbone[: i + 1]) for i in self._skips]
        n = len(chans) - 1
        if len(decoder_channels) < n:
            raise ValueError(f"decoder_channels needs {n} widths for cut={cut!r}, got {list(decoder_channels)}")
        dec = [int(c) for c in decoder_channels[:n]]
        self.decoder = UNetDecoder(spatial_dims=3, encoder_channels=chans, decoder_channels=dec,
                                   act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
                                   dropout=0.0, bias=False, upsample="nontrainable", pre_conv="default",
                                   interp_mode="trilinear", align_corners=None, is_pad=True)
        self.head = SegmentationHead(spatial_dims=3, in_channels=dec[-1], out_channels=out_channels, kernel_size=3)
        self.in_channels, self.out_channels, self.n_skips = int(in_channels), int(out_channels), n - 1
        self.stride = 2 ** n  #: the deepest level's stride: spatial sizes must be its multiples

    @property
    def trunk(self) -> nn.Module:
        """The ResNet trunk (the pretrained part)."""
        return self.backbone

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [x], x
        for i, stage in enumerate(self.backbone):
            h = stage(h)
            if i in self._skips:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, X, Y, Z) batch, got shape {tuple(x.shape)}")
        if any(n % self.stride for n in x.shape[2:]):
            raise ValueError(f"spatial sizes must be multiples of the deepest stride {self.stride}, got "
                             f"{tuple(x.shape[2:])} (pad the volume, or infer with sliding windows of such a size)")
        return self.head(self.decoder(self._features(x), self.n_skips))
