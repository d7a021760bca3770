"""Evaluation reports as a MONAI/ignite handler: ``eval_<split>.json`` and ``eval_<split>.md`` from an evaluator's
metrics, so ``bundles/isic_dsl/configs/evaluate.json`` is a plain MONAI evaluation (``CheckpointLoader`` +
``SupervisedEvaluator`` + ``MetricsSaver`` + this) rather than a Python call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from medsim.errors import atomic_write_text

__all__ = ["EvalReport", "split_key", "write_eval_report"]

_SPLITS = {"test": "test", "validation": "validation", "val": "validation", "train": "training",
           "training": "training"}


def split_key(split: str) -> str:
    """``test`` / ``validation`` (``val``) / ``training`` (``train``) → the split.json key."""
    from medsim.errors import MedsimError

    try:
        return _SPLITS[split]
    except KeyError:
        raise MedsimError(f"unknown split '{split}'; choose test, validation or training") from None


def write_eval_report(run_dir: str | os.PathLike, split: str, checkpoint: str | os.PathLike,
                      metrics: Mapping[str, float], name: str | None = None) -> Path:
    """Write ``run_dir/eval_<split>.json`` (``{"split", "checkpoint", **metrics}``) and ``eval_<split>.md`` (a
    metrics table named ``name``, default ``"<run> (<split>)"``) — the one writer of evaluation reports, used by
    training's final test, ``medsim evaluate`` and the bundle's ``evaluate.json``. Returns the JSON path."""
    from medsim.metrics.retrieval import metrics_table

    run, key = Path(run_dir), split_key(split)
    out = atomic_write_text(run / f"eval_{key}.json",
                            json.dumps({"split": key, "checkpoint": str(checkpoint), **metrics}, indent=2))
    atomic_write_text(run / f"eval_{key}.md", metrics_table({name or f"{run.name} ({key})": metrics}) + "\n")
    return out


class EvalReport:
    """At the end of an evaluation run, write ``output_dir/eval_<split>.json`` (``{"split", "checkpoint",
    **metrics}``) and ``eval_<split>.md`` (a metrics table) from ``engine.state.metrics`` (the scalar ones; a
    metric that returns a mapping, like ``EmbeddingMetric(mode="all")``, contributes its items)."""

    def __init__(self, output_dir: str | os.PathLike, split: str = "test", checkpoint: str = "best.pt",
                 name: str | None = None):
        self.output_dir = Path(output_dir)
        self.split = split_key(split)
        self.checkpoint = checkpoint
        self.name = name

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        write_eval_report(self.output_dir, self.split, self.output_dir / self.checkpoint,
                          self.scalars(engine.state.metrics), self.name)

    @staticmethod
    def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
        """The numeric metrics of an engine (mapping-valued metrics flattened into their items)."""
        out: dict[str, float] = {}
        for k, v in metrics.items():
            if isinstance(v, Mapping):
                out.update({str(a): float(b) for a, b in v.items() if isinstance(b, (int, float))})
            elif isinstance(v, (int, float)):
                out.setdefault(str(k), float(v))
        return out
