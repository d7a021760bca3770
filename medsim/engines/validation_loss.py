"""A self-supervised method's own loss on held-out volumes: the label-free, cheap model-selection signal of the BYOL /
PGL bundles (``bundles/ct_pgl``).

BYOL-style losses (Grill et al. 2020; PGL, Xie et al. 2020) regress the online prediction of one view onto the EMA
target's projection of the other. On validation pairs (the same pairs every epoch with :class:`FixedDraws`; the method
in eval mode: no EMA step, BatchNorm on its running statistics) a lower loss means the online network predicts the target's representation of unseen
volumes better. It is a moving reference (the target changes as training goes), so it is a heuristic for choosing
an epoch, not a measure of downstream quality (that is the segmentation benchmark's job); it costs one forward pass of
the validation pairs per epoch.

:class:`ValidationLoss` is an ignite ``Metric`` for MONAI's ``SupervisedEvaluator`` (``val_loss`` and, with
``term=``, one term of a loss that records them in ``last``, e.g. PGL's ``global`` / ``local``).
:func:`finish_validation_loss` is the bundles' finalize step: the selected checkpoint's loss on the test volumes,
written to ``eval_test.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.metrics import Metric

from medsim.errors import atomic_write_text

__all__ = ["ValidationLoss", "FixedDraws", "finish_validation_loss"]

logger = logging.getLogger(__name__)


def _pred_target(o: Mapping[str, Any]) -> tuple[Any, Any]:
    return o["pred"], o["label"]


def _batch_size(pred: Mapping[str, Any]) -> int:
    first = next(v for v in pred.values() if isinstance(v, (list, tuple)) and v and torch.is_tensor(v[0]))
    return int(first[0].shape[0])


class ValidationLoss(Metric):
    """The mean over validation items of ``loss(pred, target)`` (or of ``loss.last[term]``), each batch weighted
    by its size.

    Args:
        loss: the training loss object (called without gradients).
        term: ``None`` for the total, else a key of ``loss.last`` after each call.
    """

    def __init__(self, loss: Callable[..., torch.Tensor], term: str | None = None,
                 output_transform: Callable = _pred_target):
        self.loss, self.term = loss, term
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._sum, self._n = 0.0, 0

    def update(self, output: tuple[Mapping[str, Any], Any]) -> None:
        pred, target = output
        with torch.no_grad():
            value = self.loss(pred, target)
        if self.term is not None:
            last = getattr(self.loss, "last", {})
            if self.term not in last:
                raise KeyError(f"{type(self.loss).__name__} records no term '{self.term}' (has {sorted(last)})")
            value = last[self.term]
        n = _batch_size(pred)
        self._sum += float(value) * n
        self._n += n

    def compute(self) -> float:
        return self._sum / self._n if self._n else float("nan")


class FixedDraws:
    """Reseed a random transform at the start of every run of an engine (a MONAI ``val_handlers`` entry), so that each
    validation sees the same random draws (the same crop pairs): epochs are then compared on the same pairs.

    Args:
        transform: the validation dataset's random transform (``set_random_state``).
        seed: its seed at the start of every validation.
    """

    def __init__(self, transform: Any, seed: int = 0):
        self.transform, self.seed = transform, int(seed)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reseed)

    def reseed(self, engine: Any = None) -> None:
        self.transform.set_random_state(seed=self.seed % 2**32)


def finish_validation_loss(output_dir: str | os.PathLike, method: torch.nn.Module, test_loader: Any,
                           device: str | torch.device, *, prepare_batch: Callable, loss: Callable[..., torch.Tensor],
                           inferer: Callable | None = None, state_key: str = "ssl",
                           selected_by: str = "val_loss") -> dict[str, Any]:
    """After training: load the selected checkpoint (``best.pt``, else ``last.pt``) into ``method`` (its
    ``state_key`` entry: encoder, heads and target), compute the loss (and its ``last`` terms) over the test
    pairs and write ``eval_test.json``."""
    from medsim.engines.runs import load_checkpoint

    out = Path(output_dir)
    ckpt = next((out / n for n in ("best.pt", "last.pt") if (out / n).is_file()), None)
    if ckpt is not None:
        method.load_state_dict(load_checkpoint(ckpt)[state_key])
    method.eval()
    total, terms, n = 0.0, {}, 0
    with torch.no_grad():
        for batch in test_loader:
            views, target = prepare_batch(batch, device)
            pred = inferer(views, method) if inferer is not None else method(views)
            b = _batch_size(pred)
            total += float(loss(pred, target)) * b
            for k, v in getattr(loss, "last", {}).items():
                terms[k] = terms.get(k, 0.0) + float(v) * b
            n += b
    res = {"loss": total / max(n, 1), **{k: v / max(n, 1) for k, v in terms.items()}, "n_items": n,
           "checkpoint": ckpt.name if ckpt else None, "selected_by": selected_by}
    atomic_write_text(out / "eval_test.json", json.dumps(res, indent=1))
    print(f"test loss {res['loss']:.4f} of the checkpoint selected by {selected_by} ({out})")
    return res
