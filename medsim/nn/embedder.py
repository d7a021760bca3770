"""The Embedder: backbone → attention → global average pooling → linear embedding (→ logits).

Every medsim model returns the same structure (export, retrieval, localization and MONAI Label rely on it)::

    {"embedding": (B, D) L2-normalised, "attention": (B, 1, *S_feat) in [0, 1], "logits": (B, n_classes)?,
     "features": (B, F, *S_feat) the backbone's output, with return_features=True}
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsim.nn.attention import create_attention
from medsim.nn.backbones import make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.frozen_batchnorm import freeze_batchnorm
from medsim.nn.geometry import AttentionGeometry, trace_geometry
from medsim.runtime.geometry import interp_matrix

__all__ = ["Embedder", "upsample_attention"]


class Embedder(EmbedderBase):
    """Attention-based metric-learning network of Dynamic Subspace Learners (DSL, MIDL 2022).

    Args:
        backbone: ``monai.networks.nets`` ResNet name (``resnet10/18/34/50``).
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: input channels.
        cut: backbone stage whose output feeds attention (``layer3`` as in DSL).
        embedding_dim: D (128 in DSL).
        attention: a name in :data:`medsim.nn.attention.ATTENTIONS` (``"dsl"`` as in DSL, ``"none"``).
        n_classes: adds a classification head on the (unnormalised) embedding when set (classifier baseline:
            the embedding is then the penultimate layer).
        widen_factor: backbone width multiplier.
        normalize: L2-normalise the embedding.
        return_features: also return ``features``, the backbone's output (B, F, *S/16 for layer3) that the
            attention reads (:class:`~medsim.nn.base.EmbedderBase`).
        backbone_weights: a local state_dict file the backbone starts from (the MONAI ResNet's keys, e.g. from
            self-supervised pretraining; :func:`~medsim.nn.backbones.make_backbone`), read weights-only. Only an
            initialisation: a network rebuilt from a run record to receive its checkpoint skips it
            (:attr:`init_only_args`).
        freeze_bn: replace the backbone's BatchNorm layers by :class:`~medsim.nn.FrozenBatchNorm` (its stored
            statistics, no learning): for a pretrained trunk fine-tuned with small batches.

    Shapes: x (B, in_channels, *S) -> embedding (B, D), attention (B, 1, *S/16 for layer3), logits (B, n_classes).
    The trunk is registered as ``backbone`` (its state_dict keys); :attr:`trunk` reads it.
    """

    trunk_key = "backbone"
    init_only_args = ("backbone_weights",)

    def __init__(self, backbone: str = "resnet18", *, spatial_dims: int = 2, in_channels: int = 3,
                 cut: str = "layer3", embedding_dim: int = 128, attention: str = "dsl", n_classes: int | None = None,
                 widen_factor: float = 1.0, normalize: bool = True, attention_kwargs: dict | None = None,
                 return_features: bool = False, backbone_weights: str | os.PathLike | None = None,
                 freeze_bn: bool = False):
        super().__init__(return_features=return_features)
        self.backbone, channels = make_backbone(backbone, spatial_dims=spatial_dims, in_channels=in_channels,
                                                cut=cut, widen_factor=widen_factor, weights=backbone_weights)
        if freeze_bn:
            self.backbone = freeze_batchnorm(self.backbone)
        self.attention = create_attention(attention, channels, spatial_dims=spatial_dims, **(attention_kwargs or {}))
        self.embed = nn.Linear(channels, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, n_classes) if n_classes else None
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.normalize = normalize

    def compute(self, x: torch.Tensor) -> EmbedderOutput:
        trunk = self.backbone(x)
        feats, att = self.attention(trunk)
        pooled = feats.flatten(2).mean(-1)
        raw = self.embed(pooled)
        out: EmbedderOutput = {"embedding": F.normalize(raw, dim=1) if self.normalize else raw, "attention": att}
        if self.classifier is not None:
            out["logits"] = self.classifier(raw)
        return self.add_features(out, trunk)

    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:
        """Where the ``attention`` cells sit on an input of spatial ``input_size`` (x, y[, z]): traced through the
        backbone and the attention module (:mod:`medsim.nn.geometry`)."""
        return trace_geometry(input_size, self.backbone, self.attention)

    @torch.no_grad()
    def reset_neurons(self, index: torch.Tensor) -> None:
        """Re-initialise the embedding neurons ``index`` (rows of the linear layer), as DSL does for the neurons
        left over after a split (default PyTorch Linear initialisation, drawn from torch's global RNG)."""
        fresh = nn.Linear(self.embed.in_features, self.embed.out_features).to(self.embed.weight)
        self.embed.weight[index] = fresh.weight[index]
        self.embed.bias[index] = fresh.bias[index]


def upsample_attention(attention: torch.Tensor, size: Sequence[int],
                       geometry: AttentionGeometry | None = None) -> torch.Tensor:
    """Attention (B, 1, *S_feat) → (B, 1, *size) for overlays on the input (``size`` in the same axis order).

    With ``geometry`` (``model.attention_geometry(input_size)``) each cell is placed at its receptive-field centre,
    linear between centres and the edge value held outside them — the rule of the torch-free localizer
    (:func:`medsim.runtime.geometry.resample_attention`, the same interpolation weights). Without it the grid is
    stretched over the whole input ((bi/tri)linear, ``align_corners=False``), which misplaces patch-grid maps.
    """
    if geometry is None:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[attention.ndim - 2]
        return F.interpolate(attention, size=tuple(size), mode=mode, align_corners=False)
    if len(size) != attention.ndim - 2:
        raise ValueError(f"size {tuple(size)} does not match the {attention.ndim - 2}-D attention {tuple(attention.shape)}")
    geometry.check_grid(attention.shape[2:])
    out = attention
    for k, (ax, n_in, n_out) in enumerate(zip(geometry.axes, geometry.input_size, size)):
        w = torch.as_tensor(interp_matrix(ax, n_in, int(n_out)), dtype=attention.dtype, device=attention.device)
        out = torch.movedim(torch.tensordot(out, w, dims=([k + 2], [1])), -1, k + 2)
    return out
