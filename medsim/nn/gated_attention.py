"""Old import path of Fan et al.'s gated attention pipeline (MICCAI 2020), kept because run.json records and bundle
configs name ``medsim.nn.gated_attention.FineGrainedMIL``. The code now lives by job:

- :mod:`medsim.nn.fine_grained_attention` — the gated module and the other attention modules of Table 2
- :mod:`medsim.nn.attention` — the one registry / factory (:func:`~medsim.nn.attention.create_attention`)
- :mod:`medsim.nn.instance_crops` — connected components, instance boxes and crops
- :mod:`medsim.nn.fine_grained_mil` — :class:`FineGrainedMIL`
- :mod:`medsim.nn.tiling` — :func:`tile_predictions` over large images
"""

from __future__ import annotations

from typing import Any

from monai.utils import look_up_option
from torch import nn

from medsim.nn.attention import ATTENTION_ALIASES, ATTENTIONS, create_attention
from medsim.nn.fine_grained_attention import (ChannelAttention, DualAttention, GatedAttention, GlobalContextAttention,
                                              PositionAttention, SEAttention, channel_mean_map, minmax_normalize)
from medsim.nn.fine_grained_mil import INSTANCE_POOLS, FineGrainedMIL
from medsim.nn.instance_crops import crop_boxes, label_components, largest_components
from medsim.nn.tiling import tile_predictions

__all__ = ["GatedAttention", "SEAttention", "PositionAttention", "ChannelAttention", "DualAttention",
           "GlobalContextAttention", "FINE_GRAINED_ATTENTIONS", "create_fine_grained_attention",
           "minmax_normalize", "channel_mean_map", "label_components", "largest_components", "crop_boxes",
           "FineGrainedMIL", "INSTANCE_POOLS", "tile_predictions"]

#: the names ``FineGrainedMIL(attention=...)`` took before the one registry (a view of
#: :data:`medsim.nn.attention.ATTENTIONS`: ``gated`` is ``fan_gated``, ``none`` the one ``NoAttention``)
FINE_GRAINED_ATTENTIONS: dict[str, type[nn.Module]] = {
    n: ATTENTIONS[ATTENTION_ALIASES.get(n, n)] for n in ("gated", "se", "spatial", "channel", "dual", "gc", "none")}


def create_fine_grained_attention(name: str, in_channels: int, spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """Old factory: a name of :data:`FINE_GRAINED_ATTENTIONS` ("did you mean" on typos) built by
    :func:`medsim.nn.attention.create_attention`."""
    look_up_option(name, FINE_GRAINED_ATTENTIONS)  # "did you mean" among the old names
    return create_attention(name, in_channels, spatial_dims=spatial_dims, **kwargs)
