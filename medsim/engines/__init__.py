"""medsim.engines: MONAI/ignite engines and handlers for metric learning (MML, DSL, baselines)."""

from medsim.engines.sampling import ClusterBatchSampler
from medsim.engines.subspaces import SubspaceState, equal_slices, neuron_scores, split_learner
from medsim.engines.trainer import (Checkpointer, EmbeddingMetric, MetricLearningTrainer, MetricsLogger,
                                    PrecisionInferer, RNGState, SubspaceHandler, SubspaceRoutingLoss, atomic_torch_save,
                                    metric_prepare_batch)

__all__ = ["ClusterBatchSampler", "SubspaceState", "equal_slices", "neuron_scores", "split_learner", "Checkpointer",
           "EmbeddingMetric", "MetricLearningTrainer", "MetricsLogger", "PrecisionInferer", "RNGState", "SubspaceHandler",
           "SubspaceRoutingLoss", "metric_prepare_batch", "atomic_torch_save"]
