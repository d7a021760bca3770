"""Label-free validation of pixel-wise anatomical embeddings (SAM, Yan et al. TMI 2022): how often the point of view 0
is found at its known partner in view 1 of the same volume.

On each validation batch of paired crops (:mod:`medsim.data.views3d`) every ``pos_0`` point is searched in view 1
by SAM's rule (:func:`medsim.ssl.sam.match_points`: the local cell of highest global + local similarity) and
compared with ``pos_1``, the exact answer. :class:`CorrespondenceMetric` reports, in voxels of view 1:

- ``mode="accuracy"``: the fraction of points found within ``tolerance`` voxels (default: the local map's stride,
  i.e. the neighbouring cells) — higher is better, the bundle's model-selection metric ``val_match``;
- ``mode="error"``: the mean distance; ``mode="median"``: the median distance.

:func:`finish_correspondence` is the bundle's finalize step: the best checkpoint on the test list, written to
``eval_test.json``.
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
from medsim.ssl.sam import match_points

__all__ = ["CorrespondenceMetric", "correspondence_errors", "finish_correspondence"]

logger = logging.getLogger(__name__)

MODES = ("accuracy", "error", "median")


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
        mode: ``"accuracy"`` (fraction within ``tolerance``), ``"error"`` (mean) or ``"median"`` distance.
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

    def compute(self) -> float:
        errors = torch.cat(self._errors) if self._errors else torch.zeros(0)
        if not len(errors):
            return float("nan")
        if self.mode == "accuracy":
            return float((errors <= self._tolerance).float().mean())
        return float(errors.mean() if self.mode == "error" else errors.median())


def finish_correspondence(output_dir: str | os.PathLike, method: torch.nn.Module, test_loader: Any,
                          device: str | torch.device, *, prepare_batch: Callable, inferer: Callable | None = None,
                          selected_by: str = "val_match") -> dict[str, float]:
    """After training: load ``best.pt``'s network (the encoder) into ``method.encoder``, find every test pair's
    points and write ``eval_test.json`` (``match`` accuracy, mean and median ``error`` in view-1 voxels, ``n_points``).
    """
    from medsim.engines.runs import load_weights

    out = Path(output_dir)
    best = out / "best.pt"
    if best.is_file():
        load_weights(method.encoder, best)
    method.eval()
    errors, tolerance = [], None
    with torch.no_grad():
        for batch in test_loader:
            views, target = prepare_batch(batch, device)
            pred = inferer(views, method) if inferer is not None else method(views)
            errors.append(correspondence_errors(pred, target).cpu())
            tolerance = float(max(pred["grid"]["local"][1][1]))
    e = torch.cat(errors)
    res = {"match": float((e <= tolerance).float().mean()), "error": float(e.mean()), "median_error":
           float(e.median()), "tolerance": tolerance, "n_points": int(len(e)), "selected_by": selected_by,
           "units": "voxels of view 1"}
    atomic_write_text(out / "eval_test.json", json.dumps(res, indent=1))
    print(f"test point matching {res['match']:.3f} within {tolerance:g} voxels, mean error {res['error']:.2f} "
          f"(best checkpoint by {selected_by}; {out})")
    return res
