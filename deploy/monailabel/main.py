"""medsim's MONAI Label app: similar cases, lesion localization, class probabilities and active learning from an
exported medsim model and its case index; a train task that fine-tunes on the annotators' labels.

Start it with ``bash deploy/monailabel/serve.sh STUDIES --conf export EXPORT_DIR --conf index INDEX_DIR`` (the
script runs ``monailabel start_server --app deploy/monailabel``). App configuration (``--conf NAME VALUE``):

* ``export`` (required): the folder of ``medsim export RUN --out DIR``.
* ``index`` (required): the folder of ``medsim index build --model EXPORT ...``; built with the same model, else
  the app refuses to start and names both folders.
* ``run``: the medsim run the export came from (enables ``/train/medsim``); ``bundle``: its bundle folder
  (default: ``bundles/<the run's bundle>`` of this checkout).
* ``work``: where fine-tuned models go (default ``<app>/model``); ``strategy`` (``hybrid`` | ``diversity`` |
  ``uncertainty``), ``uncertainty`` (``auto`` | ``entropy`` | ``disagreement``), ``max_pool``, ``threshold``
  (``otsu`` or 0..1), ``backend`` (``auto`` | ``tensorrt`` | ``ort-cuda`` | ``ort-cpu``).

Bad requests get 4xx with a message (unknown task or strategy: 404; an image id the datastore does not have: 404;
an image that cannot be read: 422) and the server keeps serving.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lib/ beside this file, however the server was started

from fastapi import HTTPException  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402

import medsim  # noqa: E402
from lib.tasks import Classify, FineTune, Localize, ModelState, NextToLabel, SimilarCases  # noqa: E402
from medsim.deploy.assist import AssistConfigError  # noqa: E402
from medsim.runtime.errors import DeployError  # noqa: E402

logger = logging.getLogger(__name__)


class MedsimApp(MONAILabelApp):
    """MONAI Label app over :class:`medsim.deploy.assist.Assistant` (see the module docstring)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        missing = [k for k in ("export", "index") if not conf.get(k)]
        if missing:
            raise AssistConfigError(f"medsim app: give --conf {' and --conf '.join(f'{k} DIR' for k in missing)} "
                                    "(the export of `medsim export` and the index of `medsim index build`)")
        work = Path(conf.get("work") or Path(app_dir) / "model")
        work.mkdir(parents=True, exist_ok=True)
        threshold: str | float = conf.get("threshold", "otsu")
        if threshold != "otsu":
            threshold = float(threshold)
        self.state = ModelState(conf["export"], conf["index"], work, backend=conf.get("backend", "auto"),
                                threshold=threshold)
        self.work = work
        assistant = self.state.assistant()
        logger.info("medsim app: model %s, %d indexed cases", assistant.model_id, len(assistant.index))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medsim",
                         description="Similar cases, lesion localization and active learning from medsim",
                         version=medsim.__version__, labels={"lesion": 1})

    # ------------------------------------------------------------------------------------------------ tasks
    def init_infers(self) -> dict[str, Any]:
        a = self.state.assistant()
        infers: dict[str, Any] = {"similar_cases": SimilarCases(self.state, a.dimension, a.classes),
                                  "localize": Localize(self.state, a.dimension)}
        if a.has_logits:
            infers["classify"] = Classify(self.state, a.dimension, a.classes)
        return infers

    def init_strategies(self) -> dict[str, Any]:
        default = self.conf.get("strategy", "hybrid")
        unc = self.conf.get("uncertainty", "auto")
        pool = int(self.conf.get("max_pool", 2000))
        out = {"medsim": NextToLabel(self.state, default, unc, pool)}
        out.update({f"medsim_{s}": NextToLabel(self.state, s, unc, pool) for s in ("diversity", "uncertainty",
                                                                                  "hybrid")})
        return out

    def init_trainers(self) -> dict[str, Any]:
        return {"medsim": FineTune(self.state, self.conf.get("run"), self.conf.get("bundle"), self.work)}

    # --------------------------------------------------------------------------- requests → 4xx, not 500
    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no infer task '{model}'; this app has "
                                                        f"{', '.join(sorted(self._infers))}")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            ds = datastore or self.datastore()
            if not image or not ds.get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image '{image}' is not in the datastore")
        try:
            return super().infer(request, datastore)
        except DeployError as e:  # an unreadable upload, a bad parameter
            raise HTTPException(status_code=422, detail=str(e)) from None

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "medsim"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404, detail=f"no active-learning strategy '{strategy}'; this app has "
                                                        f"{', '.join(sorted(self._strategies))}")
        try:
            return super().next_sample({**request, "strategy": strategy})
        except (DeployError, MONAILabelException) as e:
            raise HTTPException(status_code=422, detail=str(getattr(e, "msg", e))) from None
