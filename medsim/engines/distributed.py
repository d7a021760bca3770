"""Data-parallel training on several processes (``torchrun``), equal to one process with the global batch.

medsim grows onto PyTorch's own machinery: ``torch.distributed`` (gloo on CPU, NCCL on GPUs), ``torchrun``'s
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and
``DistributedDataParallel``. What this module adds is what the methods need to stay *the same method* on N
processes — each process sees 1/N of every batch, yet the loss, the gradient, the DSL decisions and the
checkpoints are those of one process that sees the whole batch:

- :class:`RankBatchSampler` — wraps a batch sampler that draws *global* batches (e.g. the class-balanced,
  one-cluster-at-a-time :class:`~medsim.engines.sampling.ClusterBatchSampler`, seeded per epoch, so every rank draws
  the same sequence) and gives rank r the r-th contiguous slice of each. A class-balanced batch stays class-balanced
  globally, and every rank trains the same DSL learner at the same step.
- :class:`GlobalBatchLoss` — gathers the network outputs and the targets of all ranks in rank order with autograd
  (``torch.distributed.nn.functional.all_gather``: its backward sums every rank's gradient for each slice), then
  computes the wrapped loss on the global batch. Pairs, triplets and negatives span ranks, as
  pytorch-metric-learning's ``DistributedLossWrapper`` does; here the loss value is the global-batch value itself
  (the backward of the gather brings each slice ``world_size`` gradient copies, which DDP's averaging divides back).
- :class:`RankZeroValidation` — validation runs on rank 0 only (the full validation set, one process) and its
  metrics are broadcast, so model selection and DSL's plateau rule see the same numbers everywhere.
- the collectives of :mod:`medsim.nn.collectives` (re-exported here) — for the decisions made on rank 0 (DSL's
  re-clustering and split) and the state every rank must then share.

Everything is a no-op in a single process, so the same bundle code runs with and without ``torchrun``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from medsim.nn.collectives import (all_reduce_sum, broadcast_module, broadcast_object, gather_batch, is_distributed,
                                   is_main_process, rank, shard, world_size)

__all__ = ["DistInfo", "init_distributed", "is_distributed", "rank", "world_size", "is_main_process", "unwrap",
           "wrap_ddp", "RankBatchSampler", "GlobalBatchLoss", "RankZeroValidation", "broadcast_object",
           "broadcast_module", "all_reduce_sum", "barrier", "finalize_distributed", "launched_by_torchrun",
           "launch_rank", "shard"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world``, ``local_rank`` on its node, and its ``device``."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` (``torch.distributed.run``) started with more than one worker."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ










def launch_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 without torchrun) — valid before the process group
    exists and after it is destroyed."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group ``torchrun`` set up (idempotent); a single process without ``torchrun`` gets
    ``DistInfo(0, 1, 0, cuda:0 or cpu, "none")``.

    ``backend="auto"``: NCCL when CUDA is available, gloo otherwise (CPU). Each rank uses ``cuda:LOCAL_RANK``.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, device, "none")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, dist.get_backend())


def finalize_distributed() -> None:
    """Leave the process group (after a last barrier, so rank 0's final writes are done before anyone exits)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the network itself otherwise)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def wrap_ddp(network: torch.nn.Module, *, sync_batchnorm: bool = False, find_unused_parameters: bool = True
             ) -> torch.nn.Module:
    """``network`` in ``DistributedDataParallel`` (unchanged in a single process).

    ``sync_batchnorm``: BatchNorm statistics over the global batch (``torch.nn.SyncBatchNorm``), which
    batch-statistics SSL methods need to stay the one-process method. The conversion swaps modules *inside*
    ``network`` in place of its BatchNorm layers, so the optimiser (built on the same parameters) still holds them.
    ``find_unused_parameters``: DSL/MML route a batch through one learner's slice; heads unused by a loss
    (e.g. a classifier head in a metric run) get no gradient.
    """
    if not is_distributed():
        return network
    device = next(network.parameters()).device
    if sync_batchnorm and device.type != "cuda":
        logger.warning("sync_batchnorm: torch.nn.SyncBatchNorm runs on CUDA devices only (PyTorch %s), so on CPU each "
                       "process normalises with its own share of the batch (freeze_bn=true gives one-process "
                       "results exactly)", torch.__version__)
    elif sync_batchnorm:
        for name, child in list(network.named_children()):
            setattr(network, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids,
                                                     find_unused_parameters=find_unused_parameters)


class RankBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Rank r's contiguous slice of each global batch of ``batch_sampler`` (every rank draws the same global
    batches: the wrapped sampler must be seeded identically on every rank, as ``ClusterBatchSampler`` is).

    Raises:
        ValueError: a global batch does not divide evenly between the ranks (the gathered loss needs equal slices).
    """

    def __init__(self, batch_sampler: Any, rank_: int | None = None, world: int | None = None):
        self.batch_sampler = batch_sampler
        self.rank = rank() if rank_ is None else int(rank_)
        self.world = world_size() if world is None else int(world)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            if len(batch) % self.world:
                raise ValueError(f"a global batch of {len(batch)} items does not divide between {self.world} "
                                 "processes: set batch_size to a multiple of the number of processes")
            part = len(batch) // self.world
            yield list(batch[self.rank * part:(self.rank + 1) * part])

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str) -> Any:  # the wrapped sampler's attributes (labels, assignment, ...)
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def _gather(x: Any, shared: Sequence[str] = ()) -> Any:
    """All ranks' batch entries of ``x`` (tensors, nested in mappings / lists) concatenated in rank order; mapping
    entries named in ``shared`` (model state such as MoCo's ``queue``, the same on every rank) are kept as they are."""
    if torch.is_tensor(x) and x.ndim >= 1:
        return gather_batch(x)
    if isinstance(x, Mapping):
        return {k: v if k in shared else _gather(v, shared) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_gather(v, shared) for v in x)
    return x


class GlobalBatchLoss(torch.nn.Module):
    """MONAI ``loss_function(pred, target)`` on the global batch: ``pred`` (the network's output dict, or a list of
    view outputs) and ``target`` (labels, dataset indices, …) of every rank are gathered in rank order — with
    autograd for the outputs — and ``loss`` is called once on the result. In one process it is ``loss`` itself.

    The wrapped loss's own state (``set_epoch``, checkpointed state) is reached through ``routed``/attributes, so
    :class:`~medsim.engines.handlers.TrainingHooks` and the Checkpointer treat it as the loss it wraps. Output
    entries named in ``shared`` are model state, not batch rows (MoCo's ``queue``: every rank holds the same one,
    since the method enqueues the gathered keys), and pass unchanged.
    """

    def __init__(self, loss: torch.nn.Module, shared: Sequence[str] = ("queue",)):
        super().__init__()
        self.loss = loss
        self.shared = tuple(shared)

    def forward(self, pred: Any, target: Any) -> torch.Tensor:
        if not is_distributed():
            return self.loss(pred, target)
        return self.loss(_gather(pred, self.shared), _gather(target, self.shared))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("loss"), name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # the same checkpoint as one process
        return self.loss.state_dict(*args, **kwargs)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        return self.loss.load_state_dict(state, strict=strict)








class RankZeroValidation:
    """MONAI's ``ValidationHandler`` for several processes: at the end of every ``interval``-th epoch rank 0 runs
    ``validator`` on the whole validation set (on the unwrapped network the validator holds) and every rank gets
    its metrics, so the :class:`~medsim.engines.handlers.EpochRecorder`, model selection and DSL's plateau rule
    agree. In one process it is plain validation."""

    def __init__(self, validator: Engine, interval: int = 1, epoch_level: bool = True):
        if not epoch_level:
            raise ValueError("RankZeroValidation validates at epoch level only")
        self.validator, self.interval = validator, int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if is_main_process():
            self.validator.run()
            metrics = dict(self.validator.state.metrics)
        else:
            metrics = None
        metrics = broadcast_object(metrics)
        if not is_main_process():
            self.validator.state.metrics = metrics

