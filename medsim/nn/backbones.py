"""Backbones from ``monai.networks.nets`` cut at a chosen stage (no torchvision, no downloads).

A trunk may start from local weights (``make_backbone(..., weights=path)``): a ``state_dict`` of the MONAI ResNet
(``conv1.weight``, ``layer1.0.conv1.weight``, … — e.g. from self-supervised pretraining), or of the trunk itself
(``0.weight``, ``4.0.conv1.weight``, …), read weights-only (:func:`medsim.files.load_torch_file`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from monai.networks import nets
from monai.utils import look_up_option
from torch import nn

from medsim.errors import MedsimError
from medsim.files import load_torch_file

__all__ = ["RESNETS", "CUTS", "STAGES", "make_backbone"]

RESNETS = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34,
           "resnet50": nets.resnet50}
CUTS = ("layer1", "layer2", "layer3", "layer4")
#: the MONAI ResNet's modules in forward order; a trunk cut after ``layerN`` is ``nn.Sequential`` of those up to it
STAGES = ("conv1", "bn1", "act", "maxpool", *CUTS)


def make_backbone(name: str = "resnet18", *, spatial_dims: int = 2, in_channels: int = 3, cut: str = "layer3",
                  widen_factor: float = 1.0, conv1_t_stride: int = 2,
                  weights: str | os.PathLike | None = None) -> tuple[nn.Module, int]:
    """A MONAI ResNet trunk ending after ``cut``: returns (module, out_channels).

    DSL's reference uses ResNet-50 cut after layer3 (feature maps at 1/16 of the input). MONAI's ResNet defaults
    to a stride-1 stem (4× the usual compute); ``conv1_t_stride=2`` gives the usual stem.

    Args:
        weights: a local ``torch.save``'d state_dict to start from (nothing is ever downloaded), read weights-only.
            Its keys are the MONAI ResNet's own (``conv1.weight``, ``layer1.0.bn1.running_mean``, …) or the trunk's
            (``0.weight``, ``4.0.bn1.running_mean``, …). Every tensor of the trunk must be there with its shape
            (``num_batches_tracked`` may be absent); stages after ``cut`` (``layer4``, ``fc``) are ignored.

    Shapes: (B, in_channels, *S) -> (B, out_channels, *S / 2^(stage+1)).

    Raises:
        MedsimError: ``weights`` is missing, not weights-only, not a state_dict, or does not fit this trunk (the
            message names the file and the missing, mismatched and unknown keys).
    """
    builder = look_up_option(name, RESNETS)
    cut = look_up_option(cut, CUTS)
    net = builder(spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_stride=conv1_t_stride,
                  widen_factor=widen_factor, feed_forward=False, pretrained=False)
    stages = STAGES[: STAGES.index(cut) + 1]
    trunk = nn.Sequential(*(getattr(net, s) for s in stages))
    last = getattr(net, cut)[-1]
    out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
    if weights is not None:
        fits = (f"{name} (spatial_dims={spatial_dims}, in_channels={in_channels}, cut={cut}, "
                f"widen_factor={widen_factor})")
        _load_trunk_weights(trunk, stages, weights, fits)
    return trunk, int(out_channels)


def _listed(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" … and {len(keys) - n} more" if len(keys) > n else "")


def _load_trunk_weights(trunk: nn.Sequential, stages: tuple[str, ...], path: str | os.PathLike, fits: str) -> None:
    """Load the state_dict in ``path`` (ResNet or trunk keys) into ``trunk`` (the ResNet's ``stages``), strictly."""
    state: Any = load_torch_file(path, what="backbone weights file")
    if not isinstance(state, Mapping):
        raise MedsimError(f"{path}: a backbone weights file holds the ResNet's state_dict (a dict of tensors), got a "
                          f"{type(state).__name__}")
    resnet_name = {str(i): s for i, s in enumerate(stages)}  # trunk index -> ResNet name, for messages

    def readable(key: str) -> str:
        head, _, rest = key.partition(".")
        return f"{resnet_name[head]}.{rest}" if head in resnet_name else key

    found: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state.items():
        head, _, rest = str(key).partition(".")
        if head in stages:
            found[f"{stages.index(head)}.{rest}"] = value
        elif head.isdigit() and int(head) < len(stages):
            found[str(key)] = value
        elif head not in (*STAGES, "fc") and not head.isdigit():  # stages after the cut are not this trunk's
            unknown.append(str(key))
    own = trunk.state_dict()
    missing = [readable(k) for k in own if k not in found and not k.endswith("num_batches_tracked")]
    wrong = [f"{readable(k)} {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__} vs "
             f"{tuple(own[k].shape)}" for k, v in found.items()
             if k in own and not (torch.is_tensor(v) and v.shape == own[k].shape)]
    unknown += [readable(k) for k in found if k not in own]
    if missing or wrong or unknown:
        problems = [f"{len(missing)} missing ({_listed(missing)})" if missing else "",
                    f"{len(wrong)} of another shape, file vs trunk ({_listed(wrong, 3)})" if wrong else "",
                    f"{len(unknown)} unknown ({_listed(unknown)})" if unknown else ""]
        prefixes = sorted({k.split(".", 1)[0] + "." for k in unknown if "." in k and k.split(".", 1)[1].partition(
            ".")[0] in STAGES})
        hint = (f"; its keys carry the prefix {prefixes[0]!r}: save the ResNet's own state_dict"
                if len(prefixes) == 1 else "; build the backbone as it was when the file was saved")
        raise MedsimError(f"{path}: backbone weights do not fit {fits}: "
                          + "; ".join(p for p in problems if p) + hint)
    trunk.load_state_dict({k: v for k, v in found.items() if k in own}, strict=False)
