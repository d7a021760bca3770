"""ABE-M: attention-based ensemble for deep metric learning (Kim et al., ECCV 2018, "Attention-based Ensemble for
Deep Metric Learning").

M learners share a spatial feature extractor S and a global embedding function G and differ only in their
attention masks: learner m embeds B_m(x) = G(S(x) ∘ A_m(S(x))) (Eq. 7). The divergence loss that keeps the
learners apart is :func:`medsim.losses.divergence.divergence_loss`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from monai.utils import look_up_option
from torch import nn

from medsim.nn.backbones import CUTS, make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.geometry import AttentionGeometry, trace_geometry

__all__ = ["ABEEmbedder"]


class ABEEmbedder(EmbedderBase):
    """ABE-M on a MONAI ResNet, in the paper's efficient form A_m(·) = A'_m(C(·)) (Sec. 4).

    Mapping of the paper's GoogLeNet parts onto the ResNet stages:

    - S (spatial feature extractor): the ResNet trunk up to ``cut`` (paper: up to pool3 after inception(3b)).
    - C (attention trunk, shared by all learners): ``attention_layers`` 3×3 conv–BN–ReLU blocks at stride 1 on
      S's output, ``attention_hidden`` channels wide (paper: inception(4a)–(4e) with the pooling removed, so the
      mask keeps S's resolution). Kept shallow here for CPU budgets.
    - A'_m (one per learner): a 1×1 conv from C's output to S's channel count, then a sigmoid: a per-channel mask
      in [0, 1] with exactly S's output shape (paper: 480 1×1 kernels), Glorot-initialised as in the paper.
    - G (global embedding function, shared): the backbone stages after ``cut`` (``layer4`` for ``cut="layer3"``;
      none for ``cut="layer4"``), global average pooling and a linear layer to D/M (paper: the rest of GoogLeNet
      and its final FC layer). The M masked feature maps go through G as one batch of B·M.

    Each learner's embedding is L2-normalised; the ensemble embedding is their concatenation divided by √M, so
    it is unit-norm and its cosine similarity is the mean of the learners' cosine similarities (the ensemble
    metric of Eq. 3).

    Args:
        backbone: ``monai.networks.nets`` ResNet name (``resnet10/18/34/50``).
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: input channels.
        cut: the stage after which the attention masks are applied (``layer1``–``layer4``).
        embedding_dim: D, the ensemble embedding size; must be divisible by ``n_learners``.
        n_learners: M.
        widen_factor: backbone width multiplier.
        attention_hidden: channels of the shared attention trunk C (default: S's channel count).
        attention_layers: 3×3 conv blocks in C (>= 0; 0 feeds S's output straight to the 1×1 convs).
        return_features: also return ``features``, S's output (B, C, *s) that the masks and G read
            (:class:`~medsim.nn.base.EmbedderBase`).

    Shapes: x (B, in_channels, *S) -> ``embedding`` (B, D) unit-norm, ``attention`` (B, 1, *s) (mean over
    learners and channels of the masks), ``learner_attention`` (B, M, *s) (each learner's mask averaged over
    channels), ``learner_embeddings`` (B, M, D/M) unit-norm per learner; *s = S's output size (1/16 of the input
    for ``layer3``). S is registered as ``spatial`` (its state_dict keys); :attr:`trunk` reads it.
    """

    trunk_key = "spatial"

    def __init__(self, backbone: str = "resnet18", *, spatial_dims: int = 2, in_channels: int = 3,
                 cut: str = "layer3", embedding_dim: int = 128, n_learners: int = 4, widen_factor: float = 1.0,
                 attention_hidden: int | None = None, attention_layers: int = 2, return_features: bool = False):
        super().__init__(return_features=return_features)
        if n_learners < 1:
            raise ValueError(f"n_learners must be >= 1, got n_learners={n_learners}")
        if embedding_dim % n_learners:
            raise ValueError(f"embedding_dim must be divisible by n_learners (each learner embeds D/M), got "
                             f"embedding_dim={embedding_dim}, n_learners={n_learners}")
        if attention_layers < 0:
            raise ValueError(f"attention_layers must be >= 0, got attention_layers={attention_layers}")
        cut = look_up_option(cut, CUTS)
        full, out_channels = make_backbone(backbone, spatial_dims=spatial_dims, in_channels=in_channels,
                                           cut="layer4", widen_factor=widen_factor)
        n_trunk = 4 + CUTS.index(cut) + 1  # conv1, bn1, act, maxpool, layer1 .. cut
        self.spatial = full[:n_trunk]
        self.global_stages = full[n_trunk:]
        last = self.spatial[-1][-1]
        channels = int((last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels)
        g_channels = out_channels if len(self.global_stages) else channels

        hidden = attention_hidden or channels
        blocks: list[nn.Module] = []
        c = channels
        for _ in range(attention_layers):
            blocks.append(Convolution(spatial_dims, c, hidden, kernel_size=3, act="RELU", norm="BATCH"))
            c = hidden
        self.attention_trunk = nn.Sequential(*blocks)
        conv = Conv[Conv.CONV, spatial_dims]
        self.attention_heads = nn.ModuleList(conv(c, channels, kernel_size=1) for _ in range(n_learners))
        for head in self.attention_heads:  # Glorot initialisation of the attention convs (Sec. 4)
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        self.embed = nn.Linear(g_channels, embedding_dim // n_learners)

        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.embedding_dim, self.n_learners, self.channels = embedding_dim, n_learners, channels

    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:
        """Where the ``attention`` cells sit on an input of spatial ``input_size`` (x, y[, z]): traced through S,
        the attention trunk C and the 1×1 heads (:mod:`medsim.nn.geometry`)."""
        return trace_geometry(input_size, self.spatial, self.attention_trunk, self.attention_heads)

    def learner_masks(self, feats: torch.Tensor) -> torch.Tensor:
        """A_m(S(x)) for every learner: S's output (B, C, *s) -> masks (B, M, C, *s) in [0, 1]."""
        h = self.attention_trunk(feats)
        return torch.stack([torch.sigmoid(head(h)) for head in self.attention_heads], dim=1)

    def embed_learners(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """G(S(x) ∘ A_m) for every learner (Eq. 7): feats (B, C, *s), masks (B, M, C, *s) -> (B, M, D/M),
        each row L2-normalised. The M attended maps go through the shared G as one batch of B·M."""
        attended = (feats.unsqueeze(1) * masks).flatten(0, 1)  # (B·M, C, *s)
        g = self.global_stages(attended)
        emb = self.embed(g.flatten(2).mean(-1))  # (B·M, D/M)
        return F.normalize(emb.reshape(-1, self.n_learners, emb.shape[-1]), dim=-1)

    def compute(self, x: torch.Tensor) -> EmbedderOutput:
        feats = self.spatial(x)
        masks = self.learner_masks(feats)
        learners = self.embed_learners(feats, masks)
        learner_attention = masks.mean(2)  # (B, M, *s)
        return self.add_features({"embedding": learners.flatten(1) / self.n_learners ** 0.5,
                                  "attention": learner_attention.mean(1, keepdim=True),
                                  "learner_attention": learner_attention,
                                  "learner_embeddings": learners}, feats)
