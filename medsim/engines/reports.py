"""Evaluation reports as a MONAI/ignite handler: ``eval_<split>.json`` and ``eval_<split>.md`` from an evaluator's
metrics, so ``bundles/isic_dsl/configs/evaluate.json`` is a plain MONAI evaluation (``CheckpointLoader`` +
``SupervisedEvaluator`` + ``MetricsSaver`` + this) rather than a Python call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from medsim.errors import atomic_write_text

__all__ = ["EvalReport", "split_key"]

_SPLITS = {"test": "test", "validation": "validation", "val": "validation", "train": "training",
           "training": "training"}


def split_key(split: str) -> str:
    """``test`` / ``validation`` (``val``) / ``training`` (``train``) → the split.json key."""
    from medsim.errors import MedsimError

    try:
        return _SPLITS[split]
    except KeyError:
        raise MedsimError(f"unknown split '{split}'; choose test, validation or training") from None


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
        from medsim.metrics.retrieval import metrics_table

        res = self.scalars(engine.state.metrics)
        atomic_write_text(self.output_dir / f"eval_{self.split}.json",
                          json.dumps({"split": self.split, "checkpoint": str(self.output_dir / self.checkpoint),
                                      **res}, indent=2))
        name = self.name or f"{self.output_dir.name} ({self.split})"
        atomic_write_text(self.output_dir / f"eval_{self.split}.md", metrics_table({name: res}) + "\n")

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
