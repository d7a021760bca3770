"""Collective operations between the processes of a data-parallel run (``torch.distributed``), for the layers
below the engines: the models and methods that keep cross-batch state (MoCo's queue) and the engines' DSL steps.

Every function is the identity (or a no-op) in a single process, so the same code runs with and without
``torchrun``. The engine side (process group, samplers, DDP, handlers) is :mod:`medsim.engines.distributed`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "gather_batch", "broadcast_object",
           "broadcast_module", "all_reduce_sum", "shard"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes checkpoints, logs and run records."""
    return rank() == 0


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` (B_r, ...) concatenated on dim 0 in rank order (``x`` itself in one process). A tensor
    that needs a gradient keeps it (``torch.distributed.nn.functional.all_gather``: the backward sums every rank's
    gradient for each rank's slice)."""
    if not is_distributed():
        return x
    if x.requires_grad:
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # torch 2.13 marks it deprecated in favour of a private API; it is exact
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled by ``torch.distributed`` between this run's own processes;
    nothing read from disk)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` from rank ``src`` (e.g. after rank 0 re-initialised neurons)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (a copy; ``x`` itself in one process)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items`` (every world-size-th, starting at its rank); all of them in one process."""
    return list(items)[rank()::world_size()]
