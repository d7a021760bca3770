"""The two loss contracts of medsim, with their input checks written once (pytorch-metric-learning's
``BaseMetricLossFunction`` habit: a subclass writes only ``compute_loss``).

- :class:`EmbeddingLoss`: ``loss(embedding (B, D), labels (B,), logits (B, C) | None) -> scalar``. The trainer
  routes any embedding subspace (a DSL / MML learner's slice) through it.
- :class:`OutputsLoss`: ``loss(outputs: dict, labels) -> scalar`` for objectives that need more of the model's
  output than one embedding (ABE's learner embeddings, gated attention's two logits, loss-attention's patch logits);
  ``takes_outputs = True`` tells the trainer, and ``required_outputs`` names the keys checked here.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["EmbeddingLoss", "OutputsLoss"]


class EmbeddingLoss(nn.Module):
    """Base of the losses on one embedding. Subclasses implement :meth:`compute_loss` on checked inputs."""

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
                ) -> torch.Tensor:
        if embedding.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embedding.shape[0]:
            raise ValueError(f"expected embedding (B, D) and labels (B,), got {tuple(embedding.shape)} and "
                             f"{tuple(labels.shape)}")
        if logits is not None and (logits.ndim != 2 or logits.shape[0] != embedding.shape[0]):
            raise ValueError(f"expected logits (B, C) for B={embedding.shape[0]}, got {tuple(logits.shape)}")
        return self.compute_loss(embedding, labels, logits)

    def compute_loss(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
                     ) -> torch.Tensor:
        raise NotImplementedError


class OutputsLoss(nn.Module):
    """Base of the losses on a model's output dict: checks that ``required_outputs`` are there and that the labels
    have one row per sample, then calls :meth:`compute_loss`."""

    takes_outputs = True
    #: output keys this objective reads (checked before compute_loss)
    required_outputs: tuple[str, ...] = ()

    def forward(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        missing = [k for k in self.required_outputs if k not in outputs]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the model outputs {list(self.required_outputs)}; "
                             f"missing {missing} (got keys {sorted(outputs)})")
        b = outputs[self.required_outputs[0]].shape[0] if self.required_outputs else labels.shape[0]
        if labels.ndim == 0 or labels.shape[0] != b:
            raise ValueError(f"expected labels with one row per sample (B={b}), got {tuple(labels.shape)}")
        return self.compute_loss(outputs, labels)

    def compute_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
