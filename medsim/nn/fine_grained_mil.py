"""The fine-grained multi-instance classifier of Fan, Chakraborti, Chang, Xu, Rittscher ("Microscopic fine-grained
instance classification through deep attention", MICCAI 2020, Fig. 2): a global branch with an attention module
(:mod:`medsim.nn.fine_grained_attention`), instance crops at full resolution (:mod:`medsim.nn.instance_crops`),
a shared local trunk and a fusion classifier. Large images: :func:`medsim.nn.tiling.tile_predictions`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import nn

from medsim.nn.attention import create_attention
from medsim.nn.backbones import make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.fine_grained_attention import channel_mean_map, minmax_normalize
from medsim.nn.geometry import AttentionGeometry, Resize, trace_geometry
from medsim.nn.instance_crops import crop_boxes, label_components, largest_components

__all__ = ["FineGrainedMIL", "INSTANCE_POOLS", "THRESHOLDS", "size_pair"]


INSTANCE_POOLS = ("mean", "max", "concat")
THRESHOLDS = ("mean",)


class FineGrainedMIL(EmbedderBase):
    """The fine-grained multi-instance classifier of Fan et al. (MICCAI 2020, Fig. 2), Embedder contract.

    1. Global branch: the input, down-sampled to ``global_size`` (bilinear), through a MONAI ResNet trunk cut
       after ``cut`` (:attr:`trunk`) → the attention module (``attention``, default the gated module) → global
       average pooling → ``global_logits`` (Y_g).
    2. Instances: Ω (channel mean of the attended features, Eq. 2 — read out here from any module's features, so
       the ``none`` module gives the channel mean of the trunk features) is min–max scaled per image and thresholded
       (``threshold="mean"``: cells above the image's mean; a float τ: cells >= τ). The paper does not state its
       rule. Connected components (:func:`label_components`, 8-connectivity) → the ``n_instances`` largest →
       their boxes on the FULL-resolution input (feature cell (i, j) covers input pixels [i·X/h, (i+1)·X/h) ×
       [j·Y/w, (j+1)·Y/w)). With fewer components the remaining slots take the whole-image box.
    3. Local branch: the boxes are cropped from the full-resolution input with ``grid_sample``, resized to
       ``local_size``, and embedded by a second, shared ResNet trunk (``local_backbone``) + global average pooling.
       Instance features are pooled (``instance_pool``: mean / max, or ``concat`` in size order as in the paper's
       Fig. 2).
    4. Fusion: [global features, pooled instance features] → ``logits`` (Y_f). The ``embedding`` is that fused
       feature vector, L2-normalised — the representation both cross-entropy terms train (the paper has no
       metric loss; a separate projection head would stay at its random initialisation).

    ``n_instances=0`` gives the plain baseline: the global branch only (``logits`` = ``global_logits``; the
    embedding is the normalised global features).

    Boxes are computed without gradient (the instance selection is not differentiable; the attention module
    learns through the global loss, as in the paper) and without data-dependent Python control flow, so the
    whole model exports to ONNX and the exported graph selects the same boxes.

    Args:
        n_classes: classes of both heads.
        backbone / local_backbone: ``monai.networks.nets`` ResNet names (local defaults to ``backbone``).
        in_channels: input channels.
        cut / local_cut: stage after which each trunk ends (``layer3``: feature maps at 1/16).
        global_size: (X, Y) the global branch sees (the paper: 224 from larger images).
        local_size: (X, Y) of each instance crop (the paper: 336).
        n_instances: N boxes per image.
        attention: a name in :data:`medsim.nn.attention.ATTENTIONS` (Table 2: ``fan_gated`` — old name ``gated`` —,
            ``se``, ``spatial``, ``channel``, ``dual``, ``gc``, or ``none``); ``attention_kwargs`` go to it.
        threshold: ``"mean"`` or a float in (0, 1) on the min–max scaled Ω.
        instance_pool: ``mean``, ``max`` or ``concat``.
        embedding_dim: ``None`` (default): D = the fused feature size. An int adds a linear projection to D —
            trained only by a loss that uses ``embedding`` (``FineGrainedLoss`` does not), so leave it ``None``
            unless you add a metric term.
        widen_factor / local_widen_factor: trunk width multipliers.
        connectivity: 8 or 4 for the components.
        return_features: also return ``features``, the global trunk's output (B, C', h, w) on the input resized
            to ``global_size`` — what the attention module reads (:class:`~medsim.nn.base.EmbedderBase`).

    Shapes: x (B, C, X, Y) -> ``embedding`` (B, D) unit-norm, ``attention`` (B, 1, h, w) in [0, 1] (Ω min–max
    scaled), ``omega`` (B, 1, h, w) raw Ω, ``logits`` / ``global_logits`` (B, n_classes), ``instance_boxes``
    (B, N, 4) float ``(x0, y0, x1, y1)`` input pixels, half-open, x along dim 2 (MONAI x = image column) and y
    along dim 3, ``instance_valid`` (B, N) bool (False: a whole-image pad). (h, w) = the global trunk's output.
    """

    def __init__(self, n_classes: int, *, backbone: str = "resnet18", local_backbone: str | None = None,
                 spatial_dims: int = 2, in_channels: int = 3, cut: str = "layer3", local_cut: str | None = None,
                 global_size: Sequence[int] | int = (96, 96), local_size: Sequence[int] | int = (64, 64),
                 n_instances: int = 2, attention: str = "gated", attention_kwargs: dict | None = None,
                 threshold: str | float = "mean", instance_pool: str = "mean", embedding_dim: int | None = None,
                 widen_factor: float = 1.0, local_widen_factor: float | None = None, connectivity: int = 8,
                 return_features: bool = False):
        super().__init__(return_features=return_features)
        if spatial_dims != 2:
            raise ValueError(f"FineGrainedMIL crops 2-D instances; got spatial_dims={spatial_dims}")
        if n_classes is None or int(n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2 (both heads are classifiers), got n_classes={n_classes}")
        if n_instances < 0:
            raise ValueError(f"n_instances must be >= 0, got n_instances={n_instances}")
        if isinstance(threshold, str):
            look_up_option(threshold, THRESHOLDS)
        elif not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be 'mean' or a float in (0, 1), got threshold={threshold!r}")
        self.global_size = size_pair(global_size, "global_size")
        self.local_size = size_pair(local_size, "local_size")
        self.trunk, channels = make_backbone(backbone, spatial_dims=2, in_channels=in_channels, cut=cut,
                                             widen_factor=widen_factor)
        self.attention = create_attention(attention, channels, spatial_dims=2, **(attention_kwargs or {}))
        self.global_classifier = nn.Linear(channels, n_classes)
        fused = channels
        self.local_trunk: nn.Module | None = None
        if n_instances:
            self.instance_pool = look_up_option(instance_pool, INSTANCE_POOLS)
            self.local_trunk, local_channels = make_backbone(
                local_backbone or backbone, spatial_dims=2, in_channels=in_channels, cut=local_cut or cut,
                widen_factor=widen_factor if local_widen_factor is None else local_widen_factor)
            fused += local_channels * (n_instances if self.instance_pool == "concat" else 1)
            self.fusion_classifier: nn.Module | None = nn.Linear(fused, n_classes)
        else:
            self.instance_pool = instance_pool
            self.fusion_classifier = None
        self.embed: nn.Module | None = nn.Linear(fused, embedding_dim) if embedding_dim is not None else None
        self.n_classes, self.n_instances, self.threshold = int(n_classes), int(n_instances), threshold
        self.connectivity = connectivity
        self.spatial_dims, self.in_channels = 2, in_channels
        self.embedding_dim = int(embedding_dim) if embedding_dim is not None else fused

    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:
        """Where the Ω cells of ``attention`` sit on an input of spatial ``input_size`` (X, Y): traced through the
        resize to ``global_size``, the global trunk and the attention module (:mod:`medsim.nn.geometry`)."""
        return trace_geometry(input_size, Resize(self.global_size), self.trunk, self.attention)

    # -- parts
    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, X, Y) -> the global trunk's features (B, C', h, w) of x resized to ``global_size``."""
        g = x
        if tuple(x.shape[2:]) != self.global_size:
            g = F.interpolate(x, size=self.global_size, mode="bilinear", align_corners=False)
        return self.trunk(g)

    def attend(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global trunk features (B, C', h, w) -> (attended features (B, C', h, w), normalised Ω (B, 1, h, w),
        raw Ω)."""
        feats, _ = self.attention(features)
        omega = channel_mean_map(feats)  # Eq. 2, whatever the module
        return feats, minmax_normalize(omega), omega

    def global_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, X, Y) -> (attended features (B, C', h, w), normalised Ω (B, 1, h, w), raw Ω)."""
        return self.attend(self.global_features(x))

    @torch.no_grad()
    def instance_boxes(self, attention: torch.Tensor, input_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised Ω (B, 1, h, w) -> boxes (B, N, 4) in input pixels ``(x0, y0, x1, y1)`` and valid (B, N)."""
        a = attention[:, 0]
        b, h, w = a.shape
        if self.threshold == "mean":
            mask = a > a.flatten(1).mean(1).view(b, 1, 1)
        else:
            mask = a >= float(self.threshold)
        n = min(self.n_instances, h * w)
        cells, _, valid = largest_components(label_components(mask, connectivity=self.connectivity), n)
        scale = torch.tensor([input_size[0] / h, input_size[1] / w] * 2, dtype=a.dtype, device=a.device)
        whole = torch.tensor([0.0, 0.0, float(input_size[0]), float(input_size[1])], dtype=a.dtype, device=a.device)
        boxes = torch.where(valid.unsqueeze(-1), cells * scale, whole)
        if n < self.n_instances:  # a grid with fewer cells than instances: pad with whole-image boxes
            pad = whole.expand(b, self.n_instances - n, 4)
            boxes = torch.cat([boxes, pad], 1)
            valid = torch.cat([valid, torch.zeros(b, self.n_instances - n, dtype=torch.bool, device=a.device)], 1)
        return boxes, valid

    def instance_features(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crops of ``boxes`` from the full-resolution ``x`` → local trunk → GAP → pooled (B, C_local[·N])."""
        crops = crop_boxes(x, boxes, self.local_size)
        f = self.local_trunk(crops).flatten(2).mean(-1).view(x.shape[0], self.n_instances, -1)
        if self.instance_pool == "mean":
            return f.mean(1)
        if self.instance_pool == "max":
            return f.amax(1)
        return f.flatten(1)

    def compute(self, x: torch.Tensor) -> EmbedderOutput:
        trunk = self.global_features(x)
        feats, att, omega = self.attend(trunk)
        g = feats.flatten(2).mean(-1)
        out = {"attention": att, "omega": omega, "global_logits": self.global_classifier(g)}
        if self.local_trunk is None:
            fused = g
            out["logits"] = out["global_logits"]
            out["instance_boxes"] = x.new_zeros(x.shape[0], 0, 4)
            out["instance_valid"] = torch.zeros(x.shape[0], 0, dtype=torch.bool, device=x.device)
        else:
            boxes, valid = self.instance_boxes(att, x.shape[2:])
            fused = torch.cat([g, self.instance_features(x, boxes)], 1)
            out["logits"] = self.fusion_classifier(fused)
            out["instance_boxes"], out["instance_valid"] = boxes, valid
        out["embedding"] = F.normalize(self.embed(fused) if self.embed is not None else fused, dim=1)
        return self.add_features(out, trunk)


def size_pair(v: Sequence[int] | int, name: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t  # type: ignore[return-value]
