"""The multi-task loss of gated-attention fine-grained classification (Fan et al., "Microscopic fine-grained
instance classification through deep attention", MICCAI 2020, Sec. 2.2 and 3):

    L = λ · CE(Y_g, Y*) + (1 − λ) · CE(Y_f, Y*)                                          (Eq. 3)

with Y_g the global image-level prediction and Y_f the fused global + instance prediction. "The initial weight
score λ in the loss function is 1, and reduced by 0.1 after every 20 training epochs" (Sec. 3), so the network
first learns global features (and with them the attention that picks the instances) and hands weight to the
instance-level fusion as training goes on.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medsim.losses.base import OutputsLoss

__all__ = ["lambda_schedule", "FineGrainedLoss"]


def lambda_schedule(epoch: int, max_epochs: int | None = None, *, step_epochs: float | None = 20,
                    decay: float = 0.1, initial: float = 1.0, min_lambda: float = 0.0) -> float:
    """λ at ``epoch`` (counted from 0): ``max(min_lambda, initial − decay · ⌊epoch / step⌋)``.

    ``step_epochs=20`` is the paper's schedule (1.0 for epochs 0–19, 0.9 for 20–39, …). ``step_epochs=None``
    compresses it to the run's length, step = ``max_epochs / 10``: ten equal phases, λ = 1.0, 0.9, …, 0.1 (e.g.
    for 6 epochs: 1.0, 0.9, 0.7, 0.5, 0.4, 0.2) — short CPU runs otherwise never leave λ = 1 and never train the
    fusion head.
    """
    if epoch < 0:
        raise ValueError(f"epoch counts from 0, got epoch={epoch}")
    if step_epochs is None:
        if not max_epochs or max_epochs < 1:
            raise ValueError(f"step_epochs=None scales the schedule to the run and needs max_epochs >= 1, got "
                             f"max_epochs={max_epochs}")
        phase = (10 * epoch) // max_epochs  # ⌊epoch / (max_epochs / 10)⌋ in exact integers
    elif step_epochs <= 0:
        raise ValueError(f"step_epochs must be > 0 (or None), got step_epochs={step_epochs}")
    else:
        phase = int(epoch // step_epochs)
    return round(max(float(min_lambda), float(initial) - float(decay) * phase), 12)


class FineGrainedLoss(OutputsLoss):
    """Eq. 3: λ · CE(``global_logits``) + (1 − λ) · CE(``logits``), λ set per epoch by :meth:`set_epoch`.

    Called through :class:`medsim.engines.BatchLoss` (or DSL's routing loss) as ``loss(outputs, labels)``
    (``takes_outputs``)
    with the output dict of :class:`medsim.nn.gated_attention.FineGrainedMIL`; the trainer calls
    ``set_epoch(epoch_from_0, max_epochs)`` at each epoch start. Before any ``set_epoch`` λ = ``initial``.

    Args:
        step_epochs: epochs per decay step (20 in the paper); ``None``: max_epochs / 10 (see
            :func:`lambda_schedule`).
        decay: λ decrement per step (0.1 in the paper).
        initial: λ at epoch 0 (1 in the paper).
        min_lambda: floor of λ.
        fixed_lambda: if set, λ stays at this value (``set_epoch`` is ignored) — ablations.

    Shapes: outputs["global_logits"], outputs["logits"] (B, n_classes); labels (B,) -> scalar.
    """

    required_outputs = ("global_logits", "logits")

    def __init__(self, *, step_epochs: float | None = 20, decay: float = 0.1, initial: float = 1.0,
                 min_lambda: float = 0.0, fixed_lambda: float | None = None):
        super().__init__()
        for name, v in (("initial", initial), ("min_lambda", min_lambda), ("fixed_lambda", fixed_lambda)):
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {name}={v}")
        self.step_epochs, self.decay, self.initial, self.min_lambda = step_epochs, decay, initial, min_lambda
        self.fixed_lambda = fixed_lambda
        self.lam = float(initial if fixed_lambda is None else fixed_lambda)

    def set_epoch(self, epoch: int, max_epochs: int | None = None) -> None:
        if self.fixed_lambda is None:
            self.lam = lambda_schedule(epoch, max_epochs, step_epochs=self.step_epochs, decay=self.decay,
                                       initial=self.initial, min_lambda=self.min_lambda)

    def compute_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        g, f = outputs["global_logits"], outputs["logits"]
        if g.ndim != 2 or g.shape != f.shape or labels.shape != g.shape[:1]:
            raise ValueError(f"expected global_logits and logits (B, n_classes) and labels (B,), got "
                             f"{tuple(g.shape)}, {tuple(f.shape)} and {tuple(labels.shape)}")
        labels = labels.long()
        loss = self.lam * F.cross_entropy(g, labels)
        if self.lam < 1.0:  # at λ = 1 the fusion term is skipped (and gets no gradient), as Eq. 3 gives
            loss = loss + (1.0 - self.lam) * F.cross_entropy(f, labels)
        return loss

    def extra_repr(self) -> str:
        return f"lambda={self.lam:g}, step_epochs={self.step_epochs}, decay={self.decay}"
