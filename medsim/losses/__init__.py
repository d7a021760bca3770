"""medsim.losses: metric-learning losses. Standard ones come from pytorch-metric-learning; only new ones are
written here (see :mod:`medsim.losses.metric_losses`)."""

from medsim.losses.metric_losses import LOSSES, ClassificationLoss, MetricLoss, make_loss

__all__ = ["LOSSES", "ClassificationLoss", "MetricLoss", "make_loss"]
