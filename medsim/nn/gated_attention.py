"""Gated attention for fine-grained multi-instance classification (Fan, Chakraborti, Chang, Xu, Rittscher,
"Microscopic fine-grained instance classification through deep attention", MICCAI 2020), the attention modules
of its Table 2 for comparison, and the whole global + multi-instance pipeline of its Fig. 2.

Attention modules follow medsim's contract (:mod:`medsim.nn.attention`): ``Module(in_channels, spatial_dims=2,
**kw)``, ``forward(x) -> (features, attention)`` with ``features`` shaped like ``x`` (B, C, *s) and ``attention``
(B, 1, *s) in [0, 1]. For every module here the map is the same function of its output features,

    Ω = (1/C) Σ_k features_k          (Eq. 2 of the paper for the gated module, whose features are X_k ⊙ gate_k)

scaled to [0, 1] per image by min–max (:func:`minmax_normalize`; a constant map becomes 0), so Table 2's
comparison changes only how the features are re-weighted, not how the map is read out. The raw Ω is what
:func:`channel_mean_map` returns; :class:`FineGrainedMIL` also outputs it as ``omega``.

=========  ====================================================================================================
``gated``  :class:`GatedAttention` — the paper's module (Eq. 1–2)
``se``     :class:`SEAttention` — squeeze-and-excitation (Hu et al., CVPR 2018; MONAI ``ChannelSELayer``)
``spatial`` :class:`PositionAttention` — non-local / position self-attention (Wang et al., CVPR 2018; the
           paper's "spatial attention [18]"; DANet's PAM has the same form)
``channel`` :class:`ChannelAttention` — channel self-attention on X Xᵀ (DANet CAM, Fu et al., CVPR 2019; stands
           in for the paper's "channel-wise attention [23]", the trilinear X Xᵀ attention of Zheng et al. 2019)
``dual``   :class:`DualAttention` — position + channel (DANet, Fu et al., CVPR 2019)
``gc``     :class:`GlobalContextAttention` — global context block (GCNet, Cao et al., arXiv:1904.11492, 2019)
``none``   :class:`IdentityAttention` — features unchanged; the map is the channel mean of the backbone features
=========  ====================================================================================================
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.layers.factories import Conv
from monai.utils import look_up_option
from torch import nn

from medsim.runtime.geometry import AttentionGeometry
from medsim.nn.backbones import make_backbone
from medsim.nn.geometry import Resize, trace_geometry

__all__ = ["GatedAttention", "SEAttention", "PositionAttention", "ChannelAttention", "DualAttention",
           "GlobalContextAttention", "IdentityAttention", "FINE_GRAINED_ATTENTIONS", "create_fine_grained_attention",
           "minmax_normalize", "channel_mean_map", "label_components", "largest_components", "crop_boxes",
           "FineGrainedMIL", "INSTANCE_POOLS", "tile_predictions"]


def _check(x: torch.Tensor, spatial_dims: int) -> None:
    if x.ndim != spatial_dims + 2:
        raise ValueError(f"expected a {spatial_dims + 2}-D (B, C, *spatial) batch, got shape {tuple(x.shape)}")


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
        _check(x, self.spatial_dims)
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
        _check(x, self.spatial_dims)
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


class IdentityAttention(_MapFromFeatures):
    """No attention: features unchanged; the map is the channel mean of the backbone features (a class-agnostic
    activation map) min–max scaled. Shapes: x (B, C, *s) -> x, (B, 1, *s)."""

    def __init__(self, in_channels: int = 0, spatial_dims: int = 2):
        super().__init__()
        self.spatial_dims = spatial_dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


FINE_GRAINED_ATTENTIONS: dict[str, type[nn.Module]] = {
    "gated": GatedAttention, "se": SEAttention, "spatial": PositionAttention, "channel": ChannelAttention,
    "dual": DualAttention, "gc": GlobalContextAttention, "none": IdentityAttention}


def create_fine_grained_attention(name: str, in_channels: int, spatial_dims: int = 2, **kwargs: Any) -> nn.Module:
    """Build the module registered as ``name`` in :data:`FINE_GRAINED_ATTENTIONS` ("did you mean" on typos)."""
    return look_up_option(name, FINE_GRAINED_ATTENTIONS)(in_channels, spatial_dims=spatial_dims, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# instances: traceable connected components, boxes and crops (identical in PyTorch and in the exported ONNX graph)
# --------------------------------------------------------------------------------------------------------------------
def _neighbour_max(lab: torch.Tensor, connectivity: int) -> torch.Tensor:
    if connectivity == 8:
        return F.max_pool2d(lab, 3, stride=1, padding=1)
    return torch.maximum(F.max_pool2d(lab, (1, 3), stride=1, padding=(0, 1)),
                         F.max_pool2d(lab, (3, 1), stride=1, padding=(1, 0)))


def label_components(mask: torch.Tensor, *, connectivity: int = 8, iterations: int | None = None) -> torch.Tensor:
    """Connected components of binary grids by label propagation, with no data-dependent control flow.

    Every foreground cell starts with its own label 1 + (row-major flat index); each of ``iterations`` steps
    replaces it by the largest label among itself and its foreground neighbours (a masked 3×3 max-pool, or the
    4-neighbour cross). After as many steps as the longest shortest path inside a component, every cell holds
    the component's largest starting label. That path has at most (cells − 1) steps, so the default
    ``iterations = h·w − 1`` is exact for any grid (h + w is not: a spiral needs more); on the 6×6 – 12×12
    feature grids this is 35–143 tiny max-pools.

    Args:
        mask: (B, h, w) bool (or 0/1).
        connectivity: 8 (3×3 neighbourhood, ``scipy.ndimage.label`` with a 3×3 structure) or 4 (its default).
        iterations: propagation steps (default h·w − 1).

    Returns:
        (B, h, w) float labels: 0 background, else the component's id (1 + its largest flat index).
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a (B, h, w) mask, got shape {tuple(mask.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got connectivity={connectivity}")
    _, h, w = mask.shape
    m = mask.to(torch.float32).unsqueeze(1)
    lab = m * torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w)
    for _ in range(h * w - 1 if iterations is None else iterations):
        lab = _neighbour_max(lab, connectivity) * m
    return lab[:, 0]


def largest_components(labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` largest components of a label grid and their boxes, in grid cells.

    Sizes come from a one-hot count over all possible labels; ties break towards the larger label (a unique
    integer score ``size·(P + 1) + label``, so PyTorch and ONNX TopK agree).

    Args:
        labels: (B, h, w) from :func:`label_components` (values 0 … h·w).
        n: components to return (<= h·w).

    Returns:
        boxes (B, n, 4) float ``(r0, c0, r1, c1)`` half-open cell ranges along dims 1 and 2 of ``labels``,
        sizes (B, n) cell counts, valid (B, n) bool (False where the grid has fewer than n components; those
        boxes are garbage and must be replaced by the caller).
    """
    b, h, w = labels.shape
    p = h * w
    if not 1 <= n <= p:
        raise ValueError(f"n must be in [1, h·w = {p}], got n={n}")
    flat = labels.reshape(b, p)
    ids = torch.arange(1, p + 1, dtype=labels.dtype, device=labels.device)
    onehot = (flat.unsqueeze(2) == ids).to(torch.float32)  # (B, P cells, P labels)
    sizes = onehot.sum(1)  # (B, P labels)
    top = (sizes * (p + 1) + ids).topk(n, dim=1).indices  # (B, n) label slots, largest first
    size = sizes.gather(1, top)
    member = onehot.gather(2, top.unsqueeze(1).expand(-1, p, -1)) > 0  # (B, P, n)
    cell = torch.arange(p, device=labels.device)
    rows = torch.div(cell, w, rounding_mode="floor").to(torch.float32).view(1, p, 1)
    cols = (cell % w).to(torch.float32).view(1, p, 1)
    big = float(p)
    r0 = torch.where(member, rows, big).amin(1)
    c0 = torch.where(member, cols, big).amin(1)
    r1 = torch.where(member, rows, -1.0).amax(1) + 1
    c1 = torch.where(member, cols, -1.0).amax(1) + 1
    return torch.stack([r0, c0, r1, c1], -1), size, size > 0


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear crops of boxes from a batch, resized to ``size``, with ``grid_sample`` on grids built from the
    boxes (traceable; no Python loop over boxes).

    Args:
        x: (B, C, X, Y) images (MONAI order: X along dim 2, Y along dim 3).
        boxes: (B, N, 4) ``(x0, y0, x1, y1)`` pixel edges, x along dim 2 and y along dim 3 of ``x``, half-open.
        size: (sx, sy) output size.

    Returns:
        (B·N, C, sx, sy), crop n of image b at row b·N + n; sample i sits at the centre of the i-th of ``sx``
        equal parts of [x0, x1) (``align_corners=False``; out-of-image samples repeat the border).
    """
    if x.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (B, C, X, Y) and boxes (B, N, 4), got {tuple(x.shape)} and "
                         f"{tuple(boxes.shape)}")
    _, c, nx, ny = x.shape
    n = boxes.shape[1]
    sx, sy = (int(s) for s in size)
    u = (torch.arange(sx, device=x.device, dtype=x.dtype) * 2 + 1) / sx - 1  # output centres in [-1, 1]
    v = (torch.arange(sy, device=x.device, dtype=x.dtype) * 2 + 1) / sy - 1
    x0, y0, x1, y1 = (boxes[..., i].unsqueeze(-1) for i in range(4))  # (B, N, 1)
    gx = (x0 + x1) / nx - 1 + (x1 - x0) / nx * u  # (B, N, sx): normalised coordinates along X
    gy = (y0 + y1) / ny - 1 + (y1 - y0) / ny * v  # (B, N, sy)
    # grid_sample: grid[..., 0] indexes the last input dim (Y), grid[..., 1] the one before (X)
    grid = torch.stack([gy.unsqueeze(2).expand(-1, -1, sx, -1), gx.unsqueeze(3).expand(-1, -1, -1, sy)], -1)
    src = x.unsqueeze(1).expand(-1, n, -1, -1, -1).reshape(-1, c, nx, ny)
    return F.grid_sample(src, grid.reshape(-1, sx, sy, 2), mode="bilinear", padding_mode="border",
                         align_corners=False)


INSTANCE_POOLS = ("mean", "max", "concat")
THRESHOLDS = ("mean",)


class FineGrainedMIL(nn.Module):
    """The fine-grained multi-instance classifier of Fan et al. (MICCAI 2020, Fig. 2), Embedder contract.

    1. Global branch: the input, down-sampled to ``global_size`` (bilinear), through a MONAI ResNet trunk cut
       after ``cut`` → the attention module (``attention``, default the gated module) → global average pooling →
       ``global_logits`` (Y_g).
    2. Instances: Ω (channel mean of the attended features, Eq. 2) is min–max scaled per image and thresholded
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
        attention: name in :data:`FINE_GRAINED_ATTENTIONS`; ``attention_kwargs`` go to it.
        threshold: ``"mean"`` or a float in (0, 1) on the min–max scaled Ω.
        instance_pool: ``mean``, ``max`` or ``concat``.
        embedding_dim: ``None`` (default): D = the fused feature size. An int adds a linear projection to D —
            trained only by a loss that uses ``embedding`` (``FineGrainedLoss`` does not), so leave it ``None``
            unless you add a metric term.
        widen_factor / local_widen_factor: trunk width multipliers.
        connectivity: 8 or 4 for the components.

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
                 widen_factor: float = 1.0, local_widen_factor: float | None = None, connectivity: int = 8):
        super().__init__()
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
        self.global_size = _pair(global_size, "global_size")
        self.local_size = _pair(local_size, "local_size")
        self.trunk, channels = make_backbone(backbone, spatial_dims=2, in_channels=in_channels, cut=cut,
                                             widen_factor=widen_factor)
        self.attention = create_fine_grained_attention(attention, channels, spatial_dims=2,
                                                       **(attention_kwargs or {}))
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
    def global_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, X, Y) -> (attended features (B, C', h, w), normalised Ω (B, 1, h, w), raw Ω)."""
        g = x
        if tuple(x.shape[2:]) != self.global_size:
            g = F.interpolate(x, size=self.global_size, mode="bilinear", align_corners=False)
        feats, att = self.attention(self.trunk(g))
        return feats, att, channel_mean_map(feats)

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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, X, Y) batch, got shape {tuple(x.shape)}")
        feats, att, omega = self.global_branch(x)
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
        return out


def _pair(v: Sequence[int] | int, name: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# large images: tile by tile
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def tile_predictions(model: nn.Module, image: str | os.PathLike | Any, *, tile_size: int | Sequence[int] = 512,
                     stride: int | Sequence[int] | None = None, level: int = 0, input_size: Sequence[int] | None = None,
                     transform: Callable | None = None, batch_size: int = 8, tissue_threshold: float = 0.1,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run a :class:`FineGrainedMIL` (any Embedder with ``logits``) over the tiles of a large image.

    A histology TIFF is tiled with :func:`medsim.data.histology.patch_grid` (background tiles dropped by its
    tissue rule) and read with :func:`~medsim.data.histology.patch_dataset` (only the TIFF tiles a patch touches
    are decoded); a NumPy array (H, W, C) uint8 is tiled on the same regular grid with every tile kept. Each tile
    (rows × columns) is transposed to MONAI's (C, x = column, y = row) order — the order of PIL-loaded training
    images — and preprocessed by ``transform`` (default: the bundle's eval pipeline
    ``rgb2d_transforms(input_size, load=False)``: [0, 255] → [0, 1], area resize, ImageNet normalisation).

    Args:
        model: the trained network (put in eval mode here).
        image: TIFF path or (H, W, C) array.
        tile_size: (h, w) tile in pixels of ``level`` (one int: square).
        stride: tile step (default ``tile_size``: no overlap).
        level: pyramid level to read (TIFF only).
        input_size: the model's (X, Y) input (default: the tile's (w, h), no resize).
        transform: callable on ``{"image": (C, x, y) float}`` returning the same dict (MONAI dict transform).
        batch_size: tiles per forward pass.
        tissue_threshold: TIFF tiles with a smaller tissue fraction are skipped.

    Returns:
        ``{"locations": (T, 2) level-0 (row, column) of each tile's top-left, "probabilities": (T, n_classes)
        softmax of ``logits``, "embeddings": (T, D), "attention": (T, 1, h, w), "instance_boxes": (T, N, 4)
        ``(x0, y0, x1, y1)`` in level-0 image pixels with x = column, y = row (None without boxes),
        "image_probabilities": (n_classes,) mean over tiles, "prediction": int}``. No tiles: ``ValueError``.
    """
    import numpy as np

    from medsim.data.transforms import rgb2d_transforms

    th, tw = _pair(tile_size, "tile_size")
    if isinstance(image, (str, os.PathLike)):
        from medsim.data.histology import patch_dataset, patch_grid, tiff_info

        items = patch_grid(image, (th, tw), level=level, stride=stride, tissue_threshold=tissue_threshold)
        info = tiff_info(image)
        ratio = info["downsamples"][level]
        ds = patch_dataset(items)
        tiles = ((np.asarray(ds[i]["image"]), tuple(items[i]["location"])) for i in range(len(items)))
        n_tiles = len(items)
    else:
        arr = np.asarray(image)
        if arr.ndim != 3:
            raise ValueError(f"expected an (H, W, C) image array, got shape {arr.shape}")
        sy, sx = _pair(stride if stride is not None else (th, tw), "stride")
        locs = [(r, c) for r in range(0, arr.shape[0] - th + 1, sy) for c in range(0, arr.shape[1] - tw + 1, sx)]
        ratio = 1.0
        tiles = ((np.moveaxis(arr[r:r + th, c:c + tw], -1, 0), (r, c)) for r, c in locs)
        n_tiles = len(locs)
    if not n_tiles:
        raise ValueError(f"no {th}x{tw} tiles in {image if isinstance(image, (str, os.PathLike)) else 'the array'}"
                         " (image smaller than a tile, or no tile with enough tissue)")
    size = tuple(input_size) if input_size is not None else (tw, th)
    transform = transform or rgb2d_transforms(size, train=False, load=False)
    model = model.eval().to(device)
    outs: dict[str, list] = {"locations": [], "probabilities": [], "embeddings": [], "attention": [], "boxes": []}

    def run(batch: list[torch.Tensor]) -> None:
        out = model(torch.stack(batch).to(device))
        outs["probabilities"].append(torch.softmax(out["logits"], 1).cpu())
        outs["embeddings"].append(out["embedding"].cpu())
        outs["attention"].append(out["attention"].cpu())
        if "instance_boxes" in out:
            outs["boxes"].append(out["instance_boxes"].cpu())

    batch: list[torch.Tensor] = []
    for chw, loc in tiles:  # (C, rows, cols) -> (C, x = column, y = row)
        img = transform({"image": torch.as_tensor(np.ascontiguousarray(chw.swapaxes(1, 2)), dtype=torch.float32)})
        batch.append(torch.as_tensor(img["image"]))
        outs["locations"].append(loc)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    probs = torch.cat(outs["probabilities"]).numpy()
    boxes = None
    if outs["boxes"] and outs["boxes"][0].shape[1]:
        b = torch.cat(outs["boxes"]).numpy().astype(np.float64)  # model-input pixels (x, y) of each tile
        locs = np.asarray(outs["locations"], dtype=np.float64)  # level-0 (row, column)
        fx, fy = tw / size[0] * ratio, th / size[1] * ratio  # model x -> level-0 columns, y -> rows
        boxes = b * np.array([fx, fy, fx, fy]) + np.stack([locs[:, 1], locs[:, 0]] * 2, -1)[:, None]
    mean = probs.mean(0)
    return {"locations": np.asarray(outs["locations"], dtype=np.int64), "probabilities": probs,
            "embeddings": torch.cat(outs["embeddings"]).numpy(), "attention": torch.cat(outs["attention"]).numpy(),
            "instance_boxes": boxes, "image_probabilities": mean, "prediction": int(mean.argmax())}
