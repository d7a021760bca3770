"""medsim.losses: metric-learning losses. Standard ones come from pytorch-metric-learning; only new ones are
written here: the subspace-routed PML losses (:mod:`~medsim.losses.metric_losses`), ABE's divergence
(:mod:`~medsim.losses.divergence`), the gated-attention fusion objective (:mod:`~medsim.losses.fine_grained`) and
the loss-based attention objective (:mod:`~medsim.losses.loss_attention`)."""

from medsim.losses.base import EmbeddingLoss, OutputsLoss
from medsim.losses.divergence import ABELoss, divergence_loss
from medsim.losses.fine_grained import FineGrainedLoss
from medsim.losses.loss_attention import LossAttentionLoss
from medsim.losses.metric_losses import ClassificationLoss, CombinedLoss, MetricLoss

__all__ = ["EmbeddingLoss", "OutputsLoss", "ClassificationLoss", "CombinedLoss", "MetricLoss", "ABELoss",
           "divergence_loss", "FineGrainedLoss", "LossAttentionLoss"]
