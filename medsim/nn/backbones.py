"""Backbones from ``monai.networks.nets`` cut at a chosen stage (no torchvision, no downloads)."""

from __future__ import annotations

from monai.networks import nets
from monai.utils import look_up_option
from torch import nn

__all__ = ["RESNETS", "CUTS", "make_backbone"]

RESNETS = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34,
           "resnet50": nets.resnet50}
CUTS = ("layer1", "layer2", "layer3", "layer4")


def make_backbone(name: str = "resnet18", *, spatial_dims: int = 2, in_channels: int = 3, cut: str = "layer3",
                  widen_factor: float = 1.0, conv1_t_stride: int = 2) -> tuple[nn.Module, int]:
    """A MONAI ResNet trunk ending after ``cut``: returns (module, out_channels).

    DSL's reference uses ResNet-50 cut after layer3 (feature maps at 1/16 of the input). MONAI's ResNet defaults
    to a stride-1 stem (4× the usual compute); ``conv1_t_stride=2`` gives the usual stem.

    Shapes: (B, in_channels, *S) -> (B, out_channels, *S / 2^(stage+1)).
    """
    builder = look_up_option(name, RESNETS)
    cut = look_up_option(cut, CUTS)
    net = builder(spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_stride=conv1_t_stride,
                  widen_factor=widen_factor, feed_forward=False, pretrained=False)
    stages = ["conv1", "bn1", "act", "maxpool", *CUTS[: CUTS.index(cut) + 1]]
    trunk = nn.Sequential(*(getattr(net, s) for s in stages))
    last = getattr(net, cut)[-1]
    out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    return trunk, int(out_channels)
