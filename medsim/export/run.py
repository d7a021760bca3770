"""Open a finished ``medsim train`` run for export: its network (weights loaded, CPU, eval mode), the
deterministic eval preprocessing, the split and the class names.

A run directory holds ``run.json`` (the network's and eval preprocessing's plain arguments, see
:mod:`medsim.engines.runs`), ``best.pt`` / ``last.pt`` (dicts whose ``network`` key is the state_dict) and
``split.json``. A run folder is data: the network is rebuilt from ``run.json`` (medsim classes only), the weights are
loaded weights-only, and its ``config.json`` is never parsed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medsim.export.errors import ExportError

__all__ = ["LoadedRun", "load_run", "sha256_file", "preprocess_items", "split_images", "SPLITS"]

SPLITS = ("training", "validation", "test")


@dataclass
class LoadedRun:
    """A trained run opened for export.

    Attributes:
        run_dir: the run directory (holds ``run.json``).
        checkpoint: the checkpoint whose weights ``network`` holds.
        record: the run's checked ``run.json`` (plain values).
        network: the ``medsim.nn.Embedder`` in eval mode on CPU.
        transform: ``eval#preprocessing`` (path dict → float tensor (C, x, y)).
        classes: class names in label order.
    """

    run_dir: Path
    checkpoint: Path
    record: dict[str, Any]
    network: torch.nn.Module
    transform: Any
    classes: list[str]
    _datalists: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def datalists(self) -> dict[str, Any]:
        """``{"training", "validation", "test": [{"image", "label", ...}], "classes", "kind"}`` from split.json."""
        if self._datalists is None:
            from medsim.engines.workflow import datalists_from_split

            self._datalists = datalists_from_split(self.run_dir / "split.json")
        return self._datalists

    @property
    def image_size(self) -> tuple[int, ...]:
        """The spatial size the eval preprocessing resizes to, MONAI axis order (x, y)."""
        s = self.record.get("image_size")
        return tuple(int(v) for v in (s if isinstance(s, (list, tuple)) else (s, s)))

    @property
    def eval_batch_size(self) -> int:
        return int(self.record.get("eval_batch_size") or 64)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _locate(run_or_checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    src = Path(run_or_checkpoint)
    if src.is_dir():
        run = src
        ckpt = next((run / n for n in ("best.pt", "last.pt") if (run / n).is_file()), None)
        if ckpt is None:
            raise ExportError(f"{run}: no best.pt or last.pt — is this a finished `medsim train` run directory? "
                              "(or pass the checkpoint file itself)")
    elif src.is_file():
        ckpt, run = src, src.parent
    else:
        raise ExportError(f"{src}: not found (give a run directory or a checkpoint .pt file inside one)")
    for f in (run / "run.json", run / "split.json"):
        if not f.is_file() and not (f.name == "run.json" and (run / "config.json").is_file()):
            raise ExportError(f"{f}: not found — export needs the run directory written by `medsim train` "
                              "(run.json, split.json and the checkpoint side by side)")
    return run, ckpt


def load_run(run_or_checkpoint: str | os.PathLike) -> LoadedRun:
    """Open a run directory (``best.pt``, else ``last.pt``) or a checkpoint file whose folder holds the run.

    Raises:
        ExportError: missing config/split/checkpoint, a checkpoint without a ``network`` state_dict, or weights
            that do not fit the network the config describes.
    """
    from medsim.engines.runs import build_spec, load_checkpoint, load_run_record
    from medsim.errors import MedsimError

    run, ckpt = _locate(run_or_checkpoint)
    try:
        record = load_run_record(run)
        network = build_spec(record["network"], f"{run / 'run.json'}#network")
        transform = build_spec(record["eval_preprocessing"], f"{run / 'run.json'}#eval_preprocessing")
        state = load_checkpoint(ckpt)
    except ExportError:
        raise
    except MedsimError as e:
        raise ExportError(str(e)) from e
    if "network" not in state:
        raise ExportError(f"{ckpt}: no 'network' state_dict in the checkpoint (keys: {sorted(state)[:8]})")
    inside = state.get("run_record")  # checkpoints since issue 10 carry the run record they were trained with
    if isinstance(inside, dict):
        for key in ("network", "eval_preprocessing"):
            if inside.get(key) != record[key]:
                raise ExportError(f"{ckpt}: trained with another {key} than {run / 'run.json'} records "
                                  f"({inside.get(key)} vs {record[key]}); export the run folder it came from")
    try:
        network.load_state_dict(state["network"])
    except RuntimeError as e:
        raise ExportError(f"{ckpt}: weights do not fit the network of {run / 'run.json'} "
                          f"({str(e).splitlines()[0]})") from e
    network = network.cpu().eval()
    loaded = LoadedRun(run_dir=run, checkpoint=ckpt, record=record, network=network, transform=transform,
                       classes=[])
    loaded.classes = [str(c) for c in loaded.datalists["classes"]]
    return loaded


def preprocess_items(items: Sequence[dict | str | os.PathLike], transform: Any) -> np.ndarray:
    """Run images (datalist items or paths) through ``transform``: float32 (N, C, *spatial), C-contiguous."""
    arrays = []
    for it in items:
        d = dict(it) if isinstance(it, dict) else {"image": str(it)}
        try:
            img = transform(d)["image"]
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{d.get('image')}: cannot be read/preprocessed ({type(e).__name__}: {e})") from e
        arrays.append(np.asarray(img.detach().cpu().numpy() if torch.is_tensor(img) else img, dtype=np.float32))
    if not arrays:
        raise ExportError("no images to preprocess")
    return np.ascontiguousarray(np.stack(arrays))


def split_images(run: LoadedRun, split: str = "validation", *, limit: int | None = None,
                 fallback: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Preprocessed images and labels of one split of the run: ``(images (N, C, *S), labels (N,), split)``.

    With ``fallback`` an empty split falls back to validation, test, then training (the split used is returned).
    ``limit`` keeps the first ``limit`` items.
    """
    key = {"train": "training", "val": "validation"}.get(split, split)
    if key not in SPLITS:
        raise ExportError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    order = [key] + ([s for s in ("validation", "test", "training") if s != key] if fallback else [])
    for s in order:
        items = run.datalists.get(s) or []
        if items:
            items = items[:limit] if limit else items
            labels = np.asarray([int(it.get("label", -1)) for it in items])
            return preprocess_items(items, run.transform), labels, s
    raise ExportError(f"{run.run_dir / 'split.json'}: split '{key}' is empty"
                      + (" and so are the others" if fallback else ""))
