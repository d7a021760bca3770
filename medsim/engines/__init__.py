"""medsim.engines: MONAI ``SupervisedTrainer`` parts for embedders — prepare_batch functions and the loss adapter,
method-independent handlers (seeding, epoch record + model selection, checkpoints, metrics log), the bf16 inferer,
and DSL/MML's subspace learners."""

from medsim.engines.batches import BatchLoss, metric_prepare_batch, views_prepare_batch
from medsim.engines.handlers import (Checkpointer, EpochRecorder, MetricsLogger, RNGState, TrainingHooks,
                                     atomic_torch_save)
from medsim.engines.sampling import ClusterBatchSampler, ShuffleBatchSampler
from medsim.engines.subspaces import SubspaceState, equal_slices, neuron_scores, split_learner
from medsim.engines.trainer import (AttentionSpread, EmbeddingMetric, PrecisionInferer, SubspaceHandler,
                                    SubspaceRoutingLoss)

__all__ = ["BatchLoss", "metric_prepare_batch", "views_prepare_batch", "Checkpointer", "EpochRecorder",
           "MetricsLogger", "RNGState", "TrainingHooks", "atomic_torch_save", "ClusterBatchSampler", "ShuffleBatchSampler", "SubspaceState",
           "equal_slices", "neuron_scores", "split_learner", "EmbeddingMetric", "AttentionSpread",
           "PrecisionInferer", "SubspaceHandler", "SubspaceRoutingLoss"]
