"""What MONAI's ``SupervisedTrainer`` feeds the network and the loss: ``prepare_batch`` functions and the loss
adapter.

A ``prepare_batch`` turns the collated batch dict into ``(inputs, target)``; the trainer then calls
``inferer(inputs, network)`` and ``loss_function(pred, target)``.

- :func:`metric_prepare_batch` — one view: ``inputs`` = ``image`` (B, C, *spatial); ``target`` = ``{"label",
  "index"}`` (labels for the metric loss, dataset indices for DSL's cluster lookup).
- :func:`views_prepare_batch` — several views of each item (two-view SSL, multi-crop with views of different
  sizes, 3-D crops with their correspondences): ``inputs`` = the list of views, each (B, C, *spatial_v);
  ``target`` = every other tensor of the batch (labels, indices, crop boxes / overlap coordinates, patient ids
  hashed upstream), on the device.
- :class:`BatchLoss` — wraps a medsim loss (``EmbeddingLoss``: ``loss(embedding, labels, logits)``, or
  ``OutputsLoss``: ``loss(outputs, labels)``) as MONAI's ``loss_function(pred, target)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["metric_prepare_batch", "views_prepare_batch", "BatchLoss"]


def _to(x: Any, device: str | torch.device | None, non_blocking: bool, **kwargs: Any) -> Any:
    return x.to(device=device, non_blocking=non_blocking, **kwargs) if torch.is_tensor(x) else x


def metric_prepare_batch(batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                         non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """MONAI ``prepare_batch`` for one view: ``(image, {"label", "index"})``.

    The target carries the batch's item indices next to the labels, so DSL's routing loss
    (:class:`~medsim.engines.SubspaceRoutingLoss`) can look up the batch's cluster."""
    x = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
    y = torch.as_tensor(batchdata["label"]).to(device=device, non_blocking=non_blocking)
    index = batchdata.get("index")
    return x, {"label": y, "index": None if index is None else torch.as_tensor(index)}


def views_prepare_batch(batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                        non_blocking: bool = False, *, views_key: str = "views",
                        **kwargs: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """MONAI ``prepare_batch`` for multi-view items: ``([view_1, …, view_V], target)``.

    ``batchdata[views_key]`` is the collated list of views (a dataset item holds a list of V tensors; MONAI's
    collate makes it a list of V batches). Views may differ in size (multi-crop: 2 global + n local crops) but each
    view is one batch (B, C, *spatial_v). Every other entry that is a tensor (or a list of tensors, e.g. one crop box
    per view) goes to ``target`` on the device: labels, ``index``, and for 3-D crops the coordinates that say which
    voxels two crops share. Non-tensor entries (file names, meta dicts) are dropped: they never reach the loss.

    Raises:
        KeyError: the batch has no ``views_key`` entry (the dataset is not a multi-view dataset).
        ValueError: fewer than two views, or views with different batch sizes.
    """
    if views_key not in batchdata:
        raise KeyError(f"batch has no '{views_key}' (keys {sorted(batchdata)}): a multi-view step needs a "
                       "multi-view dataset (medsim.data.views)")
    views = batchdata[views_key]
    if torch.is_tensor(views):  # (B, V, C, *spatial) collated from equal-size views
        views = list(views.unbind(1))
    if len(views) < 2:
        raise ValueError(f"'{views_key}' holds {len(views)} view(s); a joint-embedding step needs >= 2")
    sizes = {int(v.shape[0]) for v in views}
    if len(sizes) != 1:
        raise ValueError(f"views of one batch must share the batch size, got {sorted(sizes)}")
    inputs = [v.to(device=device, non_blocking=non_blocking, **kwargs) for v in views]
    target: dict[str, Any] = {}
    for key, value in batchdata.items():
        if key == views_key:
            continue
        if torch.is_tensor(value):
            target[key] = _to(value, device, non_blocking)
        elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            target[key] = [_to(v, device, non_blocking) for v in value]
    return inputs, target


class BatchLoss(torch.nn.Module):
    """A medsim loss as MONAI's ``loss_function(pred, target)`` (pred: the network's output dict; target: the
    prepare_batch target with ``label``).

    Calls ``loss(pred, labels)`` when the loss has ``takes_outputs = True`` (ABE divergence, gated-attention fusion,
    loss-based attention) and ``loss(pred["embedding"], labels, pred.get("logits"))`` otherwise. A loss without a
    gradient (e.g. a margin loss on a batch without a positive pair) is returned as a leaf that requires one, so the
    step changes nothing instead of failing.

    Attributes:
        routed: the wrapped loss (its ``set_epoch`` is called each epoch by
            :class:`~medsim.engines.handlers.TrainingHooks`, its state is checkpointed as ``loss``).
    """

    def __init__(self, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.routed = loss

    def call(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if getattr(self.routed, "takes_outputs", False):
            loss = self.routed(outputs, labels)
        else:
            loss = self.routed(outputs["embedding"], labels, outputs.get("logits"))
        return loss if loss.requires_grad else loss.detach().requires_grad_()

    def forward(self, outputs: Mapping[str, torch.Tensor], target: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
        labels = target["label"] if isinstance(target, Mapping) else target
        return self.call(outputs, labels)

