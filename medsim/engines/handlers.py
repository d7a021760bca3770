"""Method-independent ignite handlers for MONAI's ``SupervisedTrainer``: every medsim bundle trains with these.

- :class:`TrainingHooks` — per-epoch seeding (batch sampler, augmentation, loss-weight schedules), a stop on a
  non-finite loss before the backward pass, and the loss output detached after it.
- :class:`EpochRecorder` — one record per epoch (mean loss, validation metrics, wall time) and model selection
  (``improved`` when the selection metric reaches its best). Method handlers (e.g. DSL's
  :class:`~medsim.engines.SubspaceHandler`) attached after it add their fields to the epoch's record.
- :class:`Checkpointer` — atomic ``last.pt`` every epoch, ``best.pt`` on the recorder's best epoch; exact resume.
- :class:`MetricsLogger` — the record as one JSON line per epoch (``metrics.jsonl``).

Order in a bundle's ``train#handlers``: ValidationHandler, TrainingHooks, EpochRecorder, method handlers,
Checkpointer, MetricsLogger (ignite runs the handlers of one event in the order they were attached).

MONAI's ``CheckpointSaver``/``CheckpointLoader`` are not used for training checkpoints: they save through ignite's
``Checkpoint`` (pickled objects, file names with the score) and restore no RNG or sampler state; medsim's files are
plain state that loads weights-only, written atomically, and a resumed run
replays the original's batches and augmentation exactly. The evaluation bundle (``evaluate.json``) uses MONAI's
``CheckpointLoader`` and ``MetricsSaver``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import IterationEvents

from medsim.engines.runs import load_checkpoint
from medsim.errors import MedsimError

__all__ = ["TrainingHooks", "EpochRecorder", "Checkpointer", "MetricsLogger", "RNGState", "atomic_torch_save"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`medsim.errors.atomic_path` (never half a file, no temp file left behind).

    Only plain data is saved (tensors, numbers, strings, lists, dicts: :func:`medsim.engines.runs.plain_state`),
    so the file loads weights-only (:func:`medsim.engines.runs.load_checkpoint`)."""
    from medsim.engines.runs import plain_state
    from medsim.errors import atomic_path

    with atomic_path(path) as tmp:
        torch.save(plain_state(obj), tmp)
    return Path(path)


class RNGState:
    """torch / numpy / python RNG states as a checkpointable object."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain values only (numpy's key array as a tensor), so checkpoints load with weights_only=True
        return {"torch": torch.get_rng_state(),
                "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                          float(gauss)],
                "python": random.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
        random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])


def _inner_loss(loss: Any) -> Any:
    """The configured loss inside a wrapper (e.g. DSL's routing loss keeps it as ``routed``)."""
    return getattr(loss, "routed", loss)


class TrainingHooks:
    """Epoch seeding and loss guards for a MONAI ``SupervisedTrainer``.

    At each epoch start (epoch from 1, as ignite counts): ``sampler.set_epoch(epoch)`` (a batch sampler drawing
    from (seed, epoch)), ``transform.set_random_state((seed * 100003 + epoch) mod 2**32)`` (the augmentation), and
    the trainer's loss ``set_epoch(epoch - 1, max_epochs)`` when it has one (loss-weight schedules, ramp-ups). So a
    resumed run draws the same batches and augmentations as the run it continues.

    A non-finite loss raises ``FloatingPointError`` before the backward pass; after the backward pass the
    output's loss is detached (handlers read its value; the graph is freed).

    Args:
        sampler: the training batch sampler (anything with ``set_epoch``), or None.
        transform: the training augmentation (a MONAI ``Randomizable``), or None.
        seed: the run's seed.
    """

    def __init__(self, sampler: Any = None, transform: Any = None, seed: int = 0):
        self.sampler, self.transform, self.seed = sampler, transform, int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_finite)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.detach_loss)

    def epoch_started(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        loss = _inner_loss(getattr(engine, "loss_function", None))
        if hasattr(loss, "set_epoch"):
            loss.set_epoch(epoch - 1, engine.state.max_epochs)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=(self.seed * 100_003 + epoch) % 2**32)

    @staticmethod
    def check_finite(engine: Engine) -> None:
        loss = engine.state.output["loss"].detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {engine.state.epoch}, iteration "
                                     f"{engine.state.iteration}: stopping (lower the learning rate?)")

    @staticmethod
    def detach_loss(engine: Engine) -> None:
        engine.state.output["loss"] = engine.state.output["loss"].detach()


