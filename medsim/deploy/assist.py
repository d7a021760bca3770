"""Annotation assistance on the torch-free runtime: what medsim's MONAI Label app (``deploy/monailabel``) serves.

An annotator opens an image; the app answers with

* :meth:`Assistant.similar_cases` — the most similar already-labelled cases of a :class:`~medsim.deploy.CaseIndex`
  (case tokens, scores, labels, small thumbnails), the same hits as ``medsim search``;
* :meth:`Assistant.localize` — a lesion mask (a label image: 2D PNG or 3D NIfTI, 0 = background, 1 = lesion) and
  boxes from the model's attention, the same files as ``medsim localize``;
* :meth:`Assistant.classify` — class probabilities, for models with logits;
* :func:`rank_unlabelled` — which unlabelled image to label next: embedding diversity (k-center greedy,
  Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018) or
  uncertainty (classifier entropy, or disagreement among the labels of the retrieved cases), or both.

Nothing here imports torch or MONAI Label: the app wraps these calls in MONAI Label's task classes, and the tests
call them directly.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.runtime.errors import DeployError

__all__ = ["Assistant", "AssistConfigError", "preflight", "kcenter_greedy", "entropy", "retrieval_disagreement",
           "rank_unlabelled", "STRATEGIES", "UNCERTAINTIES"]

logger = logging.getLogger(__name__)

#: active-learning strategies of :func:`rank_unlabelled`
STRATEGIES = ("diversity", "uncertainty", "hybrid")
#: uncertainty measures: ``auto`` = ``entropy`` for a model with logits, else ``disagreement``
UNCERTAINTIES = ("auto", "entropy", "disagreement")


class AssistConfigError(DeployError):
    """The app's export / index folders are missing, unreadable or from different models."""


@dataclass(frozen=True)
class _Cached:
    key: tuple[str, int, int]
    outputs: dict[str, np.ndarray]


