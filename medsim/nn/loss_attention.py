"""Loss-based attention (Shi et al., "Loss-Based Attention for Interpreting Image-Level Prediction of Convolutional
Neural Networks", IEEE TIP 30, 2021, doi:10.1109/TIP.2020.3046875) and the MIL pooling baselines it is compared
with (Ilse et al., "Attention-based Deep Multiple Instance Learning", ICML 2018), in one architecture.

The image is cut into M patches by a convolution (9×9, stride 4) on a ResNet trunk whose max-pooling and strides are
removed (so a patch's features depend on its own pixels, not on pooled neighbours); every patch gets logits from the
**same** linear classifier that makes the image decision, and the image logits are a weighted sum of the patch
logits. The weights come from the classifier itself (``pooling="loss"``, Eq. 5 / Eq. 6) or, for the baselines,
from uniform weights (``"mean"``) or a separate attention network (``"attention"``, ``"gated"``: Ilse et al.'s MIL
poolings, registered as ``mil_attention`` / ``mil_gated`` in :mod:`medsim.nn.attention`).

=============  ==========================================================================================
``head``       architecture
=============  ==========================================================================================
``softmax``    convolutional (paper Fig. 3, middle) trained for one label per image: pair with
               ``LossAttentionLoss(mode="softmax")`` (Eq. 9)
``sigmoid``    the same layers, trained for multi-label images: ``LossAttentionLoss(mode="sigmoid")`` (Eq. 10)
``capsule``    capsule architecture (paper Fig. 3, right): primary capsules (Eq. 11), class capsules weighted
               by Eq. 6 (loss-based attention in place of dynamic routing); only ``pooling="loss"``
=============  ==========================================================================================

Outputs (the Embedder contract plus what the loss needs):
``logits`` (B, K), ``patch_logits`` (B, M, K), ``patch_weights`` (B, M), ``attention`` (B, 1, gh, gw),
``embedding`` (B, D); the capsule head adds ``capsule_logits`` (B, M, R, K) and ``capsule_weights`` (B, M, R).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import nn

from medsim.nn.attention import create_attention
from medsim.nn.backbones import CUTS, make_backbone
from medsim.nn.base import EmbedderBase, EmbedderOutput
from medsim.nn.geometry import AttentionGeometry, trace_geometry

__all__ = ["LossAttentionNet", "flat_resnet", "loss_based_weights", "capsule_loss_based_weights", "POOLINGS",
           "HEADS", "STRIDED"]

HEADS = ("softmax", "sigmoid", "capsule")
#: stages of a MONAI ResNet whose stride 2 can be kept (layer1 has none)
STRIDED = ("conv1", "layer2", "layer3", "layer4")
_EPS = 1e-12


def flat_resnet(name: str = "resnet18", *, in_channels: int = 3, cut: str = "layer4", widen_factor: float = 1.0,
                strided: Sequence[str] = ("layer2",)) -> tuple[nn.Sequential, int, int]:
    """A MONAI ResNet trunk (:func:`medsim.nn.backbones.make_backbone`) with max-pooling and strides removed, as in
    Shi et al. Sec. "Network Architectures": "we can first remove the stride operations in convolutional layers".

    Exactly: the stem's max-pooling becomes ``nn.Identity``; the stem conv keeps stride 2 only if ``"conv1"`` is in
    ``strided`` (else stride 1); in every stage ``layer2``..``cut`` not in ``strided`` each stride-2 convolution
    (the first block's 3×3 conv and its 1×1 downsample shortcut) is set to stride 1. The paper keeps stride where
    the input is larger than 32×32: for 64×64 it keeps the stride of ResNet18's sixth conv layer, i.e. the first
    conv of ``layer2`` — the default here.

    Returns ``(trunk, out_channels, total_stride)``; shapes (B, in_channels, H, W) -> (B, out_channels,
    ⌈H / total_stride⌉, ⌈W / total_stride⌉).
    """
    cut = look_up_option(cut, CUTS)
    strided = tuple(look_up_option(s, STRIDED) for s in strided)
    trunk, channels = make_backbone(name, spatial_dims=2, in_channels=in_channels, cut=cut,
                                    widen_factor=widen_factor, conv1_t_stride=2 if "conv1" in strided else 1)
    for i, m in enumerate(trunk):
        if isinstance(m, nn.MaxPool2d):
            trunk[i] = nn.Identity()
    stages = CUTS[: CUTS.index(cut) + 1]
    for stage, module in zip(stages, list(trunk)[-len(stages):]):
        if stage == "layer1" or stage in strided:
            continue
        for m in module[0].modules():  # the first block holds the stage's stride (conv + downsample shortcut)
            if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
                m.stride = (1, 1)
        if hasattr(module[0], "stride"):
            module[0].stride = 1
    total = 2 ** sum(s == "conv1" or s in stages for s in strided)
    return trunk, channels, total


# ---------------------------------------------------------------------------------------------- patch weights
def loss_based_weights(patch_logits: torch.Tensor, xi: float = 0.1) -> torch.Tensor:
    """Eq. (5a) of Shi et al.: patch weights from the L2,1 row norms of the patch-logit matrix P = [p_1; …; p_M].

    ``α̂_j = ‖p_j‖₂ / ‖P‖₂,₁`` (‖P‖₂,₁ = Σ_m ‖p_m‖₂, the norm that encourages row sparsity), trivial patches removed by
    the threshold, ``α_j = max(0, α̂_j − ξ/M) / Σ_m max(0, α̂_m − ξ/M)``, so that the weights sum to one and the image
    logits ``z = Σ_j α_j p_j`` (Eq. 5b) are a weighted sum of the patch logits.

    The stored paper text lost the equation bodies. This form is rebuilt from what the text says — weights from
    the ℓ2,1 norm of the patch logits, a threshold ξ that removes trivial patches, "the maximum of ξ [is] 1 …
    because all patch weights might be zeros" (true for the threshold ξ/M: the largest α̂_j is ≥ 1/M), ξ = 0.1 by
    default, and the image decision a weighted sum of patches — and matches the authors' released code
    (``Attention_Layer`` in model/conv_resnet.py and model/capsule_resnet.py: norms / their sum, ReLU(· − 0.1/γ),
    renormalised). The code's conv model divides ξ by the spatial size *before* the 9×9 patch conv; its capsule
    model, and this function, divide by the number of patches M.

    Shapes: patch_logits (B, M, K) -> weights (B, M), each row ≥ 0 and summing to 1.
    """
    if patch_logits.ndim != 3:
        raise ValueError(f"expected patch logits (B, M, K), got shape {tuple(patch_logits.shape)}")
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1] (the paper caps it at 1), got xi={xi}")
    norms = torch.linalg.vector_norm(patch_logits, dim=-1)  # (B, M) = ‖p_j‖₂
    share = norms / norms.sum(1, keepdim=True).clamp_min(_EPS)
    kept = F.relu(share - xi / patch_logits.shape[1])
    return kept / kept.sum(1, keepdim=True).clamp_min(_EPS)


def capsule_loss_based_weights(capsule_logits: torch.Tensor, xi: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6) of Shi et al.: loss-based attention over class capsules.

    Capsule (j, r) — patch j, capsule channel r — has logits ``p_jr = Θ h_jr``. ``α̂_jr = ‖p_jr‖₂ / ‖P‖₂,₁`` over all
    M·R capsules; a patch is kept if its summed share clears the threshold, ``α_j = max(0, Σ_r α̂_jr − ξ/M)``
    (renormalised over patches: the patch weights); capsules of removed patches are zeroed and the rest
    renormalised, ``α̃_jr = sgn(α_j) α̂_jr / Σ sgn(α_j') α̂_j'r'``, and the image logits are ``Σ_jr α̃_jr p_jr``. Rebuilt
    from the text (sgn(α) = 0 if α = 0, 1 if α > 0) and ``Attention_Layer`` of the authors' model/capsule_resnet.py.

    Shapes: capsule_logits (B, M, R, K) -> patch weights (B, M), capsule weights (B, M, R) (each sums to 1).
    """
    if capsule_logits.ndim != 4:
        raise ValueError(f"expected capsule logits (B, M, R, K), got shape {tuple(capsule_logits.shape)}")
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must be in [0, 1] (the paper caps it at 1), got xi={xi}")
    norms = torch.linalg.vector_norm(capsule_logits, dim=-1)  # (B, M, R)
    share = norms / norms.flatten(1).sum(1).clamp_min(_EPS)[:, None, None]
    patch = F.relu(share.sum(2) - xi / capsule_logits.shape[1])
    patch = patch / patch.sum(1, keepdim=True).clamp_min(_EPS)
    caps = share * (patch > 0).to(share.dtype)[:, :, None]  # sgn(α_j)
    caps = caps / caps.flatten(1).sum(1).clamp_min(_EPS)[:, None, None]
    return patch, caps


#: ``LossAttentionNet(pooling=...)``: the registered attention module (:data:`medsim.nn.attention.ATTENTIONS`) that
#: weighs the patches, or ``None`` where no module is needed (``loss``: Eq. 5 on the classifier's own patch logits;
#: ``mean``: uniform 1/M). ``attention`` / ``gated`` are Ilse et al.'s MIL poolings, ``mil_attention`` / ``mil_gated``.
POOLINGS: dict[str, str | None] = {"loss": None, "mean": None, "attention": "mil_attention", "gated": "mil_gated"}


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, N) weights, (B, N, C) values -> (B, C) = Σ_n w_n v_n (a batched matmul: exports as MatMul)."""
    return torch.matmul(weights.unsqueeze(1), values).squeeze(1)


# ---------------------------------------------------------------------------------------------------- network
class LossAttentionNet(EmbedderBase):
    """The modified ResNet of Shi et al. (Fig. 1, Fig. 3) with loss-based attention or a MIL pooling baseline.

    Convolutional heads (``softmax`` / ``sigmoid``): trunk → conv 9×9 stride 4 (patch features; one output cell =
    one patch) → conv 1×1 (BN + ReLU after each, as in the authors' code) → ``h_j`` (C) → patch logits
    ``p_j = Θ h_j + b`` with the image classifier Θ → weights α (``pooling``) → image logits ``z = Σ_j α_j p_j``.
    Since Σ α_j = 1, ``z = Θ(Σ_j α_j h_j) + b``: the image decision and the patch decisions share Θ.

    Capsule head (paper Sec. "Capsule Architecture"; the authors' model/capsule_resnet.py): primary capsules
    = ``primary_channels`` (32) channels of ``primary_dim``-d (16) capsules from a 9×9 stride-4 conv; Eq. (11)
    keeps their lengths above a learnt per-channel threshold b, ``max(0, ‖u‖₂ − b)`` (b starts at 0); class capsules
    = a 1×1 conv to ``capsule_channels`` (R = 64) channels of ``capsule_dim``-d (D = 128) capsules per patch; each
    capsule gets logits from Θ and Eq. (6) weighs them (:func:`capsule_loss_based_weights`). There is no
    routing-by-agreement: the paper's point is that Eq. (6) replaces dynamic routing (Sabour et al. 2017, its
    "Dynamic Routing" baseline). Patch logits = Σ_r p_jr, as in the authors' code (they feed the regulariser).

    Args:
        backbone: MONAI ResNet name (``resnet10/18/34/50``).
        n_classes: K.
        in_channels: image channels.
        cut: last trunk stage (the paper uses the whole ResNet18, ``layer4``).
        widen_factor: trunk width multiplier.
        strided: trunk stages that keep stride 2 (see :func:`flat_resnet`; paper, 64×64 input: ``("layer2",)``).
        head: ``softmax`` / ``sigmoid`` (same layers; names the loss they are trained with) or ``capsule``.
        pooling: ``loss`` (Eq. 5), ``mean``, ``attention`` or ``gated`` (Ilse et al.); capsule: ``loss`` only.
        xi: threshold ξ ∈ [0, 1] of Eq. 5/6 (paper default 0.1).
        patch_channels: channels of the two patch convs (paper 512).
        patch_kernel, patch_stride: the patch conv (paper 9, 4).
        embedding_dim: if set, a linear layer projects the pooled features to this size before L2 normalisation
            (it is not trained by :class:`~medsim.losses.loss_attention.LossAttentionLoss`: leave it ``None`` to
            use the pooled features themselves).
        mil_hidden: hidden size L of the attention / gated MIL poolings (Ilse et al.: 128).
        primary_channels, primary_dim, capsule_channels, capsule_dim: capsule sizes (paper 32, 16, 64, 128).
        return_features: also return ``features``, the trunk's output (B, C, H/s, W/s) that the patch conv reads
            — at trunk resolution, finer than the ``attention`` patch grid (:class:`~medsim.nn.base.EmbedderBase`).

    Shapes: x (B, in_channels, H, W) -> ``logits`` (B, K), ``patch_logits`` (B, M, K), ``patch_weights`` (B, M),
    ``attention`` (B, 1, gh, gw) with M = gh·gw, ``embedding`` (B, D). ``attention`` is the patch weights on the
    patch grid divided by each image's largest weight (the top patch is 1, patches removed by ξ are 0; mean
    pooling gives all ones). The trunk is registered as ``backbone`` (its state_dict keys); :attr:`trunk` reads it.
    """

    trunk_key = "backbone"

    def __init__(self, backbone: str = "resnet18", *, n_classes: int, in_channels: int = 3, cut: str = "layer4",
                 widen_factor: float = 1.0, strided: Sequence[str] = ("layer2",), head: str = "softmax",
                 pooling: str = "loss", xi: float = 0.1, patch_channels: int = 512, patch_kernel: int = 9,
                 patch_stride: int = 4, embedding_dim: int | None = None, mil_hidden: int = 128,
                 primary_channels: int = 32, primary_dim: int = 16, capsule_channels: int = 64,
                 capsule_dim: int = 128, return_features: bool = False):
        super().__init__(return_features=return_features)
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got n_classes={n_classes}")
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f"xi must be in [0, 1] (the paper caps it at 1), got xi={xi}")
        self.head = look_up_option(head, HEADS)
        pooling = look_up_option(pooling, tuple(POOLINGS))
        if self.head == "capsule" and pooling != "loss":
            raise ValueError(f"the capsule head weighs its capsules with Eq. 6 (pooling='loss'), got pooling={pooling!r}")
        self.pooling_name = pooling
        self.backbone, trunk_channels, self.trunk_stride = flat_resnet(
            backbone, in_channels=in_channels, cut=cut, widen_factor=widen_factor, strided=strided)
        self.patch_kernel, self.patch_stride = int(patch_kernel), int(patch_stride)
        self.xi = float(xi)
        if self.head == "capsule":
            self.primary = _conv_bn_relu(trunk_channels, primary_channels * primary_dim, patch_kernel, patch_stride)
            self.primary_threshold = nn.Parameter(torch.zeros(primary_channels))  # b of Eq. 11
            self.class_capsules = _conv_bn_relu(primary_channels, capsule_channels * capsule_dim, 1)
            self.primary_dim, self.capsule_dim = int(primary_dim), int(capsule_dim)
            feature_dim = capsule_dim
        else:
            self.patch_features = nn.Sequential(_conv_bn_relu(trunk_channels, patch_channels, patch_kernel, patch_stride),
                                                _conv_bn_relu(patch_channels, patch_channels, 1))
            module = POOLINGS[pooling]
            self.pooling = create_attention(module, patch_channels, hidden=mil_hidden) if module else None
            feature_dim = patch_channels
        self.classifier = nn.Linear(feature_dim, n_classes)  # Θ: shared by patch logits, weights and the image
        self.embed = nn.Linear(feature_dim, embedding_dim) if embedding_dim else None
        self.embedding_dim = int(embedding_dim or feature_dim)
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.multilabel = self.head == "sigmoid"

    def compute(self, x: torch.Tensor) -> EmbedderOutput:
        f = self.backbone(x)
        if min(f.shape[-2:]) < self.patch_kernel:
            raise ValueError(f"input {tuple(x.shape[-2:])} gives {tuple(f.shape[-2:])} trunk features, smaller than "
                             f"the {self.patch_kernel}×{self.patch_kernel} patch conv: use a larger image or fewer "
                             f"strided stages (trunk stride {self.trunk_stride})")
        out = self._capsules(f) if self.head == "capsule" else self._patches(f)
        gh, gw = out.pop("grid")
        w = out["patch_weights"]
        pooled = out.pop("pooled")
        raw = self.embed(pooled) if self.embed is not None else pooled
        out["embedding"] = F.normalize(raw, dim=1)
        out["attention"] = (w / w.amax(1, keepdim=True).clamp_min(_EPS)).reshape(-1, 1, gh, gw)
        return self.add_features(out, f)

    def _patches(self, f: torch.Tensor) -> dict:
        h = self.patch_features(f)  # (B, C, gh, gw)
        feats = h.flatten(2).transpose(1, 2)  # (B, M, C): h_j
        patch_logits = self.classifier(feats)  # (B, M, K): p_j = Θ h_j + b
        if self.pooling is not None:  # Ilse et al.'s MIL poolings: weights from the patch features
            w = self.pooling(h)[1].flatten(1)  # (B, M)
        elif self.pooling_name == "loss":  # Eq. 5: weights from the classifier's own patch logits
            w = loss_based_weights(patch_logits, self.xi)
        else:  # mean pooling
            w = torch.ones_like(feats[..., 0]) / feats.shape[1]
        return {"logits": _weighted_sum(w, patch_logits), "patch_logits": patch_logits, "patch_weights": w,
                "pooled": _weighted_sum(w, feats), "grid": tuple(h.shape[-2:])}

    def _capsules(self, f: torch.Tensor) -> dict:
        u = self.primary(f)  # (B, Pd·Pc, gh, gw)
        gh, gw = u.shape[-2:]
        lengths = torch.linalg.vector_norm(u.unflatten(1, (self.primary_dim, -1)), dim=1)  # (B, Pc, gh, gw)
        a = F.relu(lengths - self.primary_threshold.view(1, -1, 1, 1))  # Eq. 11
        c = self.class_capsules(a).unflatten(1, (self.capsule_dim, -1))  # (B, D, R, gh, gw)
        caps = c.flatten(3).permute(0, 3, 2, 1)  # (B, M, R, D): h_jr
        cap_logits = self.classifier(caps)  # (B, M, R, K)
        patch_w, cap_w = capsule_loss_based_weights(cap_logits, self.xi)
        flat_w = cap_w.flatten(1)  # (B, M·R)
        return {"logits": _weighted_sum(flat_w, cap_logits.flatten(1, 2)), "patch_logits": cap_logits.sum(2),
                "patch_weights": patch_w, "capsule_logits": cap_logits, "capsule_weights": cap_w,
                "pooled": _weighted_sum(flat_w, caps.flatten(1, 2)), "grid": (gh, gw)}

    # ------------------------------------------------------------------------------------------ patch geometry
    def attention_geometry(self, input_size: Sequence[int]) -> AttentionGeometry:
        """Where the patch cells of ``attention`` sit on an input of spatial ``input_size`` (x, y): traced through
        the flattened trunk and the unpadded patch conv (:mod:`medsim.nn.geometry`). For the paper's 64×64 input
        (trunk stride 2, 9×9 stride-4 patches) cell i is centred at 8·i + 8.5 px: 13–76 % of the image, not the
        8–92 % of a stretched 6×6 grid."""
        head = (self.primary, self.class_capsules) if self.head == "capsule" else (self.patch_features,)
        return trace_geometry(input_size, self.backbone, *head)

    def patch_footprint_fraction(self, mask: torch.Tensor) -> torch.Tensor:
        """Fraction of each patch's footprint covered by ``mask``, in the order of ``patch_weights``.

        Footprint rule: trunk feature cell f covers input pixels [s·f, s·(f+1)) (s = total trunk stride), so
        patch (i, j) of the k×k stride-p patch conv covers rows [s·p·i, s·(p·i + k)) and the same columns — the
        patch conv's window mapped back to the input, not the (larger) receptive field of the whole trunk.

        Shapes: mask (B, 1, H, W) in {0, 1} (same size and axis order as the input) -> (B, M).
        """
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, H, W) mask, got shape {tuple(mask.shape)}")
        s = self.trunk_stride
        pad_h, pad_w = (-mask.shape[-2]) % s, (-mask.shape[-1]) % s  # padded convs give ⌈H/s⌉ cells
        m = F.pad(mask.float(), (0, pad_w, 0, pad_h))
        frac = F.avg_pool2d(m, kernel_size=s * self.patch_kernel, stride=s * self.patch_stride)
        return frac.flatten(1)