class EpochRecorder:
    """The per-epoch record and model selection of a training run. Checkpointable (``state_dict``).

    Each epoch's record: ``epoch``, ``loss`` (mean training loss), the validator's scalar metrics (rounded to 5
    digits), ``improved`` (the selection metric reached its best so far: the Checkpointer writes ``best.pt``) and
    ``seconds`` (wall time of the epoch). Handlers attached after this one add fields to :attr:`current`.

    Args:
        validator: the evaluator run by the ValidationHandler (its ``state.metrics``), or None.
        select_metric: the validation metric that selects ``best.pt`` (``val_nmi``; classifiers e.g.
            ``val_balanced_accuracy``; self-supervised runs e.g. ``val_loss``). A name the validator does not report
            is an error naming those it does.
        select_mode: ``"max"`` (higher is better, the default) or ``"min"`` (a loss).
    """

    def __init__(self, validator: Engine | None = None, select_metric: str = "val_nmi", select_mode: str = "max"):
        from monai.utils import look_up_option

        self.validator, self.select_metric = validator, select_metric
        self.sign = 1.0 if look_up_option(select_mode, ("max", "min")) == "max" else -1.0
        self.history: list[dict[str, Any]] = []
        self.best_selected = float("-inf")
        self.epoch_loss: list[float] = []
        self._t0 = time.perf_counter()

    @property
    def current(self) -> dict[str, Any]:
        """The record of the epoch just completed."""
        if not self.history:
            raise RuntimeError("no epoch recorded yet")
        return self.history[-1]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.epoch_loss, self._t0 = [], time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, Mapping) and "loss" in out:
            self.epoch_loss.append(float(out["loss"]))

    def epoch_completed(self, engine: Engine) -> None:
        metrics = dict(self.validator.state.metrics) if self.validator is not None and \
            self.validator.state is not None else {}
        if metrics and self.select_metric not in metrics:
            raise KeyError(f"select_metric '{self.select_metric}' is not among the validation metrics "
                           f"{sorted(metrics)}")
        sel = self.sign * float(metrics.get(self.select_metric, float("nan")))  # best_selected: sign · metric
        improved = bool(not np.isnan(sel) and sel >= self.best_selected)
        if improved:
            self.best_selected = sel
        self.history.append({"epoch": engine.state.epoch,
                             "loss": float(np.mean(self.epoch_loss)) if self.epoch_loss else None,
                             **{k: round(float(v), 5) for k, v in metrics.items() if isinstance(v, (int, float))},
                             "improved": improved})

    def seconds(self) -> float:
        """Wall time since the epoch started (training, validation and the method's epoch-end work)."""
        return round(time.perf_counter() - self._t0, 2)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_selected": self.best_selected}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])
        self.best_selected = float(state["best_selected"])