class Assistant:
    """One exported model (``medsim export``) and the case index built with it (``medsim index build``).

    Args:
        model_dir: the export folder (``manifest.json``, ``model.onnx``).
        index_dir: the index folder (``case_index.json`` + its faiss file; ``cases.local.json`` for thumbnails).
        backend: engine backend (``auto``: TensorRT → onnxruntime CUDA → CPU).
        precision: ``fp32`` / ``int8``; ``None``: the precision the index was built with.
        threshold: localization threshold (``"otsu"`` or a number in [0, 1]), as ``medsim localize --threshold``.

    Raises:
        AssistConfigError: a folder is missing, or the index was built with another model (both named).
    """

    #: most image files whose outputs are kept (about 1 KB each for a 128-d embedding and an 8×8 map)
    max_cached = 50_000
    #: most case thumbnails kept
    max_thumbnails = 2_000

    def __init__(self, model_dir: str | os.PathLike, index_dir: str | os.PathLike, *, backend: str = "auto",
                 precision: str | None = None, threshold: str | float = "otsu"):
        from medsim.deploy.engine import open_engine
        from medsim.deploy.index import CaseIndex, CaseIndexError, ModelMismatchError
        from medsim.deploy.localizer import Localizer
        from medsim.deploy.tasks import export_model_id, local_case_paths

        self.model_dir, self.index_dir = Path(model_dir), Path(index_dir)
        for what, p, how in (("export", self.model_dir, "medsim export RUN --out DIR"),
                             ("index", self.index_dir, "medsim index build --model EXPORT --data DATA --out DIR")):
            if not p.is_dir():
                raise AssistConfigError(f"{what} folder {p} does not exist; make it with `{how}`")
        try:
            self.model_id = export_model_id(self.model_dir)
            self.index = CaseIndex.load(self.index_dir, expected_model_id=self.model_id)
        except ModelMismatchError as e:
            raise AssistConfigError(f"the index {self.index_dir} and the export {self.model_dir} are from different "
                                    f"models: {e}") from e
        except (CaseIndexError, DeployError) as e:
            raise AssistConfigError(str(e)) from e
        self.precision = precision or str(self.index.info.get("precision", "fp32"))
        self.engine = open_engine(self.model_dir, backend, self.precision)
        self.localizer = Localizer(threshold=threshold)
        self.case_paths = local_case_paths(self.index_dir)
        self._case_of_path = {_resolved(p): cid for cid, p in self.case_paths.items()}
        self.kind = str(self.engine.manifest["preprocessing"].get("kind", "rgb2d"))
        self._cache: dict[str, _Cached] = {}  # insertion-ordered: the oldest entry is dropped first
        self._thumbs: dict[str, str | None] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def classes(self) -> list[str]:
        return self.engine.classes

    @property
    def has_logits(self) -> bool:
        return "logits" in self.engine.output_names

    @property
    def dimension(self) -> int:
        """2 for image models, 3 for volume (ct3d) models."""
        return 3 if self.kind == "ct3d" else 2

    def close(self) -> None:
        self.engine.close()

    # ----------------------------------------------------------------------------------------------- model
    def outputs(self, images: Sequence[str | os.PathLike], *, cache: bool = True) -> dict[str, np.ndarray]:
        """Model outputs of image files (``embedding`` (N, D), ``attention``, ``logits``?). With ``cache`` they are
        kept per file (path, size, modification time; at most :attr:`max_cached` files, oldest dropped first), so
        the active-learning pool is embedded once, not on every request; a changed file is embedded again."""
        if not cache:
            return self.engine.embed([str(p) for p in images]) if len(images) else self._no_outputs()
        keys = [_file_key(p) for p in images]
        with self._lock:
            missing = [i for i, k in enumerate(keys) if self._cache.get(k[0]) is None or self._cache[k[0]].key != k]
        if missing:
            new = self.engine.embed([str(images[i]) for i in missing])
            with self._lock:
                for j, i in enumerate(missing):
                    self._cache.pop(keys[i][0], None)
                    self._cache[keys[i][0]] = _Cached(keys[i], {n: v[j] for n, v in new.items()})
                while len(self._cache) > self.max_cached:
                    self._cache.pop(next(iter(self._cache)))
        rows = []
        for i, k in enumerate(keys):
            with self._lock:
                hit = self._cache.get(k[0])
            if hit is None:  # dropped by a concurrent request's eviction meanwhile
                hit = _Cached(k, {n: v[0] for n, v in self.engine.embed([str(images[i])]).items()})
            rows.append(hit.outputs)
        if not rows:
            return self._no_outputs()
        return {n: np.stack([r[n] for r in rows]) for n in rows[0]}

    def _no_outputs(self) -> dict[str, np.ndarray]:
        return self.engine.embed([])

    def similar_cases(self, image: str | os.PathLike, k: int = 5, *, exclude_self: bool = False,
                      thumbnails: int = 96) -> dict[str, Any]:
        """The ``k`` most similar indexed cases of one image, best first — the hits of ``medsim search``.

        Returns:
            ``{"query": the image's case id (an indexed image's own, else its path's token), "k", "model_id", "cases": [{"rank", "id", "score", "label",
            "thumbnail"?}]}``; ``thumbnail`` is a ``data:image/png;base64`` picture (longest side ``thumbnails``
            px; 0: none) when the index's ``cases.local.json`` says where the case's image is on this machine.
        """
        from medsim.deploy.tasks import case_names, search_embeddings

        k = _positive_int(k, "k")
        # an indexed image is named by its case id (so exclude_self finds it), any other by its path's token
        query = self._case_of_path.get(_resolved(image)) or case_names([image])[0]
        emb = self.outputs([image], cache=False)["embedding"]
        hits = search_embeddings(self.index, emb, k, query_ids=[query], exclude_self=exclude_self)[0]
        cases = []
        for rank, h in enumerate(hits, start=1):
            cid = str(h.record.get("id", h.id))
            row: dict[str, Any] = {"rank": rank, "id": cid, "score": float(h.score), "label": h.record.get("label")}
            path = self.case_paths.get(cid)
            if thumbnails and path:
                row["thumbnail"] = self._thumbnail(cid, path, int(thumbnails))
            cases.append(row)
        return {"query": query, "k": k, "model_id": self.model_id, "cases": cases}

    def _thumbnail(self, cid: str, path: str, size: int) -> str | None:
        key = f"{cid}@{size}"
        with self._lock:
            if key in self._thumbs:
                return self._thumbs[key]
        thumb = _thumbnail(path, self.kind, size)
        with self._lock:
            self._thumbs[key] = thumb
            while len(self._thumbs) > self.max_thumbnails:
                self._thumbs.pop(next(iter(self._thumbs)))
        return thumb

    def localize(self, image: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """Mask and boxes of one image, computed by the same code as ``medsim localize``, plus a label image for
        annotation tools: a uint8 PNG (2D, at the image's size) or the mask NIfTI (3D, on the model grid with its
        affine), 0 = background, 1 = lesion.

        Args:
            out_dir: where ``medsim localize``'s files go (``<token>_mask``, ``_boxes.json``, ``_overlay.png``) and
                the label beside them. ``None`` (the server): they are written to a temporary folder that is
                removed before returning, and ``label`` is a temporary file the caller owns (MONAI Label deletes
                it after sending it).

        Returns:
            ``{"label": path, "overlay": path or None, "boxes": [...], "threshold", "name": case token}``; 2D boxes
            are pixel ``x0, y0, x1, y1`` (x = column, upper bounds exclusive).
        """
        import json
        import shutil

        from medsim.deploy.tasks import localize_images

        keep = out_dir is not None
        out = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="medsim-localize-"))
        try:
            res = localize_images(self.model_dir, [image], out, progress=False, local_paths=False,
                                  engine=self.engine, threshold=self.localizer.threshold)
            name = res["names"][0]
            doc = json.loads((out / f"{name}_boxes.json").read_text(encoding="utf-8"))
            suffix = ".nii.gz" if self.dimension == 3 else ".png"
            label = out / f"{name}_label{suffix}" if keep else Path(_temp_file(suffix))
            if self.dimension == 3:
                shutil.copyfile(out / f"{name}_mask.nii.gz", label)  # already 0/1 uint8 with the grid's affine
            else:
                from PIL import Image

                from medsim.errors import atomic_path

                with Image.open(out / f"{name}_mask.png") as m:
                    mask = (np.asarray(m) > 0).astype(np.uint8)
                with atomic_path(label, suffix=".png") as tmp:
                    Image.fromarray(mask).save(tmp)
        finally:
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        return {"name": name, "label": str(label), "overlay": str(out / f"{name}_overlay.png") if keep else None,
                "boxes": doc["boxes"], "threshold": doc["threshold"]}

    def classify(self, image: str | os.PathLike) -> dict[str, Any]:
        """Class probabilities (softmax of the model's logits) of one image.

        Raises:
            DeployError: the model has no classifier head (a pure metric-learning export).
        """
        if not self.has_logits:
            raise DeployError(f"{self.model_dir}: the model has no logits output (a metric-learning embedder); "
                              "classify needs a model trained with a classifier head")
        logits = self.outputs([image], cache=False)["logits"][0].astype(np.float64)
        p = _softmax(logits)
        names = self.classes or [str(i) for i in range(len(p))]
        order = np.argsort(-p)
        return {"label": names[int(order[0])], "probabilities": {names[i]: float(p[i]) for i in order},
                "entropy": float(entropy(logits[None])[0])}

    # -------------------------------------------------------------------------------------- active learning
    def rank_unlabelled(self, unlabelled: Sequence[str | os.PathLike], labelled: Sequence[str | os.PathLike] = (),
                        *, strategy: str = "hybrid", uncertainty: str = "auto", n: int = 1,
                        k: int = 10) -> list[dict[str, Any]]:
        """Which of ``unlabelled`` to label next (best first, at most ``n``): see :func:`rank_unlabelled`. The
        labelled set is the index's cases plus ``labelled`` (images annotated since the index was built)."""
        if not len(unlabelled):
            return []
        pool = self.outputs(unlabelled)
        extra = self.outputs(labelled)["embedding"] if len(labelled) else None
        return rank_unlabelled(pool, self.index, extra_labelled=extra, strategy=strategy, uncertainty=uncertainty,
                               n=n, k=k)


