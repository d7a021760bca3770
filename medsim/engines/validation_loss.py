"""A self-supervised method's own loss on held-out volumes: the label-free, cheap model-selection signal of the BYOL /
PGL bundles (``bundles/ct_pgl``).

BYOL-style losses (Grill et al. 2020; PGL, Xie et al. 2020) regress the online prediction of one view onto the EMA
target's projection of the other. On validation pairs (the same pairs every epoch with :class:`FixedDraws`; the method
in eval mode: no EMA step, BatchNorm on its running statistics) a lower loss means the online network predicts the target's representation of unseen
volumes better. It is a moving reference (the target changes as training goes), so it is a heuristic for choosing
an epoch, not a measure of downstream quality (that is the segmentation benchmark's job); it costs one forward pass of
the validation pairs per epoch.

:class:`ValidationLoss` is an ignite ``Metric`` for MONAI's ``SupervisedEvaluator`` (``val_loss`` and, with
``term=``, one term of a loss that records them in ``last``, e.g. PGL's ``global`` / ``local``; ``term="all"``:
the total and every term). :func:`finish_validation_loss` is the bundles' finalize step: the selected checkpoint's
loss on the test volumes, written to ``eval_test.json`` / ``.md`` (:func:`medsim.engines.view_pairs.finish_pairs`,
which ``medsim evaluate`` runs too). :class:`FixedDraws` lives in :mod:`medsim.engines.view_pairs`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.metrics import Metric

from medsim.engines.view_pairs import FixedDraws

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
        term: ``None`` for the total, a key of ``loss.last`` after each call, or ``"all"``: ``{"loss": total,
            **terms, "n_items"}``.
    """

    def __init__(self, loss: Callable[..., torch.Tensor], term: str | None = None,
                 output_transform: Callable = _pred_target):
        self.loss, self.term = loss, term
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0

    def update(self, output: tuple[Mapping[str, Any], Any]) -> None:
        pred, target = output
        with torch.no_grad():
            value = self.loss(pred, target)
        last = getattr(self.loss, "last", {})
        if self.term not in (None, "all") and self.term not in last:
            raise KeyError(f"{type(self.loss).__name__} records no term '{self.term}' (has {sorted(last)})")
        n = _batch_size(pred)
        for k, v in {"loss": value, **last}.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v) * n
        self._n += n

    def compute(self) -> float | dict[str, Any]:
        means = {k: v / self._n for k, v in self._sums.items()} if self._n else {"loss": float("nan")}
        if self.term == "all":
            return {**means, "n_items": self._n}
        return means.get(self.term or "loss", float("nan"))


def finish_validation_loss(output_dir: str | os.PathLike, method: torch.nn.Module, test_loader: Any,
                           device: str | torch.device, *, prepare_batch: Callable, loss: Callable[..., torch.Tensor],
                           inferer: Callable | None = None, draws: FixedDraws | None = None, state_key: str = "ssl",
                           selected_by: str = "val_loss") -> dict[str, Any]:
    """After training: load the selected checkpoint (``best.pt``, else ``last.pt``) into ``method`` (its
    ``state_key`` entry: encoder, heads and target), compute the loss (and its ``last`` terms) over the test
    pairs (reseeded by ``draws``, as ``medsim evaluate`` draws them) and write ``eval_test.json`` / ``.md``."""
    from medsim.nn.collectives import is_main_process

    if not is_main_process():  # several processes: rank 0 evaluates and writes; the others wait at the barrier
        return {}
    from medsim.engines.view_pairs import evaluation_metrics, finish_pairs

    out = Path(output_dir)
    ckpt = next((out / n for n in ("best.pt", "last.pt") if (out / n).is_file()), None)
    res = finish_pairs(out, method, test_loader, device, evaluation_metrics("validation_loss", loss),
                       checkpoint=ckpt, prepare_batch=prepare_batch, inferer=inferer, draws=draws,
                       selected_by=selected_by, state_key=state_key)
    print(f"test loss {res['loss']:.4f} of the checkpoint selected by {selected_by} ({out})")
    return res
