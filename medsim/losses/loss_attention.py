"""The objective of loss-based attention (Shi et al., IEEE TIP 30, 2021, Eqs. 9–10): the image loss plus a
regulariser, weighted by the patch weights, that makes the selected patches share the image's class; its weight
ramps up with a Gaussian schedule.

Single-label (``mode="softmax"``, Eq. 9), over the mini-batch B::

    L = −1/|B| Σ_i [ y_iᵀ log s(z_i) + w(τ) Σ_j α_ij y_iᵀ log s(p_ij) ]

Multi-label (``mode="sigmoid"``, Eq. 10): the image term is binary cross-entropy summed over classes (Eq. 3) and
the patch term asks each selected patch to share *at least one* label with its image::

    L = 1/|B| Σ_i [ BCE(z_i, y_i) + w(τ) Σ_j α_ij · min_{k: y_ik = 1} (−log σ(p_ijk)) ]

``w(τ) = γ_max · exp(−5 (1 − T)²)`` with T rising linearly from 0 to 1 over the first ``rampup`` fraction of the
epochs, then 1 (paper: γ_max = 0.1, T over the first 80 of 200 epochs). The stored paper text lost the equation
bodies; the forms are rebuilt from its words and match the authors' released training scripts
(``cifar10_main_resnet18.py``: ``CE + u_w · Σ α·CE_patch / B``; ``loss/weight_sigmoid_loss.py``: the largest
log σ over the image's labels per patch; ``rampup``). The capsule architecture is trained with the same objective
(the paper: "z represent[s] its L-layer output in convolutional or capsule neural networks"; the authors' capsule
scripts use it too) — the paper defines no margin loss.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import nn

from medsim.losses.base import OutputsLoss

__all__ = ["LossAttentionLoss", "gaussian_rampup", "patch_ce_regulariser", "patch_bce_regulariser", "MODES"]

MODES = ("softmax", "sigmoid")


def gaussian_rampup(epoch: float, rampup_epochs: float) -> float:
    """``exp(−5 (1 − T)²)`` with ``T = clip(epoch / rampup_epochs, 0, 1)`` (1.0 when ``rampup_epochs <= 0``)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(float(epoch) / float(rampup_epochs), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def patch_ce_regulariser(patch_logits: torch.Tensor, patch_weights: torch.Tensor, labels: torch.Tensor
                         ) -> torch.Tensor:
    """Eq. 9's patch term per image: ``Σ_j α_j · CE(p_j, y)``.

    Shapes: patch_logits (B, M, K), patch_weights (B, M), labels (B,) int -> (B,).
    """
    b, m, k = patch_logits.shape
    ce = F.cross_entropy(patch_logits.reshape(b * m, k), labels.repeat_interleave(m), reduction="none")
    return (patch_weights * ce.view(b, m)).sum(1)


def patch_bce_regulariser(patch_logits: torch.Tensor, patch_weights: torch.Tensor, targets: torch.Tensor
                          ) -> torch.Tensor:
    """Eq. 10's patch term per image: ``Σ_j α_j · min_{k ∈ labels} −log σ(p_jk)`` (0 for an image without labels).

    Shapes: patch_logits (B, M, K), patch_weights (B, M), targets (B, K) multi-hot -> (B,).
    """
    nll = -F.logsigmoid(patch_logits)  # (B, M, K)
    pos = targets.bool()[:, None, :].expand_as(nll)
    best = nll.masked_fill(~pos, float("inf")).amin(-1)  # the label the patch agrees with most
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)
    return (patch_weights * best).sum(1)


class LossAttentionLoss(OutputsLoss):
    """Eq. 9 (``softmax``) or Eq. 10 (``sigmoid``) of Shi et al. for :class:`medsim.nn.loss_attention.LossAttentionNet`.

    ``takes_outputs = True``: called as ``loss(outputs, labels)`` with the network's output dict (``logits``,
    ``patch_logits``, ``patch_weights``). Labels: (B,) class indices, or for ``sigmoid`` also (B, K) multi-hot.
    ``set_epoch(epoch, max_epochs)`` (epoch from 0; the trainer calls it) sets the ramp-up; before any call the
    regulariser has its full weight γ_max.

    Args:
        mode: ``softmax`` (single-label) or ``sigmoid`` (multi-label).
        gamma_max: γ_max, the largest weight of the patch term (paper 0.1; 0 = the image loss alone, as for the
            MIL pooling baselines).
        rampup: fraction of the epochs over which T rises from 0 to 1 (paper 80 / 200 = 0.4).
    """

    required_outputs = ("logits", "patch_logits", "patch_weights")

    def __init__(self, mode: str = "softmax", gamma_max: float = 0.1, rampup: float = 0.4):
        super().__init__()
        self.mode = look_up_option(mode, MODES)
        if gamma_max < 0 or not 0 <= rampup <= 1:
            raise ValueError(f"need gamma_max >= 0 and rampup in [0, 1], got gamma_max={gamma_max}, rampup={rampup}")
        self.gamma_max, self.rampup = float(gamma_max), float(rampup)
        self.weight = self.gamma_max  # w(τ)
        self.last: dict[str, float] = {}

    def set_epoch(self, epoch: int, max_epochs: int) -> None:
        self.weight = self.gamma_max * gaussian_rampup(epoch, self.rampup * max_epochs)

    def compute_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, patch_logits, weights = outputs["logits"], outputs["patch_logits"], outputs["patch_weights"]
        b, k = logits.shape
        if patch_logits.shape[0] != b or patch_logits.shape[2] != k or weights.shape != patch_logits.shape[:2]:
            raise ValueError(f"expected patch_logits (B, M, {k}) and patch_weights (B, M) for B={b}, got "
                             f"{tuple(patch_logits.shape)} and {tuple(weights.shape)}")
        labels = labels.to(logits.device)
        if self.mode == "softmax":
            if labels.shape != (b,):
                raise ValueError(f"softmax mode expects class indices of shape ({b},), got {tuple(labels.shape)}")
            image = F.cross_entropy(logits, labels.long(), reduction="none")
            patch = patch_ce_regulariser(patch_logits, weights, labels.long())
        else:
            targets = F.one_hot(labels.long(), k).to(logits.dtype) if labels.ndim == 1 else labels.to(logits.dtype)
            if targets.shape != (b, k):
                raise ValueError(f"sigmoid mode expects labels ({b},) or multi-hot ({b}, {k}), got "
                                 f"{tuple(labels.shape)}")
            image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
            patch = patch_bce_regulariser(patch_logits, weights, targets)
        image, patch = image.mean(), patch.mean()
        self.last = {"image": float(image.detach()), "patch": float(patch.detach()), "weight": self.weight}
        return image + self.weight * patch