def preflight(model_dir: str, index_dir: str) -> int:
    """What ``deploy/monailabel/serve.sh`` runs before it starts the server: 0 when the export and the index open
    together, else 2 after one line on stderr saying what is wrong (a missing ``--conf``, a missing folder, an index
    of another model)."""
    import sys

    if not model_dir or not index_dir:
        missing = " and ".join(f"--conf {k} DIR" for k, v in (("export", model_dir), ("index", index_dir)) if not v)
        print(f"serve.sh: give {missing} (the folders of `medsim export` and `medsim index build`)", file=sys.stderr)
        return 2
    try:
        Assistant(model_dir, index_dir).close()
    except DeployError as e:
        print(f"serve.sh: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ active learning
def kcenter_greedy(pool: np.ndarray, centers: np.ndarray | None, n: int, *,
                   min_dist: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """k-center greedy (Sener & Savarese 2018, Alg. 1): ``n`` points of ``pool`` (N, D), each the one farthest
    (Euclidean) from the labelled ``centers`` (M, D) and the points picked before it.

    Args:
        min_dist: (N,) distance of each pool point to its nearest labelled point, when known already (e.g. from an
            index search); else computed from ``centers``. With neither (nothing labelled) the first pick is
            point 0, then farthest-first.

    Returns:
        ``(picked indices in pick order, the distance of each pick to the labelled set + earlier picks when it
        was picked)``.
    """
    x = np.asarray(pool, dtype=np.float64)
    if x.ndim != 2:
        raise DeployError(f"pool must be (N, D), got shape {x.shape}")
    n = min(int(n), len(x))
    if min_dist is not None:
        d = np.asarray(min_dist, dtype=np.float64).copy()
        if d.shape != (len(x),):
            raise DeployError(f"min_dist must be ({len(x)},), got {d.shape}")
    elif centers is not None and len(centers):
        c = np.asarray(centers, dtype=np.float64)
        d = np.sqrt(np.maximum(_sq_dists(x, c).min(axis=1), 0.0))
    else:
        d = np.full(len(x), np.inf)
    picked: list[int] = []
    gaps: list[float] = []
    for _ in range(n):
        i = int(np.argmax(d))
        picked.append(i)
        gaps.append(float(d[i]))
        d = np.minimum(d, np.sqrt(np.maximum(_sq_dists(x, x[i:i + 1])[:, 0], 0.0)))
        d[picked] = -np.inf  # never again: rounding can leave a picked point above a labelled one's exact 0
    return picked, np.asarray(gaps)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of softmax(``logits``) per row: (N, K) → (N,)."""
    z = np.asarray(logits, dtype=np.float64)
    p = _softmax(z)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


def retrieval_disagreement(neighbour_labels: Sequence[Sequence[Any]]) -> np.ndarray:
    """How much the retrieved cases disagree about a query's label: 1 − (share of the most common label among
    its labelled neighbours); 0 when all agree, → 1 − 1/k when all differ; 1 when none is labelled."""
    out = []
    for labels in neighbour_labels:
        labs = [lab for lab in labels if lab is not None]
        if not labs:
            out.append(1.0)
            continue
        _, counts = np.unique(np.asarray(labs, dtype=object).astype(str), return_counts=True)
        out.append(1.0 - counts.max() / len(labs))
    return np.asarray(out, dtype=np.float64)


def rank_unlabelled(pool: dict[str, np.ndarray], index: Any, *, extra_labelled: np.ndarray | None = None,
                    strategy: str = "hybrid", uncertainty: str = "auto", n: int = 1, k: int = 10
                    ) -> list[dict[str, Any]]:
    """Rank unlabelled images for annotation.

    Args:
        pool: model outputs of the unlabelled images (``embedding`` (N, D), ``logits``? (N, K)).
        index: the :class:`~medsim.deploy.CaseIndex` of labelled cases (searched for distances and neighbour
            labels).
        extra_labelled: (M, D) embeddings of images labelled since the index was built (diversity only).
        strategy: ``diversity`` (k-center greedy: the image farthest from everything labelled), ``uncertainty``
            (the most uncertain image), ``hybrid`` (k-center greedy over the pool, each pick's distance multiplied
            by (0.5 + uncertainty) — diverse, and among equally novel images the more uncertain first).
        uncertainty: ``entropy`` (classifier entropy / log K, needs logits), ``disagreement``
            (:func:`retrieval_disagreement` of the ``k`` nearest indexed cases) or ``auto``.
        n: how many to return.

    Returns:
        ``[{"index": position in the pool, "score", "distance", "uncertainty"}]``, best first.
    """
    if strategy not in STRATEGIES:
        raise DeployError(f"unknown active-learning strategy '{strategy}'; choose {', '.join(STRATEGIES)}")
    if uncertainty not in UNCERTAINTIES:
        raise DeployError(f"unknown uncertainty '{uncertainty}'; choose {', '.join(UNCERTAINTIES)}")
    emb = np.asarray(pool["embedding"], dtype=np.float32)
    n = _positive_int(n, "n")
    k = _positive_int(k, "k")
    logits = pool.get("logits")
    if uncertainty == "auto":
        uncertainty = "entropy" if logits is not None else "disagreement"
    if uncertainty == "entropy" and logits is None:
        raise DeployError("uncertainty 'entropy' needs a model with logits; use 'disagreement'")
    kk = min(k, len(index)) if len(index) else 0
    hits = index.search(emb, kk) if kk else [[] for _ in range(len(emb))]
    if uncertainty == "entropy":
        nclass = np.asarray(logits).shape[-1]
        unc = entropy(logits) / max(np.log(nclass), 1e-12)
    else:
        unc = retrieval_disagreement([[h.record.get("label") for h in row] for row in hits])
    # distance to the nearest labelled case: from the index hit (cosine score on L2-normalised embeddings →
    # Euclidean distance sqrt(2 - 2 cos); squared L2 for l2 indexes), then the newer labelled images
    if kk:
        top = np.asarray([row[0].score if row else np.nan for row in hits], dtype=np.float64)
        dist = np.sqrt(np.maximum(2.0 - 2.0 * top, 0.0)) if index.metric == "ip" else np.sqrt(np.maximum(top, 0.0))
    else:
        dist = np.full(len(emb), np.inf)
    if extra_labelled is not None and len(extra_labelled):
        dist = np.minimum(dist, np.sqrt(np.maximum(_sq_dists(emb.astype(np.float64),
                                                              np.asarray(extra_labelled, np.float64)).min(1), 0)))
    if strategy == "uncertainty":
        order = np.lexsort((-dist, -unc))[:n]  # most uncertain; ties: the farther one
        return [{"index": int(i), "score": float(unc[i]), "distance": float(dist[i]), "uncertainty": float(unc[i])}
                for i in order]
    if strategy == "diversity":
        picked, gaps = kcenter_greedy(emb, None, n, min_dist=dist)
        return [{"index": i, "score": float(g), "distance": float(dist[i]), "uncertainty": float(unc[i])}
                for i, g in zip(picked, gaps)]
    x, d = emb.astype(np.float64), dist.copy()
    taken = np.zeros(len(x), dtype=bool)
    out = []
    for _ in range(min(n, len(x))):
        score = d * (0.5 + unc)  # inf where nothing labelled is reached yet
        free_inf = ~taken & np.isinf(score)
        if free_inf.any():  # nothing labelled near any of these: the most uncertain of them
            cand = np.flatnonzero(free_inf)
            i = int(cand[np.argmax(unc[cand])])
        else:
            cand = np.flatnonzero(~taken)
            i = int(cand[np.argmax(score[cand])])
        taken[i] = True
        out.append({"index": i, "score": float(score[i]), "distance": float(dist[i]), "uncertainty": float(unc[i])})
        d = np.minimum(d, np.sqrt(np.maximum(_sq_dists(x, x[i:i + 1])[:, 0], 0.0)))
    return out


# ------------------------------------------------------------------------------------------------- helpers
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) squared Euclidean distances."""
    return (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _positive_int(v: Any, name: str) -> int:
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise DeployError(f"{name} must be a positive integer, got {v!r}") from None
    if i < 1 or (isinstance(v, float) and v != i):
        raise DeployError(f"{name} must be a positive integer, got {v!r}")
    return i


def _temp_file(suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="medsim-label-", suffix=suffix)
    os.close(fd)
    return path


def _resolved(p: str | os.PathLike) -> str:
    try:
        return str(Path(p).resolve())
    except (OSError, RuntimeError):
        return str(p)


def _file_key(p: str | os.PathLike) -> tuple[str, int, int]:
    path = Path(p)
    try:
        st = path.stat()
    except OSError as e:
        raise DeployError(f"{path}: cannot be read ({e.strerror or e})") from None
    return (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))


def _thumbnail(path: str, kind: str, size: int) -> str | None:
    """A small PNG of the case image as a data URI (None when it cannot be drawn: the hit is still returned)."""
    from PIL import Image

    from medsim.deploy.tasks import display_image

    try:
        if kind == "ct3d":
            return None  # volumes: no thumbnail (clients open the case)
        img = Image.fromarray(display_image(path, kind))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except (DeployError, OSError, ValueError) as e:
        logger.warning("no thumbnail for a case (%s)", type(e).__name__)
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
