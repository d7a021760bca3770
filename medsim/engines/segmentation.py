"""Few-label organ segmentation fine-tuning and its Dice evaluation: PGL's downstream test of a pretrained encoder.

Xie et al., "PGL: Prior-Guided Local Self-supervised Learning for 3D Medical Image Segmentation" (arXiv:2011.12640,
2020) judge pretraining by fine-tuning a segmentation network from the pretrained encoder on few labelled volumes and
reporting Dice per organ. Here:

- network: :class:`medsim.nn.segmentation.ResNetUNet` (the SSL bundles' MONAI ResNet trunk + MONAI FlexibleUNet's
  decoder); :func:`load_encoder` copies a pretraining run's encoder trunk into it
  (:func:`medsim.engines.pretrained.load_pretrained`: the run's network rebuilt from its ``run.json``, weights-only);
- training (:func:`finetune_segmentation`): MONAI ``SupervisedTrainer`` with MONAI ``DiceCELoss`` (softmax, one-hot
  labels) on random crops (:func:`medsim.data.segmentation.segmentation_transforms`), a fixed number of steps
  ``max_epochs × steps_per_epoch`` whatever the number of labelled volumes (the same budget for every start), Adam;
- evaluation (:func:`evaluate_segmentation`): MONAI ``sliding_window_inference`` over each whole held-back volume on
  the training grid, argmax, MONAI ``DiceMetric`` per class (background excluded), per volume and its mean per organ.
  An organ absent from both the prediction and the reference of a volume is left out of that organ's mean (NaN).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["load_encoder", "finetune_segmentation", "evaluate_segmentation"]

logger = logging.getLogger(__name__)


def load_encoder(network: nn.Module, run: str | os.PathLike | None) -> nn.Module:
    """Copy the encoder trunk of the pretraining run (folder or checkpoint) ``run`` into ``network.trunk``;
    ``None`` / ``""``: unchanged (random initialisation). Returns ``network``.

    Raises:
        MedsimError: the run's trunk does not match (other backbone, cut or width: the message says which).
    """
    from medsim.engines.pretrained import load_pretrained

    return load_pretrained(network, run)


def finetune_segmentation(network: nn.Module, items: Sequence[Mapping[str, str]], transform: Any, *,
                          max_epochs: int = 10, steps_per_epoch: int = 8, batch_size: int = 2,
                          learning_rate: float = 1e-3, weight_decay: float = 1e-5, device: str | torch.device = "cpu",
                          amp: bool = False, seed: int = 0) -> list[dict[str, float]]:
    """Train ``network`` (B, 1, *roi) -> (B, n_classes, *roi) logits on the labelled ``items`` with DiceCE.

    Args:
        transform: the training pipeline (``segmentation_transforms(train=True, ...)``: each item gives
            ``num_samples`` crops); its deterministic loading is cached once.
        max_epochs, steps_per_epoch, batch_size: the budget: ``max_epochs · steps_per_epoch`` optimiser steps of
            ``batch_size`` crops each, drawn with replacement from the items' crops.
        amp: bf16 autocast of the forward pass on the device (:class:`medsim.engines.PrecisionInferer`).

    Returns:
        one record per epoch: ``{"epoch", "loss" (mean DiceCE), "seconds"}``.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from ignite.engine import Events

    from medsim.engines.trainer import PrecisionInferer

    if not items:
        raise ValueError("fine-tuning needs at least one labelled volume, got none")
    set_determinism(seed=seed)
    transform.set_random_state(seed=seed)
    dataset = CacheDataset(list(items), transform, progress=False)
    crops = next((int(t.num_samples) for t in getattr(transform, "transforms", ()) if hasattr(t, "num_samples")), 1)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=max(1, -(-steps_per_epoch * batch_size // crops)))
    loader = DataLoader(dataset, batch_size=max(1, batch_size // crops) if crops > 1 else batch_size,
                        sampler=sampler, num_workers=0)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=max_epochs, train_data_loader=loader,
                                network=network.to(device), optimizer=optimizer,
                                loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
                                inferer=PrecisionInferer(amp=amp), decollate=False, optim_set_to_none=True)
    history: list[dict[str, float]] = []
    losses: list[float] = []
    t0 = [time.perf_counter()]

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Any) -> None:
        losses.clear()
        t0[0] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Any) -> None:
        value = float(engine.state.output["loss"].detach())
        if value != value:  # NaN: stop rather than train on
            raise FloatingPointError(f"non-finite DiceCE loss at iteration {engine.state.iteration}")
        losses.append(value)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine: Any) -> None:
        history.append({"epoch": engine.state.epoch, "loss": sum(losses) / max(len(losses), 1),
                        "seconds": round(time.perf_counter() - t0[0], 2)})
        logger.info("fine-tuning epoch %d: DiceCE %.4f (%.1f s)", engine.state.epoch, history[-1]["loss"],
                    history[-1]["seconds"])

    trainer.run()
    return history


@torch.no_grad()
def evaluate_segmentation(network: nn.Module, items: Sequence[Mapping[str, str]], transform: Any, *,
                          roi_size: Sequence[int], label_names: Mapping[int, str], sw_batch_size: int = 2,
                          overlap: float = 0.25, device: str | torch.device = "cpu", amp: bool = False
                          ) -> dict[str, Any]:
    """Dice per organ of ``network`` on the whole volumes of ``items`` (module docstring).

    Args:
        transform: the eval pipeline (``segmentation_transforms(train=False, ...)``: whole volumes).
        label_names: class index -> organ name, background (0) excluded; the network has ``max(index) + 1``
            output channels.
        amp: bf16 autocast of the forward passes.

    Returns:
        ``{"dice": {organ: mean over volumes}, "mean_dice": mean over organs, "per_volume": [{organ: dice}],
        "n_volumes"}``.
    """
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medsim.engines.trainer import PrecisionInferer

    inferer = PrecisionInferer(amp=amp)
    n_classes = max(int(k) for k in label_names) + 1
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    network = network.to(device).eval()
    per_volume: list[dict[str, float]] = []
    for item in items:
        d = transform(dict(item))
        image, label = d["image"][None].to(device), d["label"][None].to(device)
        logits = sliding_window_inference(image, tuple(roi_size), sw_batch_size, lambda x: inferer(x, network),
                                          overlap=overlap, mode="gaussian")
        pred = one_hot(logits.argmax(1, keepdim=True), n_classes)
        ref = one_hot(label.round().long(), n_classes)
        scores = metric(pred, ref)[0]  # (n_classes - 1,)
        metric.reset()
        per_volume.append({label_names[c]: float(scores[c - 1]) for c in sorted(int(k) for k in label_names)})
    organs = [label_names[c] for c in sorted(int(k) for k in label_names)]
    dice = {o: _nanmean([v[o] for v in per_volume]) for o in organs}
    return {"dice": dice, "mean_dice": _nanmean(list(dice.values())), "per_volume": per_volume,
            "n_volumes": len(per_volume)}


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