class Checkpointer:
    """Atomic checkpoints: ``last.pt`` at every epoch end, ``best.pt`` when the :class:`EpochRecorder` marks the
    epoch ``improved``.

    Holds the state of every object in ``objects`` (anything with ``state_dict``/``load_state_dict``) plus the
    engine's epoch/iteration and the run record (``run.json``). With ``resume=True`` a run whose ``last.pt``
    exists continues from it.
    """

    def __init__(self, save_dir: str | os.PathLike, objects: Mapping[str, Any], *, resume: bool = True,
                 record: EpochRecorder | None = None):
        self.save_dir = Path(save_dir)
        self._run_record: dict[str, Any] | None = None
        self.objects = dict(objects)
        self.resume = resume
        self.record = record

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _payload(self, engine: Engine) -> dict[str, Any]:
        payload = {"engine": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
                   **{k: v.state_dict() for k, v in self.objects.items()}}
        if self._run_record is None and (self.save_dir / "run.json").is_file():
            from medsim.engines.runs import load_run_record

            self._run_record = load_run_record(self.save_dir)  # read once; checked like any run record
        if self._run_record is not None:  # the run record (network + eval preprocessing spec) travels along
            payload["run_record"] = self._run_record
        return payload

    def save(self, engine: Engine) -> None:
        from medsim.engines.distributed import is_main_process

        if not is_main_process():  # several processes: rank 0 writes; every rank loads on resume
            return
        payload = self._payload(engine)
        atomic_torch_save(payload, self.save_dir / "last.pt")
        if self.record is not None and self.record.history and self.record.current.get("improved"):
            atomic_torch_save(payload, self.save_dir / "best.pt")

    def load(self, engine: Engine) -> None:
        path = self.save_dir / "last.pt"
        if not (self.resume and path.is_file()):
            return
        try:
            ckpt = load_checkpoint(path)
        except MedsimError as e:
            raise MedsimError(f"{e}; cannot resume from it — train into another --output directory, or delete it "
                              "to start over") from e
        try:
            missing = [k for k in self.objects if k not in ckpt]
            if missing:
                raise KeyError(f"no {', '.join(missing)} state (a checkpoint of another medsim version or method)")
            for k, obj in self.objects.items():
                obj.load_state_dict(ckpt[k])
            epoch, iteration = int(ckpt["engine"]["epoch"]), int(ckpt["engine"]["iteration"])
        except Exception as e:  # a checkpoint of another configuration, or without its engine record
            raise MedsimError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                              f"train into another --output directory, or delete it to start over") from e
        engine.state.epoch, engine.state.iteration = epoch, iteration
        max_epochs = getattr(engine.state, "max_epochs", None)
        if max_epochs is not None and engine.state.epoch >= max_epochs:
            logger.warning("%s is already complete: last.pt is at epoch %d and max_epochs is %d, so nothing is "
                           "trained and the test result is that of the existing best.pt. To start a new run, train "
                           "into a new folder (medsim train --output NEW_DIR; monai.bundle: --output_dir NEW_DIR) or "
                           "delete this one; to train on, raise max_epochs above %d.", self.save_dir,
                           engine.state.epoch, max_epochs, engine.state.epoch)
        else:
            logger.info("resumed from %s at epoch %d", path, engine.state.epoch)


class MetricsLogger:
    """The :class:`EpochRecorder`'s record as one JSON line per epoch (``metrics.jsonl``), with the epoch's wall
    time; echoed as one log line (plus the method's events, e.g. DSL splits)."""

    def __init__(self, path: str | os.PathLike, record: EpochRecorder, echo: bool = True):
        self.path = Path(path)
        self.record = record
        self.echo = echo

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from medsim.engines.distributed import is_main_process

        if not self.record.history or not is_main_process():
            return
        rec = self.record.current
        rec["seconds"] = self.record.seconds()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.echo:
            k = f"  K={rec['K']}" if "K" in rec else ""
            # retrieval runs show NMI and R@1; others (SAM's point matching) the validation scalars they have
            shown = {"val NMI": rec.get("val_nmi", float("nan")), "R@1": rec.get("val_R@1", float("nan"))} \
                if "val_nmi" in rec or not any(key.startswith("val_") for key in rec) else \
                {key: v for key, v in rec.items() if key.startswith("val_") and isinstance(v, (int, float))}
            logger.info("epoch %d/%d%s  loss %.4f  %s%s", rec["epoch"], engine.state.max_epochs, k,
                        rec["loss"] if rec["loss"] is not None else float("nan"),
                        "  ".join(f"{name} {v:.4f}" for name, v in shown.items()),
                        "".join(f"\n    {e}" for e in rec.get("events", [])))
