"""Label-free evaluation of the 3-D self-supervised bundles (``ct_sam``, ``ct_pgl``) on fixed pairs of views.

Their validation and test items are pairs of random crops of unlabelled volumes (:mod:`medsim.data.views3d`), so a
metric is only comparable between epochs (and between training's final test and ``medsim evaluate``) when every
pass sees the *same* pairs: :class:`FixedDraws` reseeds the pairs' random transform before each pass.

The metrics are the validation metrics themselves (ignite ``Metric`` objects), one per kind of evaluation
(:data:`EVALUATIONS`):

- ``correspondence`` (SAM): point-matching accuracy and error between the two views
  (:class:`medsim.engines.correspondence.CorrespondenceMetric`);
- ``validation_loss`` (PGL, BYOL-3D): the method's own loss and its terms
  (:class:`medsim.engines.validation_loss.ValidationLoss`).

:func:`pair_scores` runs them over a loader, :func:`finish_pairs` loads a checkpoint, scores one split and writes
``eval_<split>.json`` / ``.md`` (:func:`medsim.engines.reports.write_eval_report`, like every bundle), and
:func:`evaluate_pairs_run` is ``medsim evaluate`` on such a run, rebuilt from its ``run.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from medsim.errors import MedsimError

__all__ = ["FixedDraws", "EVALUATIONS", "evaluation_metrics", "pair_scores", "finish_pairs", "evaluate_pairs_run"]

#: kinds of label-free evaluation a run record may name (its ``evaluation#kind``)
EVALUATIONS = ("correspondence", "validation_loss")


class FixedDraws:
    """Reseed a random transform at the start of every run of an engine (a MONAI ``val_handlers`` entry), so that each
    validation sees the same random draws (the same crop pairs): epochs are then compared on the same pairs.

    Args:
        transform: the validation dataset's random transform (``set_random_state``).
        seed: its seed at the start of every validation.
    """

    def __init__(self, transform: Any, seed: int = 0):
        self.transform, self.seed = transform, int(seed)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reseed)

    def reseed(self, engine: Any = None) -> None:
        self.transform.set_random_state(seed=self.seed % 2**32)


def evaluation_metrics(kind: str, loss: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
    """The ignite metrics of one kind of label-free evaluation (module docstring), each reporting all its numbers.

    Raises:
        MedsimError: an unknown ``kind``, or ``validation_loss`` without the ``loss``.
    """
    if kind == "correspondence":
        from medsim.engines.correspondence import CorrespondenceMetric

        return {"correspondence": CorrespondenceMetric(mode="all")}
    if kind == "validation_loss":
        from medsim.engines.validation_loss import ValidationLoss

        if loss is None:
            raise MedsimError("the validation_loss evaluation needs the method's loss (run.json#evaluation#loss)")
        return {"validation_loss": ValidationLoss(loss, term="all")}
    raise MedsimError(f"unknown label-free evaluation {kind!r}; known: {', '.join(EVALUATIONS)}")


def pair_scores(method: torch.nn.Module, loader: Any, device: str | torch.device, metrics: Mapping[str, Any], *,
                prepare_batch: Callable, inferer: Callable | None = None,
                draws: FixedDraws | None = None) -> dict[str, Any]:
    """One pass of ``metrics`` over the view pairs of ``loader`` (``method`` in eval mode, no gradients; the pairs
    reseeded first by ``draws``). A metric that computes a mapping contributes its items."""
    if draws is not None:
        draws.reseed()
    for m in metrics.values():
        m.reset()
    method.eval()
    with torch.no_grad():
        for batch in loader:
            views, target = prepare_batch(batch, device)
            pred = inferer(views, method) if inferer is not None else method(views)
            for m in metrics.values():
                m.update((pred, target))
    out: dict[str, Any] = {}
    for name, m in metrics.items():
        value = m.compute()
        out.update(value if isinstance(value, Mapping) else {name: value})
    return out


def finish_pairs(output_dir: str | os.PathLike, method: torch.nn.Module, loader: Any, device: str | torch.device,
                 metrics: Mapping[str, Any], *, checkpoint: str | os.PathLike | None, prepare_batch: Callable,
                 inferer: Callable | None = None, draws: FixedDraws | None = None, split: str = "test",
                 selected_by: str | None = None, state_key: str = "ssl") -> dict[str, Any]:
    """Load ``checkpoint``'s ``state_key`` entry (the whole method: encoder, heads, target; ``None``: the method as
    it is) into ``method``, score one split (:func:`pair_scores`) and write ``output_dir/eval_<split>.json`` /
    ``.md``. Returns the report (``{"split", "checkpoint", **scores, "selected_by"}``)."""
    from medsim.engines.reports import split_key, write_eval_report
    from medsim.engines.runs import load_weights

    out = Path(output_dir)
    if checkpoint is not None:
        load_weights(method, checkpoint, key=state_key, fits=f"the run's {type(method).__name__}")
    res = pair_scores(method, loader, device, metrics, prepare_batch=prepare_batch, inferer=inferer, draws=draws)
    if selected_by is not None:
        res["selected_by"] = selected_by
    name = Path(checkpoint).name if checkpoint is not None else None
    write_eval_report(out, split, name, res)
    return {"split": split_key(split), "checkpoint": name, **res}


def evaluate_pairs_run(run_dir: str | os.PathLike, record: Mapping[str, Any], *, split: str = "test",
                       checkpoint: str = "best.pt") -> dict[str, Any]:
    """``medsim evaluate`` on a run of a label-free bundle: its ``run.json#evaluation`` (kind, the method's and
    the views' specs, the seed of the fixed pairs) rebuilds the method around the recorded network, the pairs of
    ``split``'s volumes are drawn as at training's final test, and ``eval_<split>.json`` / ``.md`` are written."""
    from monai.data import DataLoader

    from medsim.data.datasets import make_dataset
    from medsim.data.splits import load_split
    from medsim.data.volumes import split_lists
    from medsim.engines.batches import views_prepare_batch
    from medsim.engines.reports import split_key
    from medsim.engines.runs import build_spec

    run = Path(run_dir)
    ev, where = record["evaluation"], f"{run / 'run.json'}#evaluation"
    if not isinstance(ev, Mapping) or not all(k in ev for k in ("kind", "method", "views", "seed")):
        raise MedsimError(f"{where}: expected an object with kind, method, views and seed")
    method = build_spec({**ev["method"], "encoder": record["network"]}, f"{where}#method")
    views = build_spec(ev["views"], f"{where}#views")
    loss = build_spec(ev["loss"], f"{where}#loss") if ev.get("loss") is not None else None
    metrics = evaluation_metrics(str(ev["kind"]), loss)
    key = split_key(split)
    items = split_lists(load_split(run / "split.json"))[key]
    if not items:
        raise MedsimError(f"split '{split}' of {run / 'split.json'} is empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(make_dataset(items, views), batch_size=int(record.get("eval_batch_size", 2)), num_workers=0)
    return finish_pairs(run, method.to(device), loader, device, metrics, checkpoint=run / checkpoint,
                        prepare_batch=views_prepare_batch, draws=FixedDraws(views, int(ev["seed"])), split=key,
                        selected_by=record.get("select_metric"))
