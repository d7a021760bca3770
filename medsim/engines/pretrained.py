"""Start a network from another run's trunk (e.g. a self-supervised ``derm_ssl`` run): one config id, ``pretrained``.

``medsim train bundles/isic_dsl -o pretrained=runs/derm_byol`` builds the bundle's network as usual, then copies
the *trunk* weights (the backbone every medsim model registers as ``trunk``) of the other run's selected checkpoint
into it. Heads (attention, embedding, classifier) keep their fresh initialisation. The other run is data from
someone else: its network is rebuilt from its ``run.json`` (plain values, medsim classes only) and its weights are
loaded weights-only — nothing in it is executed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from medsim.errors import MedsimError

__all__ = ["load_pretrained", "trunk_description"]

logger = logging.getLogger(__name__)

TRUNK_ARGS = ("backbone", "spatial_dims", "in_channels", "cut", "widen_factor", "strided")


def trunk_description(spec: dict[str, Any]) -> str:
    """The trunk-defining arguments of a network spec, for error messages (``resnet18, widen_factor=0.5, ...``)."""
    args = {k: spec[k] for k in TRUNK_ARGS if k in spec}
    return f"{spec.get('_target_', '?').rsplit('.', 1)[-1]}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def _checkpoint(source: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint file) of ``source``: a run folder (``best.pt``, else ``last.pt``) or a checkpoint."""
    if source.is_dir():
        for name in ("best.pt", "last.pt"):
            if (source / name).is_file():
                return source, source / name
        raise MedsimError(f"pretrained={source}: no best.pt or last.pt in it — is it a finished `medsim train` run?")
    if source.is_file():
        return source.parent, source
    raise MedsimError(f"pretrained={source}: no such run folder or checkpoint")


def load_pretrained(network: torch.nn.Module, source: str | os.PathLike | None) -> torch.nn.Module:
    """Copy the trunk weights of the run (or checkpoint) ``source`` into ``network``; ``None``/``""``: unchanged.

    Args:
        network: an :class:`~medsim.nn.base.EmbedderBase` (anything with a ``trunk`` module).
        source: a run folder (its ``best.pt``, else ``last.pt``) or a checkpoint file inside a run folder.

    Returns:
        ``network`` (the same object), its trunk loaded.

    Raises:
        MedsimError: ``source`` is not a run, its checkpoint is not weights-only, or its trunk does not match
            ``network``'s (the message names both trunks and the first mismatching tensor).
    """
    if source is None or str(source) == "":
        return network
    from medsim.engines.runs import build_spec, load_run_record, load_weights

    run, ckpt = _checkpoint(Path(source))
    record = load_run_record(run)
    spec = record["network"]
    donor = build_spec(spec, f"{run / 'run.json'}#network")
    load_weights(donor, ckpt, fits=f"{run / 'run.json'}'s network")
    if not hasattr(network, "trunk") or not hasattr(donor, "trunk"):
        raise MedsimError(f"pretrained={source}: both networks need a trunk (an EmbedderBase); got "
                          f"{type(network).__name__} and {type(donor).__name__}")
    theirs, ours = donor.trunk.state_dict(), network.trunk.state_dict()
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape] + \
        [k for k in theirs if k not in ours]
    if bad:
        k = bad[0]
        why = (f"'{k}' is {tuple(theirs[k].shape)} there and {tuple(ours[k].shape)} here"
               if k in theirs and k in ours else f"'{k}' exists in only one of them")
        raise MedsimError(f"pretrained={source}: its trunk {trunk_description(spec)} does not match this network's "
                          f"({len(bad)} tensors differ; {why}). Train with the same backbone, widen_factor, cut and "
                          "in_channels as the pretraining run.")
    network.trunk.load_state_dict(theirs)
    logger.info("trunk of %s: %d tensors loaded from %s", type(network).__name__, len(theirs), ckpt)
    return network
