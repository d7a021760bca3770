"""Label-free validation of pixel-wise anatomical embeddings (SAM, Yan et al. TMI 2022): how often the point of view 0
is found at its known partner in view 1 of the same volume.

On each validation batch of paired crops (:mod:`medsim.data.views3d`) every ``pos_0`` point is searched in view 1
by SAM's rule (:func:`medsim.ssl.sam.match_points`: the local cell of highest global + local similarity) and
compared with ``pos_1``, the exact answer. :class:`CorrespondenceMetric` reports, in voxels of view 1:

- ``mode="accuracy"``: the fraction of points found within ``tolerance`` voxels (default: the local map's stride,
  i.e. the neighbouring cells) — higher is better, the bundle's model-selection metric ``val_match``;
- ``mode="error"``: the mean distance; ``mode="median"``: the median distance;
- ``mode="all"``: all three with the tolerance and the number of points (the test report's numbers).

:func:`finish_correspondence` is the bundle's finalize step: the best checkpoint on the test pairs, written to
``eval_test.json`` / ``.md`` (:func:`medsim.engines.view_pairs.finish_pairs`, which ``medsim evaluate`` runs too).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from ignite.metrics import Metric

from medsim.ssl.sam import match_points

if TYPE_CHECKING:
    from medsim.engines.view_pairs import FixedDraws

__all__ = ["CorrespondenceMetric", "correspondence_errors", "finish_correspondence"]

logger = logging.getLogger(__name__)

MODES = ("accuracy", "error", "median", "all")
#: the key of each single-number mode in the ``"all"`` summary
_SUMMARY_KEY = {"accuracy": "match", "error": "error", "median": "median_error"}


def _pred_target(o: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    return o["pred"], o["label"]


@torch.no_grad()
def correspondence_errors(pred: Mapping[str, Any], target: Mapping[str, Any], *, use_global: bool = True
                          ) -> torch.Tensor:
    """(B·P,) distance in view-1 voxels between the point found for each ``pos_0`` (SAM's rule) and ``pos_1``."""
    found = match_points(pred, target["pos_0"].float(), use_global=use_global)
    return (found - target["pos_1"].float()).norm(dim=-1).flatten()


class CorrespondenceMetric(Metric):
    """Point-finding accuracy / error between the two views of validation batches (module docstring); an ignite
    ``Metric`` for MONAI's ``SupervisedEvaluator`` (network: :class:`medsim.ssl.SAM`, prepare_batch:
    ``views_prepare_batch``).

    Args:
        mode: ``"accuracy"`` (fraction within ``tolerance``), ``"error"`` (mean) or ``"median"`` distance, or
            ``"all"``: ``{"match", "error", "median_error", "tolerance", "n_points"}``.
        tolerance: voxels of view 1; default the local map's largest stride.
    """

    def __init__(self, mode: str = "accuracy", tolerance: float | None = None,
                 output_transform: Callable = _pred_target):
        from monai.utils import look_up_option

        self.mode, self.tolerance = look_up_option(mode, MODES), tolerance
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._errors: list[torch.Tensor] = []
        self._tolerance = self.tolerance

    def update(self, output: tuple[Mapping[str, Any], Mapping[str, Any]]) -> None:
        pred, target = output
        self._errors.append(correspondence_errors(pred, target).cpu())
        if self._tolerance is None:
            self._tolerance = float(max(pred["grid"]["local"][1][1]))

    def compute(self) -> float | dict[str, Any]:
        errors = torch.cat(self._errors) if self._errors else torch.zeros(0)
        nan = float("nan")
        summary = {"match": float((errors <= self._tolerance).float().mean()) if len(errors) else nan,
                   "error": float(errors.mean()) if len(errors) else nan,
                   "median_error": float(errors.median()) if len(errors) else nan,
                   "tolerance": self._tolerance, "n_points": int(len(errors))}
        return summary if self.mode == "all" else summary[_SUMMARY_KEY[self.mode]]


def finish_correspondence(output_dir: str | os.PathLike, method: torch.nn.Module, test_loader: Any,
                          device: str | torch.device, *, prepare_batch: Callable, inferer: Callable | None = None,
                          draws: FixedDraws | None = None, selected_by: str = "val_match") -> dict[str, Any]:
    """After training: load ``best.pt`` (else ``last.pt``) into ``method``, find every test pair's points (the
    pairs reseeded by ``draws``, a :class:`~medsim.engines.view_pairs.FixedDraws`, as ``medsim evaluate`` draws
    them) and write ``eval_test.json`` / ``.md``: ``match`` accuracy, mean and median ``error`` in view-1 voxels,
    ``tolerance``, ``n_points``."""
    from medsim.nn.collectives import is_main_process

    if not is_main_process():  # several processes: rank 0 evaluates and writes; the others wait at the barrier
        return {}
    from medsim.engines.view_pairs import evaluation_metrics, finish_pairs

    out = Path(output_dir)
    ckpt = next((out / n for n in ("best.pt", "last.pt") if (out / n).is_file()), None)
    res = finish_pairs(out, method, test_loader, device, evaluation_metrics("correspondence"), checkpoint=ckpt,
                       prepare_batch=prepare_batch, inferer=inferer, draws=draws, selected_by=selected_by)
    print(f"test point matching {res['match']:.3f} within {res['tolerance']:g} voxels, mean error "
          f"{res['error']:.2f} voxels of view 1 (checkpoint selected by {selected_by}; {out})")
    return res
