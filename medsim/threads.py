"""How many CPU threads medsim's compute uses: ``--threads N`` on a command, or ``MEDSIM_THREADS``.

The value lives in one place, the ``MEDSIM_THREADS`` environment variable: :func:`set_threads` (called by the CLI's
``--threads`` option) writes it and applies it to torch; every onnxruntime session medsim opens
(:func:`medsim.runtime.runners.ort_session`) takes its intra-op thread count from :func:`configured_threads`. No
torch import here (only inside :func:`set_threads`), so ``medsim.runtime`` and ``medsim.deploy`` stay torch-free.
"""

from __future__ import annotations

import logging
import os
import sys

from medsim.errors import MedsimError

__all__ = ["THREADS_ENV", "configured_threads", "set_threads"]

THREADS_ENV = "MEDSIM_THREADS"

logger = logging.getLogger(__name__)


def configured_threads() -> int | None:
    """``MEDSIM_THREADS`` as a positive int, or None when unset (libraries then choose).

    Raises:
        MedsimError: the variable is set to something other than a positive integer.
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise MedsimError(f"{THREADS_ENV}={raw!r}: expected a positive number of threads")
    return n


def set_threads(n: int, *, torch: bool = True) -> None:
    """Use ``n`` CPU threads from now on: onnxruntime sessions opened later (through ``MEDSIM_THREADS``), OpenMP
    libraries loaded later (``OMP_NUM_THREADS``: faiss, torch) and — with ``torch=True`` — torch itself, intra-op
    and, where torch still allows it (before any parallel work), inter-op."""
    if isinstance(n, bool) or int(n) < 1:
        raise MedsimError(f"--threads expects a positive number, got {n!r}")
    n = int(n)
    os.environ[THREADS_ENV] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if not torch and "torch" not in sys.modules:
        return
    import torch as _torch

    _torch.set_num_threads(n)
    try:
        _torch.set_num_interop_threads(n)
    except RuntimeError as e:  # once per process, and only before inter-op work started
        logger.debug("torch inter-op threads stay %d (%s)", _torch.get_num_interop_threads(), e)
