"""MONAI Label task classes over :mod:`medsim.deploy.assist`: infer (similar cases, localize, classify), the
active-learning strategy and the fine-tune-and-re-export train task.

The medsim model in use is a :class:`ModelState`: the export and index folders the app was started with, replaced
by the newest ``<work>/current.json`` that a finished train task wrote (checked on every request, so the server
picks up a model trained in MONAI Label's training subprocess without a restart).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from medsim.deploy.assist import STRATEGIES, UNCERTAINTIES, Assistant, AssistConfigError
from medsim.runtime.errors import DeployError

logger = logging.getLogger(__name__)

CURRENT = "current.json"
#: label-info keys that may carry an image's class (``PUT /datastore/label?params={"class": "mel"}``)
CLASS_KEYS = ("class", "label", "diagnosis")


class ModelState:
    """The export + index in use, reloaded when ``work/current.json`` (written by :class:`FineTune`) changes."""

    def __init__(self, export: str, index: str, work: Path, *, backend: str = "auto", threshold: str | float = "otsu"):
        self.work, self.backend, self.threshold = work, backend, threshold
        self._default = (export, index)
        self._lock = threading.Lock()
        self._stamp: float | None = None
        self._assistant: Assistant | None = None
        self.assistant()  # fail at start-up, with the folders named, not at the first request

    def current(self) -> tuple[str, str]:
        f = self.work / CURRENT
        if f.is_file():
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
                return str(doc["export"]), str(doc["index"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise AssistConfigError(f"{f}: not a readable model pointer ({type(e).__name__}: {e}); delete it to go "
                                        "back to the --conf export/index folders, or train again") from None
        return self._default

    def assistant(self) -> Assistant:
        f = self.work / CURRENT
        stamp = f.stat().st_mtime_ns if f.is_file() else None
        with self._lock:
            if self._assistant is None or stamp != self._stamp:
                export, index = self.current()
                new = Assistant(export, index, backend=self.backend, threshold=self.threshold)
                old, self._assistant, self._stamp = self._assistant, new, stamp
                if old is not None:
                    logger.info("medsim: switched to the model %s", new.model_id)
            return self._assistant


def _image_path(request: dict[str, Any]) -> str:
    image = request.get("image")
    if not isinstance(image, str) or not image or not os.path.exists(image):
        raise DeployError("no readable image in the request (give an image id of the datastore or upload a file)")
    return image


class SimilarCases(InferTask):
    """``/infer/similar_cases``: the top-k indexed cases of the image (params: ``k``, ``exclude_self``,
    ``thumbnails`` = longest side in px, 0 for none) as JSON (``?output=json``)."""

    def __init__(self, state: ModelState, dimension: int, labels: list[str]):
        super().__init__(type=InferType.OTHERS, labels=labels, dimension=dimension,
                         description="medsim: the most similar labelled cases (case tokens, scores, labels, "
                                     "thumbnails)", config={"k": 5, "exclude_self": False, "thumbnails": 96})
        self.state = state

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        res = self.state.assistant().similar_cases(
            _image_path(request), k=request.get("k", 5), exclude_self=_flag(request.get("exclude_self", False)),
            thumbnails=int(request.get("thumbnails", 96)))
        return None, {"similar_cases": res}


class Localize(InferTask):
    """``/infer/localize``: the lesion mask as a label image (2D PNG / 3D NIfTI, 1 = lesion) and its boxes in
    the result JSON (``params`` of the multipart answer, or ``?output=json``)."""

    def __init__(self, state: ModelState, dimension: int):
        super().__init__(type=InferType.SEGMENTATION, labels={"lesion": 1}, dimension=dimension,
                         description="medsim: lesion mask and boxes from the model's attention")
        self.state = state

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        res = self.state.assistant().localize(_image_path(request))
        return res["label"], {"boxes": res["boxes"], "threshold": res["threshold"], "name": res["name"],
                              "label_names": {"lesion": 1}}


class Classify(InferTask):
    """``/infer/classify``: class probabilities (models trained with a classifier head)."""

    def __init__(self, state: ModelState, dimension: int, labels: list[str]):
        super().__init__(type=InferType.CLASSIFICATION, labels=labels, dimension=dimension,
                         description="medsim: class probabilities")
        self.state = state

    def is_valid(self) -> bool:
        return self.state.assistant().has_logits

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        return None, {"prediction": self.state.assistant().classify(_image_path(request))}


class NextToLabel(Strategy):
    """Active learning: the unlabelled datastore image to label next — ``diversity`` (k-center greedy over the
    embeddings: the image farthest from every labelled one), ``uncertainty`` (classifier entropy or disagreement
    of the retrieved cases' labels) or ``hybrid``. Request params ``uncertainty`` and ``k`` override the app's."""

    def __init__(self, state: ModelState, strategy: str, uncertainty: str = "auto", max_pool: int = 2000):
        if strategy not in STRATEGIES or uncertainty not in UNCERTAINTIES:
            raise AssistConfigError(f"strategy '{strategy}' / uncertainty '{uncertainty}': choose a strategy of "
                                    f"{STRATEGIES} and an uncertainty of {UNCERTAINTIES}")
        super().__init__(f"medsim {strategy} (uncertainty: {uncertainty}; pool of at most {max_pool} images)")
        self.state, self.strategy, self.uncertainty, self.max_pool = state, strategy, uncertainty, int(max_pool)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        unlabelled = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not unlabelled:
            return None
        if len(unlabelled) > self.max_pool:  # a fixed sample per request count: every image gets its turn
            unlabelled = random.Random(len(unlabelled)).sample(unlabelled, self.max_pool)
        labelled = datastore.get_labeled_images(request.get("label_tag"), request.get("labels"))
        ranked = self.state.assistant().rank_unlabelled(
            [datastore.get_image_uri(i) for i in unlabelled], [datastore.get_image_uri(i) for i in labelled],
            strategy=self.strategy, uncertainty=request.get("uncertainty", self.uncertainty), n=1,
            k=int(request.get("k", 10)))
        best = ranked[0]
        return {"id": unlabelled[best["index"]], "score": best["score"], "distance": best["distance"],
                "uncertainty": best["uncertainty"], "strategy": self.strategy}


class FineTune(TrainTask):
    """``/train/medsim``: fine-tune the medsim bundle on every labelled case — the index's cases and the datastore
    images whose saved label carries a class (label info ``{"class": NAME}``) — starting the trunk from the run
    the current model was exported from, then export, re-index and switch the app to the new model.

    Request params: ``max_epochs`` (default 2) and any bundle override under ``overrides``."""

    def __init__(self, state: ModelState, run: str | None, bundle: str | None, work: Path):
        super().__init__("medsim: fine-tune on the saved labels, export, re-index, switch")
        self.state, self.run, self.bundle, self.work = state, run, bundle, work

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 2, "overrides": {}}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medsim.deploy.tasks import build_index
        from medsim.engines.runs import load_run_record
        from medsim.engines.workflow import train_bundle
        from medsim.export.pipeline import export_run

        if not self.run or not Path(self.run).is_dir():
            raise DeployError("training needs the medsim run folder the export came from: start the app with "
                              "--conf run RUN_DIR")
        run = Path(self.run)
        record = load_run_record(run)
        bundle = Path(self.bundle) if self.bundle else Path(__file__).resolve().parents[3] / "bundles" / record["bundle"]
        assistant = self.state.assistant()
        rows = _labelled_rows(assistant, datastore)
        if len({r[1] for r in rows}) < 2:
            raise DeployError(f"{len(rows)} labelled case(s) in {len({r[1] for r in rows})} class(es): fine-tuning "
                              "needs at least two classes")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = self.work / f"model-{stamp}"
        out.mkdir(parents=True, exist_ok=False)
        datalist = out / "labels.csv"
        with datalist.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "label"])
            w.writerows(rows)
        keep = {k: v for k, v in (record.get("overrides") or {}).items()
                if k not in ("max_items", "max_epochs", "split_seed", "pretrained", "seed")}
        overrides = {**keep, "max_epochs": int(request.get("max_epochs", 2)), "pretrained": str(run.resolve()),
                     "train#output_handlers#1#_disabled_": True, **(request.get("overrides") or {})}
        t0 = time.perf_counter()
        train_bundle(bundle, variant=record.get("variant"), dataset_dir=str(datalist), output_dir=str(out / "run"),
                     overrides=overrides)
        export_run(out / "run", out / "export")
        build_index(out / "export", datalist, out / "index", progress=False)
        from medsim.errors import atomic_write_text

        atomic_write_text(self.work / CURRENT, json.dumps({"export": str(out / "export"), "index": str(out / "index"),
                                                           "run": str(out / "run"), "cases": len(rows)}, indent=1))
        self.run = str(out / "run")  # the next fine-tune starts from this one
        return {"cases": len(rows), "classes": sorted({r[1] for r in rows}), "seconds": round(time.perf_counter() - t0, 1),
                "model": str(out.name)}


def _labelled_rows(assistant: Assistant, datastore: Datastore) -> list[tuple[str, str]]:
    """(image path, class) of every labelled case: the index's (paths from its cases.local.json) and the
    datastore images whose final label names a class."""
    rows = []
    labels = {str(r.get("id")): r.get("label") for r in map(assistant.index.record, assistant.index.ids())}
    for cid, path in assistant.case_paths.items():
        if labels.get(cid) is not None and os.path.exists(path):
            rows.append((path, str(labels[cid])))
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        info = datastore.get_label_info(datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL),
                                        DefaultLabelTag.FINAL) or {}
        cls = next((info[k] for k in CLASS_KEYS if isinstance(info.get(k), str) and info[k]), None)
        if cls is None:
            params = info.get("params") if isinstance(info.get("params"), dict) else {}
            cls = next((params[k] for k in CLASS_KEYS if isinstance(params.get(k), str) and params[k]), None)
        if cls is not None:
            rows.append((datastore.get_image_uri(image_id), cls))
    return rows


def _flag(v: Any) -> bool:
    return v is True or str(v).lower() in ("1", "true", "yes")
